"""Every seed scenario as `experiment=NAME`: it composes with the seed's settings, and it runs.

The runs are smoke-sized (`debug=smoke` plus a few overrides) on small local data: a
SQLite file and jsonl/json files written here, and slices of the shared Tolstoy novels.
"""
import json
import math
import re
import sqlite3

import pytest
from omegaconf import OmegaConf

from conftest import SHARED, compose, read_metrics, requires_shared, run_training, series

TOLSTOY = SHARED / "tolstoy"
TINY_GPT2 = SHARED / "models" / "tiny-random-gpt2"
EXPERIMENTS = ["tolstoy_scratch", "tolstoy_finetune", "codeparrot", "jsonl_finetune", "wikibooks"]
REQUIRED = {"jsonl_finetune": ["model.pretrained_path=/m", "data.files=[a.jsonl]", "data.valid_files=[b.jsonl]"],
            "wikibooks": ["data.db=w.sqlite"]}

# (key, value) pairs of the seeds, as the issue lists them
SEED_SETTINGS = {
    "tolstoy_scratch": {"data.source": "librus_html", "data.block_size": 1024, "model.n_layer": 12,
                        "model.pretrained_path": None, "tokenizer.path": None, "optim.lr": 5e-5,
                        "scheduler.warmup_steps": 200, "trainer.sample_prompts": ["Пьер закашлялся и"],
                        "trainer.save_every": 1500, "trainer.keep_last": 3},
    "tolstoy_finetune": {"data.source": "librus_html", "model.pretrained_path": "ai-forever/rugpt3small_based_on_gpt2",
                         "model.revision": None, "optim.lr": 5e-5,
                         "scheduler.warmup_steps": 200, "generate.top_k": 3, "generate.do_sample": True,
                         "trainer.sample_prompts": ["Мне нравится, что вы "]},
    "codeparrot": {"data.source": "hf", "data.builder": "huggingface-course/codeparrot-ds-train", "data.split": "train",
                   "data.valid_builder": "huggingface-course/codeparrot-ds-valid", "data.text_field": "content",
                   "data.pack": "chunk", "data.block_size": 128,
                   "data.keywords": ["pandas", "sklearn", "matplotlib", "seaborn"], "model.n_layer": 12,
                   "model.n_embd": 768, "loss.name": "keytoken", "loss.keywords": ["plt", "pd", "sk", "fit", "predict"],
                   "optim.name": "adamw", "optim.lr": 5e-4, "optim.weight_decay": 0.1, "scheduler.name": "cosine",
                   "scheduler.warmup_steps": 1000, "trainer.micro_batch_size": 32, "trainer.global_batch_size": 256,
                   "trainer.eval_every": 5000, "trainer.mixed_precision": "fp16"},
    "jsonl_finetune": {"data.source": "jsonl", "data.text_field": "input", "optim.name": "adam", "optim.lr": 1e-5,
                       "trainer.epochs": 32, "data.valid_files": ["b.jsonl"]},
    "wikibooks": {"data.source": "sqlite", "data.query": "SELECT body_text FROM ru LIMIT 3300",
                  "data.valid_fraction": 0.2, "data.split_seed": 0, "data.block_size": 64, "optim.name": "adafactor",
                  "optim.lr": 2e-4, "scheduler.name": "cosine", "trainer.global_batch_size": 128,
                  "trainer.micro_batch_size": 64, "trainer.save_every": 1000, "seed": 42, "generate.num_beams": 2, "generate.temperature": 1.5,
                  "generate.top_p": 0.9},
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_the_seed_settings(name):
    cfg = compose([f"experiment={name}", *REQUIRED.get(name, [])])
    for key, value in SEED_SETTINGS[name].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, key
    assert len(cfg.trainer.sample_prompts) == (4 if name == "codeparrot" else 1)


@pytest.mark.parametrize("name, key", [("jsonl_finetune", "model.pretrained_path"), ("wikibooks", "data.db")])
def test_a_missing_required_setting_is_named(name, key, tmp_path):
    with pytest.raises(Exception, match=f"needs {key}="):
        run_training([f"experiment={name}", f"run_dir={tmp_path}"])


def smoke(run_dir, cache_dir, *extra):
    return [f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", "trainer.max_steps=3",
            "trainer.eval_every=3", "trainer.log_every=1", "trainer.sample_max_new_tokens=6", *extra]


def check_run(run_dir, steps=3):
    from transformers import pipeline

    rows = read_metrics(run_dir)
    losses = series(rows, "train/loss")
    assert [s for s, _ in losses] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for _, v in losses)
    assert series(rows, "eval/loss")[-1][0] == steps
    samples = [r["sample/0"] for r in rows if "sample/0" in r]
    gen = pipeline("text-generation", model=str(run_dir / "final"))
    prompt = samples[-1][:4]
    assert gen(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith(prompt)
    return rows, samples


def paragraphs(novel):
    return [p.strip() for p in re.split(r"\n\s*\n", (TOLSTOY / f"{novel}.txt").read_text(encoding="utf-8"))
            if p.strip()]


def tolstoy_slice(tmp_path, novel, n_chars):
    path = tmp_path / f"{novel}.txt"
    path.write_text((TOLSTOY / f"{novel}.txt").read_text(encoding="utf-8")[:n_chars], encoding="utf-8")
    return path


@requires_shared
def test_tolstoy_scratch_on_a_saved_librus_page(tmp_path, cache_dir):
    """The experiment's own source, offline: part of a saved az.lib.ru page (cp1251 HTML)."""
    page = tmp_path / "text_0073.shtml"
    page.write_bytes(next((TOLSTOY / "html").glob("*.shtml")).read_bytes()[:150_000])
    run_training(smoke(tmp_path / "run", cache_dir, "experiment=tolstoy_scratch", "data.urls=[]",
                       f"data.files=[{page}]"))
    _, samples = check_run(tmp_path / "run")
    assert samples[-1].startswith("Пьер закашлялся и") and "Ð" not in samples[-1]


@requires_shared
def test_tolstoy_finetune_a_local_model(tmp_path, cache_dir):
    text = tolstoy_slice(tmp_path, "kazaki", 40_000)
    run_training(smoke(tmp_path / "run", cache_dir, "experiment=tolstoy_finetune",
                       f"model.pretrained_path={TINY_GPT2}", "data.source=text", "data.encoding=utf-8",
                       "data.text_unit=paragraph", "data.urls=[]", f"data.files=[{text}]", "data.valid_fraction=0.02"))
    _, samples = check_run(tmp_path / "run")
    assert samples[-1].startswith("Мне нравится, что вы ")


def test_codeparrot_on_a_local_json_dataset(tmp_path, cache_dir):
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    code = [open(f"{stdlib}/{m}.py", encoding="utf-8").read()[:3000] for m in ("bisect", "colorsys", "glob", "fnmatch")]
    usage = "df = pd.DataFrame(x)\nplt.plot(df)\nmodel.fit(X, y)\nmodel.predict(X)\n" * 8
    rows = [{"content": "import pandas as pd\nimport matplotlib.pyplot as plt\n" + usage + c, "repo_name": "x"}
            for c in code]
    rows += [{"content": "import os\n" + c, "repo_name": "y"} for c in code[:2]]  # no data-science import: dropped
    train, valid = tmp_path / "train.json", tmp_path / "valid.json"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid.write_text(json.dumps({"content": "from sklearn.ensemble import RandomForestRegressor\n" + code[0]}) + "\n")
    run_training(smoke(tmp_path / "run", cache_dir, "experiment=codeparrot", "data.builder=json", f"data.files=[{train}]",
                       f"data.valid_files=[{valid}]", "trainer.epochs=null", "trainer.grad_accum=2"))
    _, samples = check_run(tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    last = [r for r in rows if r["step"] == 3 and any(k.startswith("sample/") for k in r)]
    assert [next(iter(set(r) - {"step"})) for r in last] == [f"sample/{i}" for i in range(4)]
    assert samples[-1].startswith("# create some data")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "kept 4 of 6 documents" in log
    assert "mixed precision no" in log  # fp16 is a GPU setting
    assert "skipped: ['sk']" in log  # the other key tokens are single tokens of this small BPE


@requires_shared
def test_jsonl_finetune_reports_each_epoch(tmp_path, cache_dir):
    texts = paragraphs("detstvo")
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"input": p}, ensure_ascii=False) + "\n" for p in texts[10:16]))
    test.write_text("".join(json.dumps({"input": p}, ensure_ascii=False) + "\n" for p in texts[40:52]))
    run_training(smoke(tmp_path / "run", cache_dir, "experiment=jsonl_finetune", f"model.pretrained_path={TINY_GPT2}",
                       f"data.files=[{train}]", f"data.valid_files=[{test}]", "trainer.epochs=2",
                       "trainer.micro_batch_size=8", "trainer.max_steps=1000"))
    rows = read_metrics(tmp_path / "run")
    epochs = [r for r in rows if "epoch/epoch" in r]
    assert [r["epoch/epoch"] for r in epochs] == [1, 2]
    assert all(math.isfinite(r["epoch/train_loss"]) and math.isfinite(r["epoch/test_loss"]) for r in epochs)
    check_run(tmp_path / "run", steps=epochs[-1]["step"])


@requires_shared
def test_wikibooks_from_sqlite(tmp_path, cache_dir):
    texts = paragraphs("otrochestvo")
    db = tmp_path / "wiki.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE ru (title TEXT, body_text TEXT)")
        con.executemany("INSERT INTO ru VALUES (?, ?)", [(f"t{i}", p) for i, p in enumerate(texts[:80])])
        con.execute("INSERT INTO ru VALUES ('empty', NULL)")
    run_training(smoke(tmp_path / "run", cache_dir, "experiment=wikibooks", f"data.db={db}",
                       "data.valid_fraction=0.2", "trainer.micro_batch_size=8"))
    rows, samples = check_run(tmp_path / "run")
    from gptlab.optim import lr_at
    for step, lr in series(rows, "train/lr"):  # Adafactor follows the scheduled lr
        assert lr == pytest.approx(lr_at(step, 2e-4, 3, 2, 0.0, "cosine"))
    assert samples[-1].startswith("Википедия — это")
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").seed == 42


@requires_shared
def test_end_to_end_tolstoy_scratch_then_finetune_on_another_novel(tmp_path, cache_dir, capsys):
    """Train on Детство, export, fine-tune the export on Отрочество: its perplexity falls."""
    from gptlab.evaluate import main as evaluate

    a, b = tolstoy_slice(tmp_path, "detstvo", 80_000), tolstoy_slice(tmp_path, "otrochestvo", 80_000)
    text = ["data.source=text", "data.encoding=utf-8", "data.text_unit=paragraph", "data.urls=[]",
            "data.valid_fraction=0.05", "data.block_size=64"]
    scratch, tuned = tmp_path / "scratch", tmp_path / "tuned"
    run_training([f"run_dir={scratch}", f"cache_dir={cache_dir}", "experiment=tolstoy_scratch", "debug=smoke", *text,
                  f"data.files=[{a}]", "model.n_embd=64", "trainer.max_steps=60", "trainer.eval_every=60",
                  "trainer.log_every=10", "optim.lr=3e-3", "scheduler.warmup_steps=5", "trainer.micro_batch_size=8"])
    run_training([f"run_dir={tuned}", f"cache_dir={cache_dir}", "experiment=tolstoy_finetune", "debug=smoke", *text,
                  f"data.files=[{b}]", f"model.pretrained_path={scratch / 'final'}", "trainer.max_steps=30",
                  "trainer.eval_every=30", "trainer.log_every=10", "optim.lr=2e-3", "scheduler.warmup_steps=5",
                  "trainer.micro_batch_size=8"])
    # the same corpus arguments for both: the second novel's validation split
    on_b = ["data=text", *text, f"data.files=[{b}]", f"cache_dir={cache_dir}"]
    before = evaluate([str(scratch / "final"), *on_b])
    after = evaluate([str(tuned / "final"), *on_b])
    with capsys.disabled():
        print(f"\nperplexity on Отрочество's validation split ({after['tokens']} tokens): "
              f"{before['perplexity']:.2f} before fine-tuning, {after['perplexity']:.2f} after")
    assert before["tokens"] == after["tokens"] > 0
    assert after["loss"] == pytest.approx(series(read_metrics(tuned), "eval/loss")[-1][1], abs=1e-5)
    assert after["perplexity"] < 0.9 * before["perplexity"]
    rows = read_metrics(tuned)
    assert [r["sample/0"] for r in rows if "sample/0" in r][-1].startswith("Мне нравится, что вы ")

    from transformers import pipeline
    for run_dir in (scratch, tuned):
        out = pipeline("text-generation", model=str(run_dir / "final"))("Пьер", max_new_tokens=5, do_sample=False)
        assert out[0]["generated_text"].startswith("Пьер")
