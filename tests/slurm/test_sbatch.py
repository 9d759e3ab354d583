"""`sbatch launch/slurm/train.sbatch <hydra overrides>` on a real (private, local) SLURM cluster.

Every job is submitted the way the README tells users, from the repository root, on a
CPU-only cluster: `sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 ...`, a
debug-sized model, 2 processes over gloo. `--chdir` puts each job's working directory (its
outputs/ and slurm-<id>.out) in a temporary directory. All jobs are submitted at once when
the module starts and run side by side; each test then follows its own.

Where a test must act in the middle of training, a `sitecustomize` on PYTHONPATH (exported
into the job by sbatch) installs tests/fault_harness.py's pause in the trainer for the start
of the job named by $SLURM_RESTART_COUNT: rank 0 waits at the start of a given step until a
signal arrives. Nothing else about training changes.
"""
import os
import re
import signal
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cluster import Cluster, missing_binaries
from conftest import ROOT, final_weights, free_port, read_metrics, series

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = "launch/slurm/train.sbatch"
CPU_2PROC = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
STEPS = 8
TIMEOUT = 420  # seconds for one start of a job, on a loaded shared machine
# A requeue passes through COMPLETING, REQUEUED and PENDING: only these states are an end.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
CORPUS_FILES = ("bisect", "colorsys", "keyword", "glob", "fnmatch", "textwrap")

HOOK = """
import os, sys
if sys.argv and sys.argv[0].endswith("train.py"):
    start = os.environ.get("SLURM_RESTART_COUNT", "0")
    spec = os.environ.get("GPTLAB_FAULT_START" + start)
    if spec:
        sys.path.insert(0, {tests!r})
        from fault_harness import install
        install(spec, os.environ["GPTLAB_FAULT_MARKER"] + ".start" + start + ".rank" + os.environ.get("RANK", "0"))
"""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A private cluster, munged + slurmctld + two emulated nodes n1, n2, all state in a temporary
    directory; every daemon stopped by its pid. Without the daemons: a skip with the reason."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): "
                    "apt-get install slurmctld slurmd slurm-client munge")
    # CPUs beyond the hardware (config_overrides) let the test jobs run side by side.
    cluster = Cluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=8)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def train_overrides(corpus, cache, *extra):
    return ["debug=smoke", f"data.paths=[{corpus}]", f"cache_dir={cache}", f"trainer.max_steps={STEPS}",
            "trainer.eval_every=4", "trainer.save_every=4", *extra]


class Job:
    """One submitted job: its id, working directory and output file, and SLURM's view of it."""

    def __init__(self, slurm, cwd: Path, sbatch_args, overrides, env=None, marker=None):
        cwd.mkdir(parents=True, exist_ok=True)
        self.slurm, self.cwd, self.marker = slurm, cwd, marker
        self.cmd = ["sbatch", "--parsable", f"--chdir={cwd}", *sbatch_args, SBATCH, *overrides]
        self.env = env or {}
        self.submit()

    def submit(self) -> str:
        self.id = self.slurm.run(*self.cmd, cwd=ROOT, env=self.env).stdout.strip().split(";")[0]
        return self.id

    @property
    def out(self) -> str:
        path = self.cwd / f"slurm-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def info(self) -> dict:
        text = self.slurm.run("scontrol", "show", "job", "-o", self.id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, until, what, timeout=TIMEOUT):
        deadline = time.time() + timeout
        while True:
            info = self.info()
            if until(info):
                return info
            if time.time() > deadline:
                pytest.fail(f"job {self.id}: no {what} after {timeout} s ({info.get('JobState')}):\n{self.out[-4000:]}")
            time.sleep(0.5)

    def wait_done(self, restarts=0) -> dict:
        return self.wait(lambda i: i["JobState"] in ENDED and int(i["Restarts"]) == restarts, "end")

    def wait_paused(self, start: int):
        """Until rank 0 of this start sits at its fault point."""
        marker = Path(f"{self.marker}.start{start}.rank0")
        self.wait(lambda i: marker.exists() or i["JobState"] in ENDED, f"pause in start {start}")
        assert marker.exists(), f"job {self.id} ended before the fault point:\n{self.out[-4000:]}"
        time.sleep(0.5)  # rank 1 reaches its collective; the handlers are long installed

    def release_requeued(self, restarts: int):
        """A requeued job waits ~2 min (BeginTime) before it may start again: start it sooner.
        Not at once: the requeue revoked the job's credential with a time in whole seconds, and
        a start within that second fails ("Job credential revoked", the job ends FAILED 1:0)."""
        self.wait(lambda i: i["JobState"] == "PENDING" and int(i["Restarts"]) == restarts, "requeue")
        self.slurm.run("scontrol", "update", f"JobId={self.id}", "StartTime=now+3")


def assert_same_curve(run_dir, ref_dir, tol):
    """train/loss and eval/loss at every step (each step logged once) and the final weights."""
    ours, ref = read_metrics(run_dir), read_metrics(ref_dir)
    assert [s for s, _ in series(ours, "train/loss")] == list(range(1, STEPS + 1))
    for key in ("train/loss", "eval/loss"):
        got, want = series(ours, key), series(ref, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        for (step, a), (_, b) in zip(got, want):
            assert abs(a - b) <= tol, f"step {step}: {key} {a} vs {b}"
    a, b = final_weights(run_dir), final_weights(ref_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


def saved_steps(run_dir) -> list:
    return [int(m) for m in re.findall(r"saved checkpoint \S+/step_(\d+)", (Path(run_dir) / "train.log").read_text())]


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory):
    """Every job of the module, submitted at once, and the plain `accelerate launch` reference."""
    from test_launch import ACCELERATE, TRAIN_PY, kill_tree, start

    base = tmp_path_factory.mktemp("sbatch")
    corpus, cache = base / "corpus", base / "cache"
    corpus.mkdir()
    for name in CORPUS_FILES:
        (corpus / f"{name}.py").write_text((Path(sysconfig.get_paths()["stdlib"]) / f"{name}.py").read_text())
    hook = base / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK.format(tests=str(ROOT / "tests")))
    path = os.pathsep.join([str(hook), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    # An empty HF_HOME: no accelerate default_config.yaml of the user's can change a launch.
    env = {"PYTHONPATH": path, "HF_HOME": str(base / "hf_home")}
    # The jobs start while the reference runs: concurrent builders of one token cache agree.
    ref_dir = base / "reference"
    t0 = time.perf_counter()
    reference = start([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                       str(free_port()), TRAIN_PY, *train_overrides(corpus, cache, f"run_dir={ref_dir}")],
                      base, {**slurm.env, **env})

    def job(name, sbatch_args, *extra, fault=None):
        marker = base / name / "marker"
        faults = {f"GPTLAB_FAULT_START{n}": spec for n, spec in enumerate(fault or [])}
        return Job(slurm, base / name, sbatch_args, train_overrides(corpus, cache, *extra),
                   {**env, **faults, "GPTLAB_FAULT_MARKER": str(marker)}, marker)

    submitted = SimpleNamespace(
        ref_dir=ref_dir,
        normal=job("normal", CPU_2PROC),
        # start 1 pauses at step 3 (SIGTERM to the steps), start 2 at step 6 (SIGUSR1 to the batch script)
        preempted=job("preempted", CPU_2PROC, fault=["pause_in_step:3:0", "pause_in_step:6:0"]),
        cancelled=job("cancelled", CPU_2PROC, fault=["pause_in_step:3:0"]),
        killed=job("killed", CPU_2PROC, f"run_dir={base / 'killed' / 'run'}", fault=["pause_in_step:7"]),
        two_nodes=job("two_nodes", ["--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"]),
        no_such_experiment=job("no_such_experiment", ["--gpus-per-node=0", "--ntasks-per-node=1",
                                                      "--cpus-per-task=1"], "experiment=no_such_experiment"),
        typo=job("typo", ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1"], "trainer.max_stepz=3"),
    )
    try:
        reference.wait(timeout=TIMEOUT)
    finally:
        if reference.poll() is None:
            kill_tree(reference)
    reference.log.seek(0)
    assert reference.returncode == 0, reference.log.read()[-4000:]
    yield submitted
    print(f"\nSLURM module wall time: {time.perf_counter() - t0:.1f} s")


def run_dir_of(job) -> Path:
    m = re.search(r"run_dir (\S+); start", job.out)
    assert m, job.out[-4000:]
    return Path(m.group(1))


def test_a_job_trains_like_accelerate_launch(jobs):
    job = jobs.normal
    info = job.wait_done()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.out[-4000:]
    assert "gptlab: 1 node(s) x 2 CPU process(es) = 2 process(es), 1 thread(s) each" in job.out
    # No run_dir given: one directory for the job, the same on any restart, in the job's working directory.
    run_dir = run_dir_of(job)
    assert run_dir == job.cwd / "outputs" / "default" / f"slurm-{job.id}"
    assert sorted(p.name for p in job.cwd.iterdir()) == ["outputs", f"slurm-{job.id}.out"]
    assert list((job.cwd / "outputs" / "default").iterdir()) == [run_dir]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", "checkpoints", "final", "metrics.jsonl", "tb", "tokenizer", "train.log"]
    assert "2 process(es), DistributedType.MULTI_CPU" in (run_dir / "train.log").read_text()
    assert [s for s, _ in series(read_metrics(run_dir), "eval/loss")] == [4, 8]
    # The same training as the plain 2-process `accelerate launch`; in fact bit-identical.
    assert_same_curve(run_dir, jobs.ref_dir, tol=1e-6)
    assert series(read_metrics(run_dir), "train/loss") == series(read_metrics(jobs.ref_dir), "train/loss")


def test_preempted_job_saves_requeues_itself_and_finishes_like_an_uninterrupted_one(jobs):
    """SIGTERM to the job steps (preemption, `scancel --signal=TERM`), then SIGUSR1 to the
    batch script only (`scancel --batch --signal=USR1`: how `#SBATCH --signal=B:USR1@180`
    delivers the time-limit warning). Each time the trainers save at the end of the step
    and exit, the script requeues the job, and the next start resumes. The curve and the
    weights equal the uninterrupted job's exactly (tolerance 0)."""
    job, normal = jobs.preempted, jobs.normal
    job.wait_paused(0)
    job.slurm.run("scancel", "--signal=TERM", job.id)
    job.release_requeued(1)
    job.wait_paused(1)
    job.slurm.run("scancel", "--batch", "--signal=USR1", job.id)
    job.release_requeued(2)
    info = job.wait_done(restarts=2)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.out[-4000:]

    out = job.out  # --open-mode=append: all three starts in one file
    run_dir = run_dir_of(job)
    for start in (1, 2, 3):
        assert f"run_dir {run_dir}; start {start}" in out
    assert out.count(f"requeueing job {job.id} to continue with resume=auto") == 2
    log = (run_dir / "train.log").read_text()
    assert log.count("stop requested (SIGTERM): saving a checkpoint and stopping") == 2
    assert "resumed from" in log and "step_0000003: step 3" in log and "step_0000006: step 6" in log
    assert saved_steps(run_dir) == [3, 4, 6, 8]  # 3 and 6 only because of the signals (save_every=4)
    normal.wait_done()
    assert_same_curve(run_dir, run_dir_of(normal), tol=0)
    for key in ("train/loss", "train/lr", "train/grad_norm", "eval/loss"):
        assert series(read_metrics(run_dir), key) == series(read_metrics(run_dir_of(normal)), key), key


def test_cancelled_job_saves_and_stays_cancelled(jobs):
    """A plain `scancel` (SIGTERM to every process, SIGKILL after KillWait): the trainers save,
    and the script does not requeue a job the user cancelled."""
    job = jobs.cancelled
    job.wait_paused(0)
    job.slurm.run("scancel", job.id)
    info = job.wait_done()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), job.out[-4000:]
    run_dir = run_dir_of(job)
    assert "stopped by SIGTERM" in (run_dir / "train.log").read_text()
    assert saved_steps(run_dir) == [3]
    assert "requeueing" not in job.out
    assert f"continue with the same command and run_dir={run_dir}" in job.out


def test_hard_killed_job_resumes_from_its_last_checkpoint_when_resubmitted(jobs):
    """SIGKILL to both trainers during step 7 (checkpoints every 4 steps), as the OOM killer or
    a lost node does; `scancel --signal=KILL` cannot do it, SLURM turns it into a cancel that
    sends SIGTERM first. The job fails and is not requeued. The same sbatch command again
    resumes from step 4; steps 5-6 logged by the killed start are superseded, so every step
    appears once and the curve equals the uninterrupted one."""
    job, normal = jobs.killed, jobs.normal
    job.wait_paused(0)
    for rank in (0, 1):
        marker = Path(f"{job.marker}.start0.rank{rank}")
        job.wait(lambda i: marker.exists(), f"rank {rank} at its fault point")
        os.kill(int(marker.read_text()), signal.SIGKILL)
    info = job.wait_done()
    assert info["JobState"] == "FAILED", job.out[-4000:]
    run_dir = run_dir_of(job)
    assert run_dir == job.cwd / "run"
    assert [s for s, _ in series(read_metrics(run_dir), "train/loss")] == list(range(1, 7))
    assert not (run_dir / "final").exists()

    first = job.id
    job.env = {k: v for k, v in job.env.items() if not k.startswith("GPTLAB_FAULT_START")}
    job.submit()
    assert job.id != first
    info = job.wait_done()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.out[-4000:]
    assert "step_0000004: step 4" in (run_dir / "train.log").read_text()
    normal.wait_done()
    assert_same_curve(run_dir, run_dir_of(normal), tol=0)


def test_two_nodes_train_like_two_processes_on_one(jobs):
    """Nodes n1 and n2 (two slurmd on this machine; here their names resolve nowhere): one
    `accelerate launch` per node, one process each, rendezvous at n1's NodeAddr."""
    job = jobs.two_nodes
    info = job.wait_done()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.out[-4000:]
    assert info["NodeList"] == "n[1-2]"
    assert "gptlab: 2 node(s) x 1 CPU process(es) = 2 process(es), 1 thread(s) each; head node n1 (127.0.0.1:" \
        in job.out
    run_dir = run_dir_of(job)
    assert "2 process(es), DistributedType.MULTI_CPU" in (run_dir / "train.log").read_text()
    assert_same_curve(run_dir, jobs.ref_dir, tol=1e-6)


@pytest.mark.parametrize("name, error", [
    ("no_such_experiment", "Could not find 'experiment/no_such_experiment'"),
    ("typo", "Key 'max_stepz' not in 'TrainerConfig'"),
])
def test_bad_input_fails_the_job_fast_with_the_error_in_its_output(jobs, name, error):
    job = getattr(jobs, name)
    info = job.wait_done()
    assert info["JobState"] == "FAILED", job.out[-4000:]
    assert error in job.out
    assert "train:" not in job.out and not (job.cwd / "outputs").exists()  # nothing started
