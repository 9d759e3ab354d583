"""trainer.ema_decay: the weight average's arithmetic, its exact resume after SIGKILL, the
evaluation of both weights and the export of the average."""
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import final_weights, read_metrics, run_training, series
from test_resume import HARNESS, _launch, latest_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_average_follows_its_formula_and_a_rejected_step_leaves_it():
    from gptlab.ema import WeightAverage, decay_at

    model = torch.nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for t, reject in ((1, False), (2, True), (3, False), (40, False)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(t, torch.tensor(reject))
        if not reject:
            d = min(0.9, (1 + t) / (10 + t))
            assert d == decay_at(0.9, t)
            expected = [e + (1 - d) * (p.detach() - e) for e, p in zip(expected, model.parameters())]
        for a, e in zip(ema.average, expected):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    own = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), ema.average))
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), own))  # exactly its own weights again
    again = WeightAverage(model, 0.9)
    again.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.average, ema.average))


@pytest.fixture(scope="module")
def ema_base(cache_dir, tiny_corpus):
    return [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
            "tokenizer.vocab_size=384", "trainer.micro_batch_size=20", "trainer.grad_accum=2", "model.dropout=0.1",
            "trainer.max_steps=8", "trainer.eval_every=2", "trainer.save_every=4", "trainer.ema_decay=0.8"]


@pytest.fixture(scope="module")
def ema_reference(tmp_path_factory, ema_base):
    run_dir = tmp_path_factory.mktemp("ema_reference")
    run_training([f"run_dir={run_dir}", *ema_base])
    return run_dir


def test_both_weights_are_evaluated_and_final_is_the_average(ema_reference, ema_base, tmp_path):
    from gptlab.evaluate import main as evaluate_main

    rows = read_metrics(ema_reference)
    raw, averaged = dict(series(rows, "eval/loss")), dict(series(rows, "eval/ema_loss"))
    assert list(raw) == list(averaged) == [2, 4, 6, 8] and all(raw[s] != averaged[s] for s in raw)
    last = ema_reference / "checkpoints" / "step_0000008"
    average = load_file(str(last / "weight_average.safetensors"))
    final, trained = final_weights(ema_reference), load_file(str(last / "model.safetensors"))
    assert set(average) == set(trained) - {"lm_head.weight"}  # tied to the token embedding
    for name, a in average.items():
        assert torch.equal(final[name], a), name
    assert not torch.equal(final["transformer.h.0.mlp.c_fc.weight"], trained["transformer.h.0.mlp.c_fc.weight"])
    # eval/ema_loss is the export's loss, scored independently by the evaluate CLI
    result = evaluate_main([str(ema_reference / "final")])  # the run's own data config
    assert result["loss"] == pytest.approx(averaged[8], abs=1e-5)

    run_training([f"run_dir={tmp_path}", *ema_base, "trainer.ema_export=false"])
    assert final_weights(tmp_path).keys() == trained.keys()
    for name, w in final_weights(tmp_path).items():
        assert torch.equal(w, trained[name]), name


def test_sigkill_then_resume_auto_is_exact_with_the_average(tmp_path, ema_base, ema_reference):
    marker, run_dir = tmp_path / "marker", tmp_path / "run"
    overrides = [f"run_dir={run_dir}", *ema_base]
    proc = _launch(HARNESS + overrides, {"GPTLAB_FAULT": "pause_in_step:7", "GPTLAB_FAULT_MARKER": str(marker)},
                   marker)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert latest_state(run_dir)["step"] == 4

    run_training([*overrides, "resume=auto"])
    ours, ref = read_metrics(run_dir), read_metrics(ema_reference)
    for key in ("train/loss", "eval/loss", "eval/ema_loss"):
        assert series(ours, key) == series(ref, key), key  # exact float equality
    a, b = final_weights(run_dir), final_weights(ema_reference)
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_resuming_a_checkpoint_without_an_average_says_so(tmp_path, ema_base):
    from gptlab.errors import CheckpointError

    plain = [b for b in ema_base if not b.startswith("trainer.ema_decay")]
    run_training([f"run_dir={tmp_path}", *plain, "trainer.max_steps=4"])
    with pytest.raises(CheckpointError, match=r"step_0000004 holds no weight average, and this run has "
                                              r"trainer.ema_decay=0.8: resume it with trainer.ema_decay=0"):
        run_training([f"run_dir={tmp_path}", *ema_base, "resume=auto"])
