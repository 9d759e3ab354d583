"""The step guard decides on the device and the host hears of it at log steps: a skipped update
leaves weights and optimizer state as they were, for every optimizer, and between log steps a
run reads nothing back from the device (tests/host_reads.py counts what would be a GPU sync)."""
import math

import pytest
import torch

from conftest import read_metrics, run_training, series
from gptlab.guards import StepGuard, TrainingHalted
from host_reads import cpu_fp16_scaler, reads_per_step
from test_faults import NAN, Probe, smoke


def count_flushes(monkeypatch):
    calls = []
    real = StepGuard.flush

    def flush(self):
        calls.append(1)
        return real(self)
    monkeypatch.setattr(StepGuard, "flush", flush)
    return calls


@pytest.mark.parametrize("optim", ["muon", "adamw", "adafactor"])
def test_a_skip_costs_no_sync_and_leaves_the_state_alone(tmp_path, cache_dir, monkeypatch, optim):
    probe = Probe(monkeypatch, {3: NAN})
    flushes = count_flushes(monkeypatch)
    result = run_training(smoke(tmp_path / "b", cache_dir, f"optim={optim}", "trainer.max_steps=8",
                                "trainer.eval_every=8", "trainer.log_every=4"))
    assert len(flushes) == 2  # steps 4 and 8: two host reads in eight steps
    probe.assert_same(3, 4)  # the NaN step left weights and optimizer state alone
    probe.assert_moved(2, 3)
    probe.assert_moved(4, 5)
    rows = read_metrics(tmp_path / "b")
    assert series(rows, "train/skipped_steps") == [(4, 1), (8, 1)]
    assert math.isfinite(dict(series(rows, "train/loss"))[4])  # the mean over the 3 updates taken
    assert "step 3: update skipped: non-finite loss nan" in (tmp_path / "b" / "train.log").read_text()
    assert math.isfinite(result["eval/loss"])


def test_a_spike_check_that_never_fires_changes_nothing(tmp_path, cache_dir, one_thread):
    plain = run_training(smoke(tmp_path / "plain", cache_dir, "trainer.max_steps=8", "trainer.log_every=4"))
    spiky = run_training(smoke(tmp_path / "spiky", cache_dir, "trainer.max_steps=8", "trainer.log_every=4",
                               "trainer.spike_zscore=1000", "trainer.spike_window=2"))
    assert spiky["eval/loss"] == plain["eval/loss"] and spiky["train/loss"] == plain["train/loss"]


def test_stop_saves_the_state_before_the_fault(tmp_path, cache_dir, monkeypatch):
    probe = Probe(monkeypatch, {3: NAN})
    with pytest.raises(TrainingHalted, match=r"^step 3: non-finite loss nan or grad norm nan "
                                             r"\(trainer\.nonfinite=stop\); the state after step 2 is saved in "):
        run_training(smoke(tmp_path, cache_dir, "trainer.max_steps=8", "trainer.log_every=4",
                           "trainer.nonfinite=stop"))
    assert probe.calls == 4  # step 4 ran before the read at step 4, but its update was rejected
    probe.assert_same(3, 4)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors"))
    weights, _ = probe.snapshots[3]
    assert all(torch.equal(saved[k], weights[k]) for k in saved)


def test_max_skips_freezes_from_the_halt(tmp_path, cache_dir, monkeypatch):
    probe = Probe(monkeypatch, {2: NAN, 3: NAN})
    with pytest.raises(TrainingHalted, match=r"^step 3: 2 updates skipped in a row .*the state after step 3 is saved"):
        run_training(smoke(tmp_path, cache_dir, "trainer.max_steps=8", "trainer.log_every=4",
                           "trainer.max_skips=2"))
    assert probe.calls == 4
    probe.assert_same(2, 4)  # step 4 was finite, but the device had frozen the state at the halt


CASES = {"muon": ["optim=muon"], "adamw": ["optim=adamw"], "adam": ["optim=adam"], "adafactor": ["optim=adafactor"],
         "muon+fp16": ["optim=muon", "trainer.mixed_precision=fp16"],
         "adamw+fp16": ["optim=adamw", "trainer.mixed_precision=fp16"],
         "keytoken": ["loss=keytoken", "loss.keywords=[def,return]", "loss.normalize=true"],
         "sample": ["data.pack=sample", "trainer.micro_batch_size=2"]}


@pytest.mark.parametrize("case", CASES)
def test_no_host_reads_between_log_steps(tmp_path, cache_dir, case):
    """Each step but a log step reads nothing back: not the optimizer, not the guard, not the
    model's forward (transformers' packed-sequence check), not GradScaler.step, not the stop flag."""
    undo = cpu_fp16_scaler() if case.endswith("fp16") else (lambda: None)
    try:
        per_step = reads_per_step(run_training, smoke(tmp_path, cache_dir, "trainer.max_steps=8",
                                                      "trainer.log_every=4", "trainer.eval_every=8",
                                                      "trainer.save_every=0", "trainer.sample_prompts=[]",
                                                      *CASES[case]))
    finally:
        undo()
    assert sorted(per_step) == list(range(1, 9))
    quiet = {t: v for t, v in per_step.items() if t % 4}
    assert all(n == 0 for n, _ in quiet.values()), quiet
    assert all(n > 0 for t, (n, _) in per_step.items() if not t % 4)  # the log steps do read (the loss)


@pytest.mark.slow
def test_no_host_reads_between_log_steps_on_two_processes(tmp_path, cache_dir):
    """DDP over gloo: the stop flag is agreed on at log steps only, the guard reduces on the device."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    out = tmp_path / "reads.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "host_reads.py"), str(out),
           *smoke(tmp_path / "run", cache_dir, "trainer.max_steps=8", "trainer.log_every=4", "trainer.eval_every=8",
                  "trainer.save_every=0", "trainer.sample_prompts=[]", "trainer.micro_batch_size=2")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in (tmp_path / "run" / "train.log").read_text()
    for rank in (0, 1):
        per_step = {int(t): n for t, (n, _) in json.loads(out.with_name(f"reads.json.rank{rank}").read_text()).items()}
        assert sorted(per_step) == list(range(1, 9))
        assert {t: n for t, n in per_step.items() if t % 4} == {t: 0 for t in (1, 2, 3, 5, 6, 7)}, per_step
