"""Launch modes under real `accelerate launch` processes on CPU (gloo), and the launch files.

The 1-process reference run and the 2-process run are module fixtures shared by the
tests that compare against them. Every multi-process test reads the world size back
from what the run logged and asserts it is 2.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, final_weights, free_port, read_metrics, run_training, series

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TRAIN_PY = str(ROOT / "train.py")
LAUNCH = ROOT / "launch"
STEPS = 6
# Fixed stdlib files in a directory named "corpus" (file keys include it), so the data
# cannot drift while the module runs (the embedded default corpus follows whatever is
# installed). split_seed=6 puts 39 blocks in validation: odd, so the ranks get 20 and 19.
CORPUS_FILES = ("bisect", "colorsys", "keyword", "glob", "fnmatch", "textwrap", "heapq", "shlex", "string", "copy")


@pytest.fixture(scope="session")  # shared with test_fsdp.py
def launch_env(tmp_path_factory):
    # An empty HF_HOME: no accelerate default_config.yaml of the user's can change a launch.
    return {**os.environ, "HF_HOME": str(tmp_path_factory.mktemp("hf_home"))}


@pytest.fixture(scope="session")  # shared with test_fsdp.py
def corpus(tmp_path_factory):
    src = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("launch") / "corpus"
    out.mkdir()
    for name in CORPUS_FILES:
        shutil.copyfile(src / f"{name}.py", out / f"{name}.py")
    return out


def overrides(corpus, cache_dir, grad_accum, *extra):
    # AdamW in fp32: these runs must agree to 1e-6 (Muon's bf16 Newton-Schulz agrees to 1e-5: test_muon)
    return ["debug=smoke", "optim=adamw", "scheduler=cosine", f"data.paths=[{corpus}]", "data.valid_fraction=0.1",
            "data.split_seed=6", f"cache_dir={cache_dir}", f"trainer.max_steps={STEPS}", "trainer.eval_every=3",
            "trainer.log_every=1", f"trainer.grad_accum={grad_accum}", *extra]


def kill_tree(proc) -> None:
    """Kill a launcher and its workers: torchrun starts each worker in a session of its own,
    so killing the launcher's process group would leave them running."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def start(cmd, cwd, env):
    # Output goes to a file, not a pipe: a full pipe would stall one launcher of several
    # while another waits for it in a collective.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def finish(procs, timeout=240) -> list:
    """Wait for every process; on a timeout kill them all and fail with their output."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"timed out after {timeout} s:\n{output(p)[-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    outs = [output(p) for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def launch(launcher_args, hydra_args, cwd, env):
    t0 = time.perf_counter()
    finish([start([ACCELERATE, "launch", *launcher_args, TRAIN_PY, *hydra_args], cwd, env)])
    return time.perf_counter() - t0


def logged_world(run_dir) -> tuple:
    """(number of processes, distributed type) from the run's own train.log."""
    text = (Path(run_dir) / "train.log").read_text()
    m = re.search(r"(\d+) process\(es\), DistributedType\.(\w+)", text)
    assert m, text[:2000]
    return int(m.group(1)), m.group(2)


def logged_blocks(run_dir) -> tuple:
    m = re.search(r"data: (\d+) train blocks, (\d+) valid blocks", (Path(run_dir) / "train.log").read_text())
    return int(m.group(1)), int(m.group(2))


def assert_same_training(run_dir, ref_dir, tol=1e-6):
    got, want = series(read_metrics(run_dir), "train/loss"), series(read_metrics(ref_dir), "train/loss")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= tol, f"step {step}: train/loss {a} vs {b}"
    a, b = final_weights(run_dir), final_weights(ref_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir, launch_env):
    """`accelerate launch --num_processes 1` (cpu.yaml), grad_accum=4."""
    run_dir = tmp_path_factory.mktemp("ref_run")
    wall_s = launch(["--config_file", str(LAUNCH / "accelerate" / "cpu.yaml"), "--num_processes", "1"],
                    overrides(corpus, cache_dir, 4, f"run_dir={run_dir}"), cwd=run_dir, env=launch_env)
    return SimpleNamespace(run_dir=run_dir, wall_s=wall_s)


@pytest.fixture(scope="session")  # shared with test_fsdp.py
def ddp2(tmp_path_factory, corpus, cache_dir, launch_env):
    """cpu_ddp2.yaml (= `--multi_gpu --num_processes 2`), grad_accum=2, NO run_dir, from an empty cwd."""
    cwd = tmp_path_factory.mktemp("ddp2_cwd")
    wall_s = launch(["--config_file", str(LAUNCH / "accelerate" / "cpu_ddp2.yaml"),
                     "--main_process_port", str(free_port())],
                    overrides(corpus, cache_dir, 2), cwd=cwd, env=launch_env)
    run_dirs = list((cwd / "outputs" / "default").iterdir())
    assert len(run_dirs) == 1, run_dirs
    return SimpleNamespace(cwd=cwd, run_dir=run_dirs[0], wall_s=wall_s)


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(reference, ddp2):
    assert logged_world(reference.run_dir) == (1, "NO")
    assert logged_world(ddp2.run_dir) == (2, "MULTI_CPU")
    # run.lock was taken by rank 0 alone (a second taker would have failed the run) and released at its end.
    assert not (ddp2.run_dir / "run.lock").exists()
    log = (ddp2.run_dir / "train.log").read_text()
    assert "global batch 16 = micro 4 x accum 2 x 2 process(es); 1024 tokens per optimizer step" in log
    assert_same_training(ddp2.run_dir, reference.run_dir)
    print(f"\nwall time: 1 process {reference.wall_s:.1f} s, 2 processes {ddp2.wall_s:.1f} s")


@pytest.mark.slow
def test_two_process_run_writes_one_run_dir(ddp2):
    assert logged_world(ddp2.run_dir) == (2, "MULTI_CPU")
    # Nothing but outputs/default/<one timestamp>/ in the launch directory.
    assert sorted(p.name for p in ddp2.cwd.iterdir()) == ["outputs"]
    assert [p.name for p in (ddp2.cwd / "outputs").iterdir()] == ["default"]
    run_dir = ddp2.run_dir
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_dir.name)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", "checkpoints", "final", "metrics.jsonl", "tb", "tokenizer", "train.log"]
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]
    assert len(list((run_dir / "tb").iterdir())) == 1  # one event stream, from rank 0 only
    rows = read_metrics(run_dir)
    assert [s for s, _ in series(rows, "train/loss")] == list(range(1, STEPS + 1))  # each step once
    assert [s for s, _ in series(rows, "eval/loss")] == [3, 6]


@pytest.mark.slow
def test_eval_loss_is_the_same_for_one_and_two_processes(reference, ddp2):
    assert logged_world(ddp2.run_dir)[0] == 2
    _, n_valid = logged_blocks(ddp2.run_dir)
    assert n_valid % 2 == 1, f"the validation set should have an odd block count, has {n_valid}"
    assert logged_blocks(reference.run_dir)[1] == n_valid
    one, two = series(read_metrics(reference.run_dir), "eval/loss"), series(read_metrics(ddp2.run_dir), "eval/loss")
    assert [s for s, _ in one] == [s for s, _ in two] == [3, 6]
    for (step, a), (_, b) in zip(one, two):
        # float64 sums of the same per-token losses; only float32 batch-shape noise differs
        assert abs(a - b) <= 1e-6, f"step {step}: eval/loss {a} (1 process) vs {b} (2 processes)"


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_one_process(reference, corpus, tmp_path, launch_env):
    """Two launchers, machine_rank 0 and 1, each one process. Both are their node's local
    main process, so both build the (fresh) token cache at once and must agree on it."""
    run_dir, port = tmp_path / "run", free_port()
    finish([start([ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                   "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   TRAIN_PY, *overrides(corpus, tmp_path / "cache", 2, f"run_dir={run_dir}")], tmp_path, launch_env)
            for rank in (0, 1)])
    assert logged_world(run_dir) == (2, "MULTI_CPU")
    assert_same_training(run_dir, reference.run_dir)


@pytest.mark.slow
def test_data_parallel_mode_runs_on_cpu(reference, corpus, cache_dir, tmp_path):
    """trainer.parallel=dp wraps the model in DataParallel, which on a CPU passes through."""
    run_training(overrides(corpus, cache_dir, 4, f"run_dir={tmp_path}", "trainer.parallel=dp"))
    assert logged_world(tmp_path) == (1, "NO")
    assert "trainer.parallel=dp without a GPU" in (tmp_path / "train.log").read_text()
    assert not any(k.startswith("module.") for k in final_weights(tmp_path))  # exported unwrapped
    assert_same_training(tmp_path, reference.run_dir)


def test_data_parallel_wrapper_asks_for_no_kv_cache():
    from transformers import GPT2Config, GPT2LMHeadModel
    from gptlab.distributed import DataParallelLM, wrap_parallel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    assert wrap_parallel(model, "ddp") is model
    wrapped = wrap_parallel(model, "dp")
    assert isinstance(wrapped, DataParallelLM) and wrapped.module is model
    x = torch.randint(0, 32, (2, 8))
    assert model(input_ids=x).past_key_values is not None  # what DataParallel could not gather
    out = wrapped(input_ids=x)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, model(input_ids=x).logits)


def test_parallel_mode_is_checked_before_training():
    from gptlab.distributed import check_parallel

    check_parallel("ddp", 2)
    check_parallel("dp", 1)
    with pytest.raises(ValueError, match="trainer.parallel=dp runs ONE process"):
        check_parallel("dp", 2)


def test_run_dirs_claimed_in_the_same_second_differ(tmp_path, monkeypatch):
    from gptlab import run_dir

    class FixedClock:
        @staticmethod
        def now():
            from datetime import datetime
            return datetime(2024, 1, 2, 3, 4, 5)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_dir, "datetime", FixedClock)
    solo = SimpleNamespace(is_main_process=True, num_processes=1)
    dirs = [run_dir.agree_run_dir(solo, None) for _ in range(3)]
    assert [d.name for d in dirs] == ["2024-01-02_03-04-05", "2024-01-02_03-04-05_1", "2024-01-02_03-04-05_2"]
    assert all(d.parent == tmp_path / "outputs" / "default" for d in dirs)


def test_multirun_inside_a_multi_process_launch_is_refused(monkeypatch):
    from hydra.types import RunMode
    from gptlab import run_dir

    monkeypatch.setattr(run_dir, "_hydra_config", lambda: SimpleNamespace(mode=RunMode.MULTIRUN))
    with pytest.raises(ValueError, match="one `accelerate launch` per job"):
        run_dir.agree_run_dir(SimpleNamespace(is_main_process=True, num_processes=2), None)


@pytest.mark.slow
def test_hydra_multirun_in_one_process(corpus, cache_dir, tmp_path):
    proc = subprocess.run([sys.executable, TRAIN_PY, "-m", "optim.lr=1e-3,3e-4",
                           *overrides(corpus, cache_dir, 1, "trainer.max_steps=2", "trainer.eval_every=2",
                                      "trainer.sample_max_new_tokens=1")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1
    sweep = sweeps[0]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        run_dir = sweep / job
        assert logged_world(run_dir) == (1, "NO")
        assert f"lr: {lr}" in (run_dir / ".hydra" / "config.yaml").read_text()
        assert (run_dir / "final" / "model.safetensors").is_file()
        assert [s for s, _ in series(read_metrics(run_dir), "train/loss")] == [1, 2]
        first_lr = series(read_metrics(run_dir), "train/lr")[0][1]
        assert first_lr == pytest.approx(lr / 2)  # warmup_steps=2: step 1 is at half the peak


def test_every_shell_script_parses():
    scripts = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert {p.relative_to(LAUNCH).as_posix() for p in scripts} >= {
        "forward_signals.sh", "torchrun.sh", "slurm/train.sbatch"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_every_accelerate_config_loads():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    configs = sorted((LAUNCH / "accelerate").glob("*.yaml"))
    assert {p.stem for p in configs} == {"cpu", "cpu_ddp2", "single_gpu", "multi_gpu", "multi_node", "fsdp"}
    valid = {t.value for t in DistributedType}
    for path in configs:
        text = path.read_text()
        assert text.startswith("#"), f"{path.name} has no comment saying what it is for"
        raw = yaml.safe_load(text)
        assert raw["distributed_type"] in valid, f"{path.name}: {raw['distributed_type']!r}"
        loaded = load_config_from_file(str(path))  # accelerate's own parser: unknown keys fail
        # MULTI_CPU would start one process without mpirun (see cpu_ddp2.yaml)
        assert loaded.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.FSDP)
        assert (loaded.num_processes > 1) == (loaded.distributed_type != DistributedType.NO)
    fsdp = load_config_from_file(str(LAUNCH / "accelerate" / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "GPT2Block"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    multi_node = load_config_from_file(str(LAUNCH / "accelerate" / "multi_node.yaml"))
    assert multi_node.num_machines > 1 and multi_node.main_process_ip and multi_node.main_process_port


# A stand-in trainer for the signal tests: it records its arguments and world size, then
# the signals it gets, and exits 0 like a trainer that saved a checkpoint.
FAKE_TRAINER = """
import json, os, signal, sys, time
rank = os.environ.get("RANK", "0")
got = []
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
with open(f"ready{rank}.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "world_size": os.environ.get("WORLD_SIZE")}, f)
deadline = time.time() + 120
while not got and time.time() < deadline:
    time.sleep(0.05)
with open(f"got{rank}.txt", "w") as f:
    f.write(",".join(got))
"""

# A stand-in srun: one copy of the command per node with SLURM_NODEID set, signals passed on
# to every copy. The stand-in scancel signals it, as the real one signals every job step.
FAKE_SRUN = """#!/usr/bin/env bash
echo $$ > srun.pid
while [[ $1 == --* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n "$@" &
  pids+=($!)
done
trap 'trapped=1; kill -USR1 "${pids[@]}"' USR1
trap 'trapped=1; kill -TERM "${pids[@]}"' TERM
status=0
for p in "${pids[@]}"; do
  while :; do
    trapped=0
    wait "$p"
    s=$?
    [ "$trapped" = 1 ] && [ "$s" -gt 128 ] || break
  done
  [ "$s" = 0 ] || status=$s
done
exit "$status"
"""

ODD_OVERRIDE = "trainer.sample_prompt=def f(x):  # 'quoted'"


def _run_until_ready_then_signal(cmd, cwd, env, sig, n_ranks=2, timeout=180):
    proc = start(cmd, cwd, env)
    try:
        deadline = time.time() + timeout
        while not all((cwd / f"ready{r}.json").exists() for r in range(n_ranks)):
            assert proc.poll() is None, output(proc)[-4000:]
            assert time.time() < deadline, "the trainers never started"
            time.sleep(0.2)
        time.sleep(0.5)  # the ready file is written after the handlers are installed; be generous
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return proc.returncode, output(proc)


def _ready(cwd, rank):
    import json
    return json.loads((cwd / f"ready{rank}.json").read_text())


@pytest.mark.slow
def test_sbatch_passes_overrides_and_forwards_usr1_to_every_trainer(tmp_path):
    """train.sbatch as a 2-node job (1 GPU each) on this machine, with stand-ins for srun,
    scontrol, scancel and the trainer (tests/slurm/ runs it on a real cluster). SLURM's time-limit warning (SIGUSR1 to the batch script)
    must reach the trainer on every node as SIGTERM, and the job must end cleanly."""
    (tmp_path / "train.py").write_text(FAKE_TRAINER)
    (tmp_path / "launch").symlink_to(LAUNCH)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "scancel").write_text("#!/bin/sh\nkill -TERM $(cat srun.pid)\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HF_HOME": str(tmp_path / "hf_home"), "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "4242",
           "SLURM_CPUS_PER_TASK": "1", "MAIN_PROCESS_PORT": str(free_port())}
    rc, out = _run_until_ready_then_signal(["bash", str(LAUNCH / "slurm" / "train.sbatch"), "debug=smoke",
                                            ODD_OVERRIDE], tmp_path, env, signal.SIGUSR1)
    assert "2 node(s) x 1 GPU(s) = 2 process(es)" in out
    # The script adds the job's run directory (the same on a requeue) and resume=auto.
    run_dir = f"run_dir={tmp_path}/outputs/default/slurm-4242"
    for rank in (0, 1):
        assert _ready(tmp_path, rank) == {"argv": [run_dir, "resume=auto", "debug=smoke", ODD_OVERRIDE],
                                          "world_size": "2"}
        assert (tmp_path / f"got{rank}.txt").read_text() == "SIGTERM", out[-4000:]
    assert rc == 0, out[-4000:]


@pytest.mark.slow
def test_torchrun_script_forwards_sigterm(tmp_path):
    """launch/torchrun.sh with 2 local processes; SIGTERM to the script reaches both trainers."""
    (tmp_path / "launch").mkdir()
    for name in ("torchrun.sh", "forward_signals.sh"):
        (tmp_path / "launch" / name).symlink_to(LAUNCH / name)
    (tmp_path / "train.py").write_text(FAKE_TRAINER)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NPROC_PER_NODE": "2"}
    rc, out = _run_until_ready_then_signal(["bash", str(tmp_path / "launch" / "torchrun.sh"), ODD_OVERRIDE],
                                           tmp_path, env, signal.SIGTERM)
    for rank in (0, 1):
        assert _ready(tmp_path, rank) == {"argv": [ODD_OVERRIDE], "world_size": "2"}
        assert (tmp_path / f"got{rank}.txt").read_text() == "SIGTERM", out[-4000:]
    assert rc == 0, out[-4000:]
