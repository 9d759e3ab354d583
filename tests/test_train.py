"""End-to-end runs of the real config on the embedded corpus, composed through Hydra."""
import math
import subprocess
import sys

import pytest
import torch

from omegaconf import OmegaConf

from conftest import ROOT, compose, final_weights, read_metrics, run_training, series


def smoke(tmp_path, cache_dir, *extra):
    return [f"run_dir={tmp_path}", f"cache_dir={cache_dir}", "debug=smoke", *extra]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("smoke")
    cfg = compose(smoke(run_dir, cache_dir))
    composed = OmegaConf.to_yaml(cfg)
    result = run_training(cfg=cfg)
    assert OmegaConf.to_yaml(cfg) == composed, "run() wrote into the composed config"
    return run_dir, result


def test_smoke_run_writes_metrics_and_tensorboard(smoke_run):
    run_dir, result = smoke_run
    rows = read_metrics(run_dir)
    losses = series(rows, "train/loss")
    assert [s for s, _ in losses] == list(range(1, 9))
    assert all(math.isfinite(v) for _, v in losses)
    assert [s for s, _ in series(rows, "eval/perplexity")] == [4, 8]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"):
        assert series(rows, key), key
    ppl = series(rows, "eval/perplexity")[-1][1]
    assert ppl == pytest.approx(math.exp(series(rows, "eval/loss")[-1][1]))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "eval/perplexity", "train/lr"} <= set(tags)
    tb_losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb_losses] == [s for s, _ in losses]
    assert [v for _, v in tb_losses] == pytest.approx([v for _, v in losses])
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()


def test_the_saved_config_records_what_the_launch_decided(smoke_run):
    saved = OmegaConf.load(smoke_run[0] / ".hydra" / "config.yaml")
    composed = compose(smoke(smoke_run[0], "unused"))
    assert (composed.optim.name, composed.optim.lr, composed.optim.betas, composed.trainer.grad_accum) == (
        "auto", None, None, None)
    assert (saved.optim.name, saved.optim.lr, saved.optim.betas, saved.trainer.grad_accum) == ("muon", 3e-3, [0.8, 0.99], 1)


def test_lr_follows_the_schedule_in_optimizer_steps(smoke_run):
    from gptlab.config import SchedulerConfig
    from gptlab.schedule import make_schedule

    rows = read_metrics(smoke_run[0])
    # the default: WSD at optim=auto's lr from scratch, 3e-3, to a tenth of it
    schedule = make_schedule(SchedulerConfig(name="wsd", warmup_steps=2, min_lr=3e-4, decay_fraction=0.2), 3e-3, 8)
    for step, lr in series(rows, "train/lr"):
        assert lr == pytest.approx(schedule(step))
    assert series(rows, "train/lr")[-1][1] == pytest.approx(3e-4)


def test_final_export_loads_and_generates(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    final = smoke_run[0] / "final"
    assert (final / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    assert model.config.vocab_size == len(tok) == 512
    assert model.config.eos_token_id == tok.eos_token_id
    gen = pipeline("text-generation", model=str(final))
    out = gen("def ", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("def ") and len(out) > len("def ")


def test_same_seed_same_losses(smoke_run, tmp_path, cache_dir):
    again = run_training(smoke(tmp_path, cache_dir))
    assert series(read_metrics(tmp_path), "train/loss") == series(read_metrics(smoke_run[0]), "train/loss")
    assert again["eval/loss"] == smoke_run[1]["eval/loss"]


def test_grad_accumulation_equals_one_big_batch(tmp_path, cache_dir):
    # Adam's first update is about lr * g / |g|, which blows float summation-order noise
    # in near-zero gradients up to full size; a large eps keeps the update linear in g.
    # (AdamW: Muon's bf16 Newton-Schulz is compared to 1e-5 in test_muon)
    common = ["optim=adamw", "trainer.max_steps=1", "trainer.max_grad_norm=0", "optim.weight_decay=0.1",
              "optim.eps=1e-3"]
    run_training(smoke(tmp_path / "accum", cache_dir, *common, "trainer.micro_batch_size=2", "trainer.grad_accum=4"))
    run_training(smoke(tmp_path / "big", cache_dir, *common, "trainer.micro_batch_size=8", "trainer.grad_accum=1"))
    a, b = final_weights(tmp_path / "accum"), final_weights(tmp_path / "big")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # and the step really moved the weights (so the equality is not vacuous)
    run_training(smoke(tmp_path / "other", cache_dir, *common, "trainer.micro_batch_size=2", "trainer.grad_accum=1"))
    init = final_weights(tmp_path / "other")
    assert any(not torch.allclose(a[k], init[k], atol=1e-6) for k in a)


KEYTOKEN = ["loss=keytoken", "loss.keywords=[def,return,self,import]", "loss.alpha=0.5", "loss.normalize=true"]


def test_normalised_keytoken_loss_is_the_same_however_the_batch_is_split(tmp_path, cache_dir, one_thread):
    """loss.normalize divides by the mean weight of the whole optimizer step, not of each micro-batch:
    4 micro-batches of 2 equal one batch of 8 (the loss logged and the weights, to 1e-5)."""
    common = [*KEYTOKEN, "optim=adamw", "trainer.max_steps=3", "trainer.log_every=1", "trainer.max_grad_norm=0",
              "optim.eps=1e-3", "trainer.sample_prompts=[]"]
    run_training(smoke(tmp_path / "accum", cache_dir, *common, "trainer.micro_batch_size=2", "trainer.grad_accum=4"))
    run_training(smoke(tmp_path / "big", cache_dir, *common, "trainer.micro_batch_size=8", "trainer.grad_accum=1"))
    a, b = series(read_metrics(tmp_path / "accum"), "train/loss"), series(read_metrics(tmp_path / "big"), "train/loss")
    assert [s for s, _ in a] == [1, 2, 3] and all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)
    wa, wb = final_weights(tmp_path / "accum"), final_weights(tmp_path / "big")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_normalised_keytoken_loss_on_two_processes_equals_one_to_the_gradient_scale(tmp_path, cache_dir):
    """2 processes x 2 micro-batches against 1 x 4, the same global batch of 8. AdamW with eps=1 makes
    the update proportional to the gradient itself, not to its sign: a gradient off by any constant
    factor on one path (the averaging over processes, the micro-step scaling) would show here."""
    import os

    from conftest import free_port

    common = [f"cache_dir={cache_dir}", "debug=smoke", *KEYTOKEN, "optim=adamw", "optim.eps=1.0", "optim.lr=0.5",
              "optim.weight_decay=0", "trainer.max_steps=3", "trainer.log_every=1", "trainer.max_grad_norm=0",
              "trainer.micro_batch_size=2", "trainer.sample_prompts=[]"]
    run_training([f"run_dir={tmp_path / 'one'}", *common, "trainer.grad_accum=4"])
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(free_port()), str(ROOT / "train.py"),
                           f"run_dir={tmp_path / 'two'}", *common, "trainer.grad_accum=2"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in (tmp_path / "two" / "train.log").read_text()
    a, b = series(read_metrics(tmp_path / "one"), "train/loss"), series(read_metrics(tmp_path / "two"), "train/loss")
    assert [s for s, _ in b] == [1, 2, 3] and all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)


def test_loss_falls_when_overfitting_a_tiny_corpus(tmp_path, cache_dir, tiny_corpus):
    run_training(smoke(tmp_path, cache_dir, f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
                       "tokenizer.vocab_size=384", "trainer.max_steps=300", "trainer.log_every=10",
                       "trainer.eval_every=300", "optim.lr=3e-3", "scheduler.warmup_steps=10",
                       "model.n_embd=64", "trainer.micro_batch_size=8"))
    losses = series(read_metrics(tmp_path), "train/loss")
    assert losses[0][1] > math.log(384) - 0.5
    assert losses[-1][1] < 0.5 * math.log(384), losses


@pytest.mark.slow
def test_cli_entry_point(tmp_path, cache_dir):
    """`python train.py debug=smoke` through @hydra.main, from another working directory."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=smoke", f"cache_dir={cache_dir}",
                           "run_dir=rel_run", "trainer.max_steps=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "rel_run"  # relative paths resolve against the launch directory
    assert (run_dir / "final" / "config.json").is_file()
    assert "sample for" in proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()
