"""One live run per run directory: a second run stops before step 1 naming the owner;
a killed owner does not block resume=auto; with several processes only rank 0 locks."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, run_training

HOLDER = """
import sys, time
from gptlab.lock import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def hold(run_dir):
    """Another process that owns run_dir, as a run started a moment earlier does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "locked\n"
    return proc


def smoke(run_dir, cache_dir, *extra):
    return [f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", "trainer.max_steps=2",
            "trainer.eval_every=2", "trainer.sample_prompts=[]", *extra]


@pytest.mark.parametrize("resume", [[], ["resume=auto"]])
def test_a_second_run_stops_before_step_1_naming_the_owner(tmp_path, cache_dir, resume):
    from gptlab.errors import RunDirBusyError

    run_dir = tmp_path / "run"
    owner = hold(run_dir)
    try:
        with pytest.raises(RunDirBusyError) as e:
            run_training(smoke(run_dir, cache_dir, *resume))
    finally:
        owner.kill()
        owner.wait(10)
    assert f"pid {owner.pid} on host {socket.gethostname()}" in str(e.value)
    assert str(e.value).startswith(f"run_dir={run_dir} is in use by a live run") and "\n" not in str(e.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # no log, no metrics, no checkpoint


def test_a_killed_owner_does_not_block_resume_auto(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    owner = hold(run_dir)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == owner.pid  # its name is still there
    result = run_training(smoke(run_dir, cache_dir, "resume=auto"))
    assert result["stopped"] is None and (run_dir / "final").is_dir()
    assert not (run_dir / "run.lock").exists()  # a finished run leaves no lock file behind
    # the lock went with the run: the same process, or another, may take the directory again
    owner = hold(run_dir)
    owner.kill()
    owner.wait(10)


@pytest.mark.slow
def test_under_two_processes_rank_0_decides_for_both(tmp_path, cache_dir):
    """Both ranks stop with rank 0's line (the others never lock; they learn the answer)."""
    from conftest import free_port
    from test_launch import ACCELERATE, LAUNCH, TRAIN_PY, output, start

    run_dir = tmp_path / "run"
    owner = hold(run_dir)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT)}
    try:
        proc = start([ACCELERATE, "launch", "--config_file", str(LAUNCH / "accelerate" / "cpu_ddp2.yaml"),
                      "--main_process_port", str(free_port()), TRAIN_PY, *smoke(run_dir, cache_dir)], tmp_path, env)
        proc.wait(240)
    finally:
        owner.kill()
        owner.wait(10)
    out = output(proc)
    line = f"error: run_dir={run_dir} is in use by a live run (pid {owner.pid} on host {socket.gethostname()}"
    assert proc.returncode != 0 and out.count(line) == 2, out[-4000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
