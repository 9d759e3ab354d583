"""Exact resume: after a stop, a SIGKILL during training or during a save, and with 2 processes.

Every test compares against one uninterrupted reference run of the same config: the
train/loss and eval/loss of every step and the final weights must be bit-identical (CPU).
The config is chosen so the interesting cases happen: an epoch is 3 optimizer steps, so
the resume points (2, 4, 5) are mid-epoch and the resumed parts cross epoch boundaries;
grad_accum=2; dropout 0.1, so the restored RNG state matters.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, final_weights, free_port, read_metrics, run_stopped_at, run_training, series

STEPS = 8
# Bit-exact comparisons need every run, in this process and in subprocesses, to use the same
# number of threads; one thread is also far faster than spin-waiting OpenMP on shared cores.
THREADS = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(cache_dir, tiny_corpus):
    return [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
            "tokenizer.vocab_size=384", "trainer.micro_batch_size=20", "trainer.grad_accum=2",
            "model.dropout=0.1", f"trainer.max_steps={STEPS}", "trainer.eval_every=2", "trainer.save_every=2",
            "trainer.keep_last=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base):
    run_dir = tmp_path_factory.mktemp("reference")
    run_training([f"run_dir={run_dir}", *base])
    return run_dir


def tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))  # every event file, in order, honouring purge steps
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_same_run(run_dir, reference):
    """Same logged numbers for every step, each step exactly once, and the same final weights."""
    ours, ref = read_metrics(run_dir), read_metrics(reference)
    for key in ("train/loss", "train/lr", "train/grad_norm", "eval/loss"):
        assert series(ours, key) == series(ref, key), key  # exact float equality
    assert [s for s, _ in series(ours, "train/loss")] == list(range(1, STEPS + 1))
    tb = tb_scalars(run_dir, "train/loss")
    assert [s for s, _ in tb] == list(range(1, STEPS + 1))
    assert tb == tb_scalars(reference, "train/loss")
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def latest_state(run_dir):
    from gptlab.checkpoint_format import list_checkpoints
    return json.loads((list_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())


def test_stop_and_resume_is_exact(tmp_path, base, reference):
    """Run B stops at step 5 (mid-epoch, SIGTERM in-process) and resumes to 8: identical to A."""
    run_stopped_at(5, [f"run_dir={tmp_path}", *base])
    assert not (tmp_path / "final").exists()
    state = latest_state(tmp_path)
    assert state["step"] == 5 and state["data_position"]["optimizer_step"] == 5
    assert 1 < state["epoch"] < 2  # mid-epoch: 3 steps an epoch
    assert [s for s, _ in series(read_metrics(tmp_path), "train/loss")] == [1, 2, 3, 4, 5]

    run_training([f"run_dir={tmp_path}", *base, "resume=auto"])
    assert latest_state(tmp_path)["epoch"] > 2  # the resumed part crossed an epoch boundary
    assert_same_run(tmp_path, reference)


def test_resume_from_an_explicit_checkpoint_path(tmp_path, base, reference):
    """resume=PATH continues in the checkpoint's run directory (run_dir is not needed)."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = run_dir / "checkpoints" / "step_0000006"
    run_training([*base, f"resume={ckpt}"])
    # step 8 was newer than the resume point: it was set aside, then written again
    assert (run_dir / "checkpoints" / "step_0000008.superseded").is_dir()
    assert_same_run(run_dir, reference)


def _launch(cmd, env, marker=None, timeout=300):
    """Start a training subprocess; with a marker, return once the fault point is reached."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **THREADS, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if marker is None:
        return proc
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} before the fault point:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the fault point was never reached")
        time.sleep(0.05)
    return proc


HARNESS = [sys.executable, str(ROOT / "tests" / "fault_harness.py")]


def test_sigkill_during_training_then_resume_auto(tmp_path, base, reference):
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *base, "trainer.save_every=4"]
    proc = _launch(HARNESS + overrides, {"GPTLAB_FAULT": "pause_in_step:7", "GPTLAB_FAULT_MARKER": str(marker)},
                   marker)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # the crash left step_0000004 and the log of steps 5 and 6, which the resumed run supersedes
    assert latest_state(run_dir)["step"] == 4
    assert [s for s, _ in series(read_metrics(run_dir), "train/loss")] == list(range(1, 7))

    run_training([*overrides, "resume=auto"])
    assert_same_run(run_dir, reference)


def test_sigkill_while_writing_a_checkpoint_then_resume_auto(tmp_path, base, reference):
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *base]
    proc = _launch(HARNESS + overrides, {"GPTLAB_FAULT": "pause_in_save:4", "GPTLAB_FAULT_MARKER": str(marker)},
                   marker)
    partial = run_dir / "checkpoints" / ".tmp-step_0000004"
    assert (partial / "model.safetensors").is_file()  # the kill lands with the save half done
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "checkpoints" / "step_0000004").exists()
    assert latest_state(run_dir)["step"] == 2

    run_training([*overrides, "resume=auto"])
    assert not partial.exists()  # cleaned up on resume
    assert_same_run(run_dir, reference)


def test_sigterm_saves_and_exits_zero_then_resume_is_exact(tmp_path, base, reference):
    """What SLURM sends before preemption: the trainer finishes the step, saves and exits 0."""
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *base]
    proc = _launch(HARNESS + overrides, {"GPTLAB_FAULT": "pause_in_step:5", "GPTLAB_FAULT_MARKER": str(marker)},
                   marker)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert "stop requested (SIGTERM): saving a checkpoint and stopping" in (run_dir / "train.log").read_text()
    assert latest_state(run_dir)["step"] == 5  # save_every=2, so this one exists only because of the signal
    assert not (run_dir / "final").exists()

    run_training([*overrides, "resume=auto"])
    assert_same_run(run_dir, reference)


def _launch_2proc(script, overrides, env=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(script), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **THREADS, **(env or {})}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_processes_stop_and_resume_is_exact(tmp_path, base):
    """2 CPU processes over gloo: SIGTERM reaches rank 1 only, both stop at step 4 and save; resume exact."""
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    two = [*base, "trainer.grad_accum=1"]  # 2 processes x accum 1: the same global batch as above
    _launch_2proc(ROOT / "train.py", [f"run_dir={ref}", *two])
    assert latest_state(ref)["world_size"] == 2

    _launch_2proc(ROOT / "tests" / "fault_harness.py", [f"run_dir={run_dir}", *two],
                  {"GPTLAB_FAULT": "sigterm_in_step:4:1"})
    state = latest_state(run_dir)
    assert state["step"] == 4 and state["world_size"] == 2
    assert (run_dir / "checkpoints" / "step_0000004" / "random_states_1.pkl").is_file()
    assert not (run_dir / "final").exists()

    _launch_2proc(ROOT / "train.py", [f"run_dir={run_dir}", *two, "resume=auto"])
    assert latest_state(run_dir)["world_size"] == 2
    assert_same_run(run_dir, ref)

    # A checkpoint written under DDP stores the model's own names (not DDP's "module."), so
    # from_pretrained loads the trained weights, not a random model with a warning.
    from transformers import AutoModelForCausalLM
    last = max((ref / "checkpoints").glob("step_*"))
    loaded = AutoModelForCausalLM.from_pretrained(str(last)).state_dict()
    final = AutoModelForCausalLM.from_pretrained(str(ref / "final")).state_dict()
    assert loaded.keys() == final.keys() and all(torch.equal(loaded[k], final[k]) for k in final)
