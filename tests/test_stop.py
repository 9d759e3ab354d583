"""python -m gptlab.stop: the run saves, then the launcher and its workers exit 0."""
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_metrics
from test_launch import ACCELERATE, LAUNCH, TRAIN_PY, corpus, finish, launch_env, output, start  # noqa: F401


def wait_for_step(run_dir, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and read_metrics(run_dir):
            return
        assert proc.poll() is None, output(proc)[-4000:]
        time.sleep(0.5)
    pytest.fail(f"no step logged in {timeout} s:\n{output(proc)[-4000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_stop_waits_for_the_save_and_the_launcher_exits_0(tmp_path, corpus, cache_dir, launch_env, processes):
    run_dir = tmp_path / "run"
    launcher = ["--config_file", str(LAUNCH / "accelerate" / "cpu.yaml"), "--num_processes", str(processes)]
    launcher += ["--multi_gpu"] if processes > 1 else []
    proc = start([ACCELERATE, "launch", *launcher, TRAIN_PY, "debug=smoke", f"data.paths=[{corpus}]",
                  "data.valid_fraction=0.1", f"cache_dir={cache_dir}", f"run_dir={run_dir}", "trainer.max_steps=100000",
                  "trainer.eval_every=100000", "trainer.save_every=0", "trainer.log_every=2"], ROOT, launch_env)
    wait_for_step(run_dir, proc)
    stopper = subprocess.run([sys.executable, "-m", "gptlab.stop", str(run_dir)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert stopper.returncode == 0, stopper.stderr
    assert proc.poll() is None or proc.returncode == 0  # saved before the workers are gone
    finish([proc], timeout=60)  # the launcher exits 0
    step = read_metrics(run_dir)[-1]["step"]
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    assert stopper.stdout.strip() == f"stopped; latest checkpoint {ckpt}; continue with resume=auto run_dir={run_dir}"
    assert (ckpt / "trainer_state.json").is_file() and not (run_dir / "run.lock").exists()
    assert "stopped by SIGTERM" in (run_dir / "train.log").read_text()
    assert f"{processes} process(es)" in (run_dir / "train.log").read_text()


def test_stop_without_a_live_run_says_so(tmp_path):
    from gptlab.stop import stop

    with pytest.raises(SystemExit, match=r"^error: no live run in .* \(no run.lock held\)$"):
        stop(tmp_path)
    (tmp_path / "run.lock").write_text('{"host": "h", "pid": 1}\n')  # left by a killed run: nobody holds it
    with pytest.raises(SystemExit, match="no live run"):
        stop(tmp_path)
