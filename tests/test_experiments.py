"""Every seed notebook as `experiment=NAME`: its recipe, key by key, and its own kind of data, run.

The runs are smoke-sized (`debug=smoke` plus a few overrides) on local data shaped as each
notebook's: a Wikibooks-like SQLite table, seed 003's toy files written by its own cells, a
dataset directory laid out like the codeparrot Hub repos, and slices of the Tolstoy novels.
"""
import json
import math
import re
import sqlite3

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import (SHARED, cache_tiny_gpt2, compose, final_weights, read_metrics, requires_shared, run_training,
                      series)
from gptlab.errors import ConfigError

TOLSTOY = SHARED / "tolstoy"
TINY_GPT2 = SHARED / "models" / "tiny-random-gpt2"
EXPERIMENTS = ["tolstoy_scratch", "tolstoy_finetune", "codeparrot", "jsonl_finetune", "wikibooks"]
REQUIRED = {"jsonl_finetune": ["data.files=[a.jsonl]", "data.valid_files=[b.jsonl]"], "wikibooks": ["data.db=w.sqlite"]}
LIBRU = "http://az.lib.ru/t/tolstoj_lew_nikolaewich/"

# What each notebook does, read off its cells (../shared/seeds/); key by key what its preset must set.
TRAINER_DEFAULTS = {"optim.weight_decay": 0.0, "optim.betas": [0.9, 0.999], "optim.eps": 1e-8,
                    "trainer.max_grad_norm": 1.0, "seed": 42}  # TrainingArguments' defaults
TOLSTOY_RECIPE = {  # 000/001: TrainingArguments(num_train_epochs=30, learning_rate=5e-5, warmup_steps=200, save_steps=1500)
    **TRAINER_DEFAULTS,
    "data.urls": [f"{LIBRU}text_{p}.shtml" for p in ("0039", "0040", "0050", "0060", "0070", "0080", "0090",
                                                      "1860_dekabristy")],
    "data.block_size": 1024, "trainer.epochs": 30, "trainer.max_steps": None, "trainer.micro_batch_size": 8,
    "optim.name": "adamw", "optim.lr": 5e-5, "scheduler.name": "linear", "scheduler.warmup_steps": 200,
    "scheduler.min_lr": 0.0, "trainer.save_every": 1500, "trainer.mixed_precision": None,
    "trainer.eval_on_start": True,  # 001 samples from the untrained model first
}
NOTEBOOK = {
    "tolstoy_scratch": {
        **TOLSTOY_RECIPE, "model.pretrained_path": None, "tokenizer.path": None,
        # tok.Tokenizer(BPE(unk_token="[UNK]")), pre_tokenizers.Whitespace(), BpeTrainer(special_tokens=["[PAD]"])
        "tokenizer.kind": "whitespace", "tokenizer.vocab_size": 30000, "tokenizer.min_frequency": 0,
        # GPT2Config(vocab_size=len(vocab), ...): GPT2Config's defaults
        "model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768, "model.n_positions": 1024, "model.dropout": 0.1,
        # gpt.generate(**ttokenizer("Пьер закашлялся и"), max_new_tokens=150, do_sample=True)
        "trainer.sample_prompts": ["Пьер закашлялся и"], "trainer.sample_max_new_tokens": 150,
        "generate.do_sample": True, "generate.top_k": 50},
    "tolstoy_finetune": {
        **TOLSTOY_RECIPE, "model.pretrained_path": "ai-forever/rugpt3small_based_on_gpt2", "tokenizer.path": None,
        # gpt.generate(**tokenizer("Мне нравится, что вы "), max_new_tokens=50, top_k=3, do_sample=True)
        "trainer.sample_prompts": ["Мне нравится, что вы "], "trainer.sample_max_new_tokens": 50,
        "generate.do_sample": True, "generate.top_k": 3},
    "codeparrot": {
        "seed": 42, "trainer.max_grad_norm": 1.0,
        "tokenizer.path": "huggingface-course/code-search-net-tokenizer",
        "model.pretrained_path": None, "model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768,  # AutoConfig "gpt2"
        "data.builder": "huggingface-course/codeparrot-ds-train", "data.split": "train",
        "data.valid_builder": "huggingface-course/codeparrot-ds-valid", "data.valid_split": "validation",
        "data.text_field": "content", "data.keywords": ["pandas", "sklearn", "matplotlib", "seaborn"],
        "data.pack": "chunk", "data.block_size": 128,  # return_overflowing_tokens, chunks of 128 kept
        "loss.name": "keytoken", "loss.keywords": ["plt", "pd", "sk", "fit", "predict"], "loss.alpha": 1.0,
        "optim.name": "adamw", "optim.lr": 5e-4, "optim.weight_decay": 0.1, "optim.betas": [0.9, 0.999],
        "scheduler.name": "cosine", "scheduler.warmup_steps": 1000, "scheduler.min_lr": 0.0,
        "trainer.micro_batch_size": 32, "trainer.global_batch_size": 256, "trainer.epochs": 1,
        "trainer.max_steps": None, "trainer.eval_every": 5000, "trainer.save_every": 5000,
        "trainer.mixed_precision": "fp16", "trainer.eval_on_start": True},  # evaluate() before the loop
    "jsonl_finetune": {
        "model.pretrained_path": "sberbank-ai/rugpt3small_based_on_gpt2", "data.source": "jsonl",
        "data.text_field": "input", "data.files": ["a.jsonl"], "data.valid_files": ["b.jsonl"],
        "data.pack": "sample", "trainer.micro_batch_size": 1,  # DataLoader(batch_size=1), one padded row each
        "trainer.shuffle": False,
        "optim.name": "adam", "optim.lr": 1e-5, "optim.weight_decay": 0.0, "scheduler.name": "constant",
        "scheduler.warmup_steps": 0, "trainer.epochs": 32, "trainer.max_steps": None,
        "trainer.max_grad_norm": 0.0, "trainer.mixed_precision": "no",
        "trainer.eval_on_start": True, "trainer.sample_prompts": ["Это"],
        "generate.do_sample": True, "generate.top_k": 50, "generate.top_p": 0.95, "generate.max_length": 100},
    "wikibooks": {
        "model.pretrained_path": "ai-forever/rugpt3small_based_on_gpt2", "data.source": "sqlite",
        "data.query": "SELECT * FROM ru LIMIT 3300", "data.text_field": "body_text",
        "data.valid_fraction": 0.2, "data.split_seed": 0, "data.split_method": "sklearn", "data.block_size": 64,
        "trainer.epochs": 10, "trainer.max_steps": None, "trainer.micro_batch_size": 64,
        "trainer.global_batch_size": 128, "trainer.mixed_precision": "fp16", "optim.name": "adafactor",
        "optim.lr": 2e-4, "optim.weight_decay": 0.0, "scheduler.name": "cosine", "scheduler.warmup_steps": 0,
        "scheduler.min_lr": 0.0, "trainer.save_every": 1000, "trainer.max_grad_norm": 1.0, "seed": 42,
        # generate("женщина", max_length=30) with do_sample, num_beams=2, temperature=1.5, top_p=0.9
        "trainer.sample_prompts": ["женщина"], "generate.do_sample": True, "generate.num_beams": 2,
        "generate.temperature": 1.5, "generate.top_p": 0.9, "generate.max_length": 30},
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_preset_is_its_notebooks_recipe(name):
    cfg = compose([f"experiment={name}", *REQUIRED.get(name, [])])
    for key, value in NOTEBOOK[name].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, key


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_debug_smoke_shrinks_every_preset(name):
    from gptlab.data.blocks import TrainOrder
    from gptlab.run import resolve_max_steps

    cfg = compose([f"experiment={name}", *REQUIRED.get(name, []), "debug=smoke"])
    order = TrainOrder(100_000, cfg.trainer.micro_batch_size, 1, 1, 0, 0)
    assert resolve_max_steps(cfg.trainer, order) == 8  # whatever epochs the preset counts
    assert cfg.data.block_size == 64 and cfg.trainer.micro_batch_size <= 4
    if not cfg.model.pretrained_path:
        assert (cfg.model.n_layer, cfg.model.n_embd) == (2, 32)


@pytest.mark.parametrize("name, key", [("jsonl_finetune", "data.files"), ("wikibooks", "data.db")])
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
    """The preset's own source and tokenizer, offline: part of a saved az.lib.ru page (cp1251 HTML), a
    whitespace BPE, GPT-2's dropout, and the untrained model evaluated and sampled first, at step 0."""
    from transformers import AutoConfig, AutoTokenizer

    page = tmp_path / "text_0073.shtml"
    page.write_bytes(next((TOLSTOY / "html").glob("*.shtml")).read_bytes()[:150_000])
    run = tmp_path / "run"
    run_training(smoke(run, cache_dir, "experiment=tolstoy_scratch", "data.urls=[]", f"data.files=[{page}]"))
    rows, samples = check_run(run)
    assert series(rows, "eval/loss")[0][0] == 0 and [r["step"] for r in rows if "sample/0" in r] == [0, 3]
    assert samples[-1].startswith("Пьер закашлялся и") and "Ð" not in samples[-1]
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert type(tok.backend_tokenizer.pre_tokenizer).__name__ == "Whitespace"
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == ("[EOS]", "[PAD]", "[UNK]")
    assert tok.convert_ids_to_tokens(tok("Пьер ✂")["input_ids"])[-1] == "[UNK]"  # a character it never saw
    assert AutoConfig.from_pretrained(run / "final").resid_pdrop == 0.1


@requires_shared
def test_tolstoy_finetune_a_local_model(tmp_path, cache_dir):
    text = tolstoy_slice(tmp_path, "kazaki", 40_000)
    run_training(smoke(tmp_path / "run", cache_dir, "experiment=tolstoy_finetune",
                       f"model.pretrained_path={TINY_GPT2}", "data.source=text", "data.encoding=utf-8",
                       "data.text_unit=paragraph", "data.urls=[]", f"data.files=[{text}]", "data.valid_fraction=0.02"))
    _, samples = check_run(tmp_path / "run")
    assert samples[-1].startswith("Мне нравится, что вы ")


def code_files(n_with, n_without, size=3000):
    """Python files: n_with use the data-science stack (the filter keeps them), n_without do not."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    code = [open(f"{stdlib}/{m}.py", encoding="utf-8").read()[:size] for m in ("bisect", "colorsys", "glob", "fnmatch")]
    usage = "df = pd.DataFrame(x)\nplt.plot(df)\nmodel.fit(X, y)\nmodel.predict(X)\n" * 8
    return ([{"content": "import pandas as pd\nimport matplotlib.pyplot as plt\n" + usage + code[i % 4],
              "repo_name": f"x{i}"} for i in range(n_with)] +
            [{"content": "import os\n" + code[i % 4], "repo_name": f"y{i}"} for i in range(n_without)])


@requires_shared
def test_codeparrot_on_a_local_json_dataset(tmp_path, cache_dir, hub):
    cache_tiny_gpt2(hub, "huggingface-course/code-search-net-tokenizer", tokenizer_only=True)  # GPT-2's files
    train, valid = tmp_path / "train.json", tmp_path / "valid.json"
    train.write_text("".join(json.dumps(r) + "\n" for r in code_files(4, 2)))
    valid.write_text(json.dumps({"content": "from sklearn.ensemble import RandomForestRegressor\n" +
                                 code_files(1, 0)[0]["content"]}) + "\n")
    run_training(smoke(tmp_path / "run", cache_dir, "experiment=codeparrot", "data.builder=json", f"data.files=[{train}]",
                       f"data.valid_files=[{valid}]", "trainer.grad_accum=2"))
    rows, samples = check_run(tmp_path / "run")
    last = [r for r in rows if r["step"] == 3 and any(k.startswith("sample/") for k in r)]
    assert [next(iter(set(r) - {"step"})) for r in last] == [f"sample/{i}" for i in range(4)]
    assert samples[-1].startswith("# create some data")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "kept 4 of 6 documents" in log
    assert "mixed precision no" in log  # fp16 is a GPU setting
    # GPT-2's vocabulary stands in for the course's code tokenizer, which has all five as tokens
    assert "not a single token, skipped: ['plt']" in log
    assert "GPT2LMHeadModel with 1.64M parameters (2 layers, 32 wide, vocab 50304)" in log


@requires_shared
def test_codeparrot_streams_a_dataset_repo_and_filters_it_on_the_fly(tmp_path, hub):
    """Seed 002's transformersbook/codeparrot-train, shaped as a local dataset repo: streamed, so
    the unfiltered rows go through the keyword filter one by one and are never stored."""
    cache_tiny_gpt2(hub, "huggingface-course/code-search-net-tokenizer", tokenizer_only=True)
    train_repo, valid_repo = tmp_path / "codeparrot-train" / "data", tmp_path / "codeparrot-ds-valid" / "data"
    train_repo.mkdir(parents=True)
    valid_repo.mkdir(parents=True)
    rows = code_files(6, 30)
    for shard in range(3):
        (train_repo / f"train-0000{shard}-of-00003.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[shard::3]))
    (valid_repo / "validation-00000-of-00001.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in code_files(3, 3)))
    cache = tmp_path / "cache"
    run_training(smoke(tmp_path / "run", cache, "experiment=codeparrot", f"data.builder={train_repo.parent}",
                       f"data.valid_builder={valid_repo.parent}", "data.streaming=true"))
    check_run(tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "kept 6 of 36 documents" in log and "explicit validation data gives 3 validation documents" in log
    assert not list(cache.rglob("*.arrow"))  # nothing converted or copied: rows were read as they streamed


# Seed 003's toy data, written by the notebook's own cells.
def write_seed_003_files():
    with open('dataset.txt', 'w') as fp:
        fp.write('Это первый текст да\nэто второй текст')

    with open('dataset_test.txt', 'w') as fp:
        fp.write('Это вовсе не текст\nэто может быть второй текст')

    with open('dataset.json', 'w') as fp:
        with open('dataset.txt') as fpt:
            texts = fpt.read().split('\n')
        for text in texts:
            fp.write(json.dumps({'input': text}) + '\n')

    with open('dataset_test.json', 'w') as fp:
        with open('dataset_test.txt') as fpt:
            texts = fpt.read().split('\n')
        for text in texts:
            fp.write(json.dumps({'input': text}) + '\n')


def hf_losses(model_dir, texts):
    """Each text's loss as seed 003 computes it: model(**batch) with labels = input ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval(), AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            out.append((model(input_ids=ids, labels=ids).loss.item(), ids.shape[1] - 1))
    return out


@requires_shared
def test_jsonl_finetune_on_the_notebooks_own_toy_files(tmp_path, cache_dir, monkeypatch, capsys):
    """Seed 003's two-line files train with the preset and nothing but the paths and a (tiny, local) model:
    one padded sample per step, 32 epochs, each epoch's mean train and test loss per sample."""
    monkeypatch.chdir(tmp_path)
    write_seed_003_files()
    run = tmp_path / "run"
    run_training([f"run_dir={run}", f"cache_dir={cache_dir}", "experiment=jsonl_finetune",
                  f"model.pretrained_path={TINY_GPT2}", "data.files=[dataset.json]",
                  "data.valid_files=[dataset_test.json]"])
    rows = read_metrics(run)
    epochs = [r for r in rows if "epoch/epoch" in r]
    assert [r["epoch/epoch"] for r in epochs] == list(range(1, 33))
    assert [r["step"] for r in epochs] == list(range(2, 65, 2))  # 2 samples, batch 1: 2 steps an epoch
    with capsys.disabled():
        print("\nseed 003's toy files, per epoch: " + ", ".join(
            f"{r['epoch/epoch']}: train {r['epoch/train_loss']:.4f} test {r['epoch/test_loss']:.4f}"
            for r in epochs[:2] + epochs[-2:]))
    assert epochs[-1]["epoch/train_loss"] < epochs[0]["epoch/train_loss"]
    test_texts = ["Это вовсе не текст", "это может быть второй текст"]
    # Step 0 is the untrained model: its token-weighted loss over the test rows, computed by HF.
    before = hf_losses(TINY_GPT2, test_texts)
    step0 = sum(loss * n for loss, n in before) / sum(n for _, n in before)
    assert series(rows, "eval/loss")[0] == (0, pytest.approx(step0, abs=1e-5))
    # The last epoch's test loss is the mean of the trained model's per-sample losses, as the notebook prints it.
    after = hf_losses(run / "final", test_texts)
    assert epochs[-1]["epoch/test_loss"] == pytest.approx(sum(x for x, _ in after) / 2, abs=1e-5)
    samples = [r for r in rows if "sample/0" in r]
    assert samples[0]["step"] == 0 and all(r["sample/0"].startswith("Это") for r in samples)


@requires_shared
def test_per_sample_batches_are_exact(tmp_path, cache_dir):
    """Padding is never trained on, and the loss is per target over the whole step: 2 padded samples
    per micro-batch equal 1 sample a micro-step, accumulated; and a batch larger than the split is refused."""
    import torch

    texts = paragraphs("detstvo")[20:26]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"input": p[:40 + 37 * i]}, ensure_ascii=False) + "\n"
                             for i, p in enumerate(texts)))  # six lengths: every batch is padded
    test.write_text(json.dumps({"input": texts[0][:50]}, ensure_ascii=False) + "\n" +
                    json.dumps({"input": texts[1][:90]}, ensure_ascii=False) + "\n")
    # A small GPT-2 from scratch: the tiny pretrained one has dropout, whose masks follow the batch shapes.
    common = ["experiment=jsonl_finetune", "debug=smoke", "model.pretrained_path=null", f"data.files=[{train}]",
              f"data.valid_files=[{test}]", "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=3",
              "trainer.sample_prompts=[]", "trainer.eval_on_start=false", "optim.lr=1e-2", "optim.eps=1e-3",
              f"cache_dir={cache_dir}"]
    run_training([*common, f"run_dir={tmp_path / 'a'}", "trainer.micro_batch_size=2", "trainer.grad_accum=1"])
    run_training([*common, f"run_dir={tmp_path / 'b'}", "trainer.micro_batch_size=1", "trainer.grad_accum=2"])
    a, b = (read_metrics(tmp_path / r) for r in "ab")
    assert series(a, "train/loss") == [(s, pytest.approx(v, abs=1e-6)) for s, v in series(b, "train/loss")]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match=r"^the training set has 6 samples \(data\.pack=sample: one document per "
                                          r"row\), fewer than one micro batch \(trainer\.micro_batch_size=8\)$"):
        run_training([*common, f"run_dir={tmp_path / 'c'}", "trainer.micro_batch_size=8"])


def wikibooks_db(path, n=3400):
    """A table shaped like the notebook's (`SELECT * FROM ru` shows these columns): every 40th text
    empty, titles that must never be trained on."""
    paras = [p for p in paragraphs("anna_karenina") if len(p) > 40]
    bodies = [f"{i}. {paras[i % len(paras)][:100]}" for i in range(n)]  # short: the run stays quick
    rows = [(i, f"ЗАГОЛОВОК {i}", f"https://ru.wikibooks.org/wiki/{i}", bodies[i][:40],
             "" if i % 40 == 7 else bodies[i], "<p>") for i in range(n)]
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE ru (id INTEGER, title TEXT, url TEXT, abstract TEXT, body_text TEXT, body_html TEXT)")
        con.executemany("INSERT INTO ru VALUES (?, ?, ?, ?, ?, ?)", rows)
    kept = [r[4] for r in rows[:3300] if r[4]]  # LIMIT 3300, then df[df['body_text'] != '']
    # train_test_split(kept, test_size=0.2, random_state=0) draws these as the test texts
    test = np.random.RandomState(0).permutation(len(kept))[:math.ceil(0.2 * len(kept))]
    return kept, {kept[i] for i in test}


def documents(tokens, tokenizer):
    ids = np.asarray(tokens)
    ends = np.flatnonzero(ids == tokenizer.eos_token_id)
    return [tokenizer.decode(d[:-1]) for d in np.split(ids, ends + 1)[:-1]]  # each ends with its eos


@requires_shared
@pytest.mark.parametrize("model", ["tiny_local", "scratch"])
def test_wikibooks_on_a_table_like_the_notebooks(tmp_path, cache_dir, model):
    """3,400 rows, `SELECT * FROM ru LIMIT 3300`: it trains on body_text (never the titles), holds out
    exactly the notebook's train_test_split, and its own BPE trains on the rows too."""
    from gptlab.data.prepare import prepare

    db = tmp_path / "wiki.sqlite"
    kept, test = wikibooks_db(db)
    overrides = smoke(tmp_path / "run", cache_dir, "experiment=wikibooks", f"data.db={db}",
                      "data.valid_fraction=0.2",  # the preset's (debug=smoke lowers it)
                      f"model.pretrained_path={TINY_GPT2 if model == 'tiny_local' else 'null'}")
    run_training(overrides)
    rows, samples = check_run(tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"kept {len(kept)} of 3300 documents" in log
    data = prepare(compose(overrides), cache_dir)  # the run's token cache, read again
    valid = documents(data.valid.tokens, data.tokenizer)
    assert len(valid) == len(test) and set(valid) == test
    train = documents(data.train.tokens, data.tokenizer)
    assert len(train) == len(kept) - len(test) and set(train) == set(kept) - test
    assert not any("ЗАГОЛОВОК" in d for d in train + valid)
    from gptlab.config import SchedulerConfig
    from gptlab.schedule import make_schedule
    schedule = make_schedule(SchedulerConfig(name="cosine", warmup_steps=2, min_lr=0.0), 2e-4, 3)
    for step, lr in series(rows, "train/lr"):  # Adafactor follows the scheduled lr
        assert lr == pytest.approx(schedule(step))
    assert samples[-1].startswith("женщина")
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").seed == 42


def test_max_steps_wins_over_a_presets_epochs_with_a_line(tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_seed_003_files()
    run_training([f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}", "experiment=jsonl_finetune",
                  f"model.pretrained_path={TINY_GPT2}", "data.files=[dataset.json]",
                  "data.valid_files=[dataset_test.json]", "trainer.max_steps=3", "trainer.sample_prompts=[]"])
    assert [s for s, _ in series(read_metrics(tmp_path / "run"), "train/loss")] == [3]
    assert "trainer.max_steps=3 wins over trainer.epochs=32.0 (1.50 epochs)" in (tmp_path / "run" / "train.log").read_text()


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
