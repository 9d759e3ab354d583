"""One decision of the tokenizer for prepare and train; the BPE's training sample cap."""
import json
import os
import subprocess
import sys

from conftest import ROOT, SHARED, compose, requires_shared, run_training

TINY_GPT2 = SHARED / "models" / "tiny-random-gpt2"


def builds(cache):
    path = cache / "builds.log"
    return [json.loads(line)["stage"] for line in path.read_text().splitlines()] if path.exists() else []


def prepare_cli(tmp_path, overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "gptlab.data.prepare", *overrides], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


@requires_shared
def test_prepare_then_train_builds_nothing_new(tmp_path, tiny_corpus):
    cache = tmp_path / "cache"
    overrides = [f"cache_dir={cache}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
                 f"model.pretrained_path={TINY_GPT2}"]
    prepare_cli(tmp_path, overrides)
    assert builds(cache) == ["splits", "tokens"]  # the model's own tokenizer: no BPE trained
    log = (cache / "builds.log").read_text()
    run_training([*overrides, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1", "trainer.eval_every=1",
                  "trainer.sample_prompts=[]"])
    assert (cache / "builds.log").read_text() == log


def test_sample_evenly_is_spread_capped_and_deterministic():
    from gptlab.tokenizer import sample_evenly

    docs = [f"{i:04d}" + "x" * 96 for i in range(100)]  # 100 documents of 100 bytes
    assert list(sample_evenly(docs, 10_000, None)) == docs
    assert list(sample_evenly(docs, 10_000, 10_000)) == docs
    sample = list(sample_evenly(docs, 10_000, 2_500))
    assert [int(d[:4]) for d in sample] == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63, 67, 71,
                                           75, 79, 83, 87, 91, 95, 99]
    assert sample == list(sample_evenly(docs, 10_000, 2_500))
    # an underestimated total: the cap still holds
    assert sum(len(d) for d in sample_evenly(docs, 5_000, 2_500)) == 2_500


def test_max_train_bytes_caps_the_bpe_sample_not_the_tokens(tmp_path, tiny_corpus):
    from gptlab.data.prepare import prepare

    base = ["debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2"]
    full = prepare(compose([*base, "tokenizer.max_train_bytes=null"]), tmp_path / "a", show_progress=False)
    # the default cap is far above this corpus: the same cache key, nothing rebuilt
    again = prepare(compose(base), tmp_path / "a", show_progress=False)
    assert builds(tmp_path / "a") == ["splits", "tokenizers", "tokens"]
    assert again.info["cache_dir"] == full.info["cache_dir"]

    capped = prepare(compose([*base, "tokenizer.max_train_bytes=8000"]), tmp_path / "b", show_progress=False)
    tok_meta = json.loads(next((tmp_path / "b" / "tokenizers").glob("*/meta.json")).read_text())
    full_meta = json.loads(next((tmp_path / "a" / "tokenizers").glob("*/meta.json")).read_text())
    assert 0 < tok_meta["sample_bytes"] <= 8000 < full_meta["sample_bytes"]
    assert tok_meta["sample_documents"] < tok_meta["documents"] == full_meta["documents"]
    # tokenization still covers every document
    assert capped.info["train"]["documents"] == full.info["train"]["documents"]
    assert capped.info["valid"]["documents"] == full.info["valid"]["documents"]
    assert capped.tokenizer.get_vocab() != full.tokenizer.get_vocab()
