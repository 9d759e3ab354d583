"""Reference curves (as torchtitan keeps them): a fixed smoke run's train and eval losses,
stored in tests/assets/reference_curves.json and compared exactly, so a silent change to
the loop's numerics fails here. The run is also where the HParams records are read back.

When a change is meant to alter the numbers, regenerate the asset and review its diff:

    python -m tests.regen curves

Every setting that shapes the numbers is pinned below, defaults included, so a change of a
default elsewhere (another optimizer, another warmup) does not move the reference. The
corpus is generated here, not read from the installed Python. Exactness needs one CPU
thread and this environment's torch; on another machine, regenerate first.
"""
import json
import tempfile
from pathlib import Path

import pytest

from conftest import run_training

ASSET = Path(__file__).resolve().parent / "assets" / "reference_curves.json"
COMMON = [
    "model=small", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.n_positions=128",
    "model.dropout=0.0", "model.attn_implementation=sdpa", "model.vocab_pad_multiple=64",
    "model.arch=gpt2", "model.tie_embeddings=true", "model.activation=gelu_pytorch_tanh", "model.zero_init_proj=false",
    "model.init_std=null",
    "trainer.ema_decay=0.0",
    "data=text", "data.text_unit=paragraph", "data.pack=concat", "data.block_size=64",
    "tokenizer=bpe", "tokenizer.vocab_size=512", "tokenizer.min_frequency=2", "tokenizer.max_train_bytes=null",
    "loss=cross_entropy",
    "trainer.micro_batch_size=4", "trainer.grad_accum=1", "trainer.max_steps=8", "trainer.eval_every=4",
    "trainer.log_every=1", "trainer.max_grad_norm=1.0", "trainer.mixed_precision=no", "trainer.cpu_threads=1",
    "trainer.compile=false", "trainer.sample_prompts=[]", "trainer.save_every=0",
    "seed=1337",
]
RECIPES = {
    "adamw_cosine": ["optim=adamw", "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]",
                     "optim.eps=1e-8", "scheduler=cosine", "scheduler.warmup_steps=2", "scheduler.min_lr=1e-4"],
    # Muon + WSD, every value pinned (the from-scratch default adds Muon's momentum warmup and splits Q, K, V)
    "muon_wsd": ["optim=muon", "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.betas=[0.9,0.95]", "optim.eps=1e-8",
                 "optim.muon_lr=2e-3", "optim.muon_weight_decay=0.1", "optim.momentum=0.95", "optim.ns_steps=5",
                 "optim.momentum_warmup_steps=0", "optim.muon_split_qkv=false",
                 "scheduler=wsd", "scheduler.warmup_steps=2", "scheduler.min_lr=1e-4",
                 "scheduler.decay_fraction=0.2", "scheduler.decay=linear"],
}
# Tolerance per recipe: fp32 AdamW to 1e-5 nats: exact on the machine that wrote the reference
# (json round-trips floats exactly), but another CPU's fp32 kernels round differently: an Intel
# Xeon moved a train/loss of the AMD EPYC's reference by one float32 ulp (9.5e-7). Muon's
# Newton–Schulz runs in bf16, whose CPU kernels round differently with and without native bf16
# (AVX512-BF16 or emulated), so its curve is held to 1e-4 nats.
TOLERANCE = {"adamw_cosine": 1e-5, "muon_wsd": 1e-4}
CURVES = ("train/loss", "eval/loss")


def write_corpus(directory: Path) -> list[str]:
    """Python-like paragraphs with a learnable pattern; the same bytes on every machine."""
    def paragraphs(start, stop):
        return "\n\n".join(f"def f{i}(x, y={i % 7}):\n    return x * {i % 5} + y - {i % 3}" for i in range(start, stop))

    (directory / "train.txt").write_text(paragraphs(0, 900) + "\n")
    (directory / "valid.txt").write_text(paragraphs(900, 1000) + "\n")
    return [f"data.files=[{directory / 'train.txt'}]", f"data.valid_files=[{directory / 'valid.txt'}]"]


def reference_run(directory: Path, recipe: str) -> dict:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        corpus = write_corpus(directory)
        run_dir = directory / recipe
        run_training([*COMMON, *RECIPES[recipe], *corpus, f"run_dir={run_dir}", f"cache_dir={directory / 'cache'}"])
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": run_dir,
            "curves": {k: [[r["step"], r[k]] for r in rows if k in r] for k in CURVES}}


def write_reference() -> Path:
    with tempfile.TemporaryDirectory() as d:
        curves = {recipe: reference_run(Path(d), recipe)["curves"] for recipe in RECIPES}
    ASSET.parent.mkdir(exist_ok=True)
    ASSET.write_text(json.dumps({"regenerate": "python -m tests.regen curves", "common": COMMON, "recipes": RECIPES,
                                 "curves": curves}, indent=1) + "\n")
    return ASSET


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, one_thread):
    directory = tmp_path_factory.mktemp("reference")
    return {recipe: reference_run(directory, recipe) for recipe in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_fresh_run_reproduces_the_reference_curves(fresh, recipe):
    reference = json.loads(ASSET.read_text())
    assert (reference["common"], reference["recipes"]) == (COMMON, RECIPES), (
        "the reference config changed: python -m tests.regen curves")
    want, got = reference["curves"][recipe], fresh[recipe]["curves"]
    assert [s for s, _ in want["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in want["eval/loss"]] == [4, 8]
    for key in CURVES:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]]
        worst = max(abs(a - b) for (_, a), (_, b) in zip(got[key], want[key]))
        assert worst <= TOLERANCE[recipe], (
            f"{recipe} {key} moved from the reference by {worst}; if meant, run `python -m tests.regen curves`")


def test_hparams_hold_the_resolved_config_and_final_metrics(fresh):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    fresh = fresh["adamw_cosine"]
    events = EventAccumulator(str(fresh["run_dir"] / "tb"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/loss", "eval/perplexity", "eval/bpb",
                                                             "train/tokens_per_s"]
    hp = start.hparams
    assert hp["optim.lr"].number_value == 1e-3
    assert hp["model.n_embd"].number_value == 32
    assert hp["optim.name"].string_value == "adamw" and hp["scheduler.name"].string_value == "cosine"
    assert hp["optim.betas"].string_value == "[0.9, 0.95]"
    assert hp["model.pretrained_path"].string_value == "null"
    assert hp["run_dir"].string_value == str(fresh["run_dir"])
    # the metrics the HParams tab shows are the run's last scalars of those names
    final_eval = fresh["curves"]["eval/loss"][-1]
    assert events.Scalars("eval/loss")[-1].step == final_eval[0]
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(final_eval[1], rel=1e-6)  # stored as float32
    assert events.Scalars("train/tokens_per_s")[-1].step == 8 and events.Scalars("train/tokens_per_s")[-1].value > 0
