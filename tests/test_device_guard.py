"""The step guard on the device: with fused AdamW the skip is the fused kernel's found_inf,
and the host catches up (warnings, counters, halts) only when the loop syncs anyway."""
import math

import pytest
import torch

from conftest import read_metrics, run_training, series
from gptlab.guards import StepGuard, TrainingHalted, _step_unless
from test_faults import NAN, Probe, smoke as faults_smoke


def smoke(*args):
    return faults_smoke(*args, "optim=adamw")  # the device path is fused AdamW's found_inf


def count_flushes(monkeypatch):
    calls = []
    real = StepGuard.flush

    def flush(self):
        calls.append(self.on_device)
        return real(self)
    monkeypatch.setattr(StepGuard, "flush", flush)
    return calls


def test_device_guard_syncs_only_at_log_and_eval(tmp_path, cache_dir, monkeypatch):
    probe = Probe(monkeypatch, {3: NAN})
    flushes = count_flushes(monkeypatch)
    result = run_training(smoke(tmp_path / "b", cache_dir, "trainer.max_steps=8", "trainer.eval_every=8",
                                "trainer.log_every=4"))
    assert flushes == [True, True]  # steps 4 and 8: the device path, two host syncs in eight steps
    probe.assert_same(3, 4)  # the NaN step left weights and optimizer state alone
    probe.assert_moved(2, 3)
    probe.assert_moved(4, 5)
    rows = read_metrics(tmp_path / "b")
    assert series(rows, "train/skipped_steps") == [(4, 1), (8, 1)]
    assert math.isfinite(dict(series(rows, "train/loss"))[4])  # the mean over the 3 updates taken
    assert "step 3: update skipped: non-finite loss nan" in (tmp_path / "b" / "train.log").read_text()
    assert math.isfinite(result["eval/loss"])


def test_device_guard_without_faults_equals_the_host_guard(tmp_path, cache_dir, monkeypatch, one_thread):
    host = run_training(smoke(tmp_path / "host", cache_dir, "trainer.max_steps=8", "trainer.log_every=4",
                              "trainer.spike_zscore=1000"))  # spike detection keeps the host path
    flushes = count_flushes(monkeypatch)
    device = run_training(smoke(tmp_path / "dev", cache_dir, "trainer.max_steps=8", "trainer.log_every=4"))
    assert set(flushes) == {True}
    assert device["eval/loss"] == host["eval/loss"] and device["train/loss"] == host["train/loss"]


def test_device_guard_stop_saves_the_state_before_the_fault(tmp_path, cache_dir, monkeypatch):
    probe = Probe(monkeypatch, {3: NAN})
    with pytest.raises(TrainingHalted, match=r"^step 3: non-finite loss nan or grad norm nan "
                                             r"\(trainer\.nonfinite=stop\); the state after step 2 is saved in "):
        run_training(smoke(tmp_path, cache_dir, "trainer.max_steps=8", "trainer.log_every=4",
                           "trainer.nonfinite=stop"))
    assert probe.calls == 4  # step 4 ran before the sync at step 4, but its update was rejected
    probe.assert_same(3, 4)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors"))
    weights, _ = probe.snapshots[3]
    assert all(torch.equal(saved[k], weights[k]) for k in saved)


def test_device_guard_max_skips_freezes_from_the_halt(tmp_path, cache_dir, monkeypatch):
    probe = Probe(monkeypatch, {2: NAN, 3: NAN})
    with pytest.raises(TrainingHalted, match=r"^step 3: 2 updates skipped in a row .*the state after step 3 is saved"):
        run_training(smoke(tmp_path, cache_dir, "trainer.max_steps=8", "trainer.log_every=4",
                           "trainer.max_skips=2"))
    assert probe.calls == 4
    probe.assert_same(2, 4)  # step 4 was finite, but the device had frozen the state at the halt


def test_found_inf_under_a_grad_scaler():
    """fp16: the guard's verdict joins the scaler's own overflow record for the fused step."""
    from types import SimpleNamespace

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    class Wrapped:  # what accelerate's AcceleratedOptimizer.step does under a scaler
        optimizer = opt

        def step(self):
            scaler.step(opt)
            scaler.update()

    acc = SimpleNamespace(scaler=scaler)
    for reject, moved, scale in ((True, False, 2.0**15), (False, True, 2.0**15)):
        before = p.detach().clone()
        scaler.scale(p.sum()).backward()
        scaler.unscale_(opt)
        _step_unless(Wrapped(), torch.tensor(reject), acc)
        opt.zero_grad()
        assert (not torch.equal(before, p.detach())) == moved and scaler.get_scale() == scale
    assert opt.state[p]["step"].item() == 1  # the rejected update did not count


def test_which_path_the_guard_takes():
    p = [torch.nn.Parameter(torch.ones(2))]
    fused, plain = torch.optim.AdamW(p, fused=True), torch.optim.AdamW(p, foreach=False)
    assert StepGuard(optimizer=fused).on_device and StepGuard(optimizer=torch.optim.Adam(p, fused=True)).on_device
    assert not StepGuard(optimizer=plain).on_device  # no found_inf in the unfused kernels
    assert not StepGuard(optimizer=fused, spike_zscore=3.0).on_device  # spikes need the losses on the host
    assert not StepGuard().on_device
