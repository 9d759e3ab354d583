"""The stages after the sources: filter, split, tokenizer, pack, cache; and their bad inputs."""
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED, compose, free_port, requires_shared
from gptlab.data import cache as C
from gptlab.data import prepare as P
from gptlab.data.pack import safe_pieces, splittable, token_dtype, write_token_streams
from gptlab.data.sources import DataError
from gptlab.tokenizer import check_vocab, load_tokenizer, tokenizer_hash, train_bpe

WORDS = "the a pandas sklearn data frame plot model fit value row column index sum mean".split()


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) + f" doc{i}." for i in range(n)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", make_docs(40))


def config(corpus_path, *extra):
    return compose(["data=jsonl", f"data.files=[{corpus_path}]", "data.block_size=16", "data.valid_fraction=0.2",
                    "tokenizer.vocab_size=300", "tokenizer.min_frequency=1", *extra])


def run_prepare(cache, corpus_path, *extra):
    return P.prepare(config(corpus_path, *extra), cache, show_progress=False)


def documents_in(blocks_or_path, tok, dtype=None):
    """Decode a concat stream back into its documents (split at EOS)."""
    ids = np.asarray(blocks_or_path.tokens) if dtype is None else np.fromfile(blocks_or_path, dtype=dtype)
    cuts = np.flatnonzero(ids == tok.eos_token_id)
    return [tok.decode(ids[a + 1 if i else 0:b].tolist()) for i, (a, b) in enumerate(zip([0, *cuts[:-1]], cuts))]


def builds(cache):
    log = Path(cache) / C.BUILD_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------- filter and split

def test_filters_keep_keyword_documents_and_report_the_percentage(tmp_path, corpus, caplog):
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    expected = [t for t in texts if "sklearn" in t or "matplotlib" in t]
    assert 0 < len(expected) < len(texts)
    with caplog.at_level(logging.INFO):
        data = run_prepare(tmp_path / "c", corpus, "data.keywords=[sklearn,matplotlib]", "data.min_chars=50")
    split = data.info["split"]["train"]
    kept = [t for t in expected if len(t) >= 50]
    assert split == {"documents": 40, "kept": len(kept), "chars": sum(map(len, kept))}
    assert f"kept {len(kept)} of 40 documents ({100 * len(kept) / 40:.1f}%)" in caplog.text
    got = documents_in(data.train, data.tokenizer) + documents_in(data.valid, data.tokenizer)
    assert sorted(got) == sorted(kept)


def test_corpus_empty_after_filtering(tmp_path, corpus):
    with pytest.raises(DataError, match=r"jsonl: all 40 documents were dropped by the filters "
                                        r"\(min_chars=1, keywords=\['seaborn'\]\)"):
        run_prepare(tmp_path / "c", corpus, "data.keywords=[seaborn]")


def test_fraction_split_is_by_document_seeded_and_leak_free(tmp_path, corpus):
    texts = make_docs(40)
    valid_sets = []
    for seed in (0, 0, 1):
        data = run_prepare(tmp_path / "c", corpus, f"data.split_seed={seed}")
        train, valid = documents_in(data.train, data.tokenizer), documents_in(data.valid, data.tokenizer)
        assert len(valid) == 8 == data.info["split"]["n_valid"] and len(train) == 32
        assert sorted(train + valid) == sorted(texts) and not set(train) & set(valid)
        assert train == [t for t in texts if t in set(train)]  # document order is kept
        valid_sets.append(set(valid))
    assert valid_sets[0] == valid_sets[1] != valid_sets[2]


def test_explicit_valid_files(tmp_path, corpus):
    test = write_jsonl(tmp_path / "test.jsonl", ["held out one.", "held out two."])
    data = run_prepare(tmp_path / "c", corpus, f"data.valid_files=[{test}]")
    assert documents_in(data.valid, data.tokenizer) == ["held out one.", "held out two."]
    assert len(documents_in(data.train, data.tokenizer)) == 40
    assert data.info["split"]["explicit_valid"]


def test_validation_split_empty_is_an_error(tmp_path, corpus):
    test = write_jsonl(tmp_path / "test.jsonl", ["", "   "])
    with pytest.raises(DataError, match=r"the validation split is empty: data.valid_files/valid_query gave 2 "
                                        r"documents, none kept"):
        run_prepare(tmp_path / "c", corpus, f"data.valid_files=[{test}]")
    one = write_jsonl(tmp_path / "one.jsonl", ["a single document"])
    with pytest.raises(DataError, match="the corpus has 1 document after filtering, too few to split"):
        run_prepare(tmp_path / "c", one)
    with pytest.raises(DataError, match=r"data.valid_fraction must be in \(0, 1\) without data.valid_files, got 0.0"):
        run_prepare(tmp_path / "c", corpus, "data.valid_fraction=0")


def test_fewer_tokens_than_one_block(tmp_path, corpus):
    with pytest.raises(DataError, match=r"the train split has \d+ tokens, fewer than one block of "
                                        r"data.block_size=100000"):
        run_prepare(tmp_path / "c", corpus, "data.block_size=100000")


def test_bad_block_size(tmp_path, corpus):
    with pytest.raises(DataError, match="data.block_size must be at least 2"):
        run_prepare(tmp_path / "c", corpus, "data.block_size=1")


# ---------------------------------------------------------------- packing

def test_concat_and_chunk_packing_counts(tmp_path, corpus):
    T = 16
    concat = run_prepare(tmp_path / "c", corpus, "data.pack=concat")
    chunk = run_prepare(tmp_path / "c", corpus, "data.pack=chunk")
    tok = concat.tokenizer
    train_docs = documents_in(concat.train, tok)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in train_docs]
    # concat: every document then EOS, one stream, only its tail dropped
    stream = [i for doc in ids for i in [*doc, tok.eos_token_id]]
    assert np.asarray(concat.train.tokens).tolist() == stream
    assert concat.info["train"]["dropped_tokens"] == len(stream) % T and len(concat.train) == len(stream) // T
    # chunk: each document cut on its own, no EOS, short tails dropped
    kept = [doc[:len(doc) // T * T] for doc in ids]
    assert np.asarray(chunk.train.tokens).tolist() == [i for doc in kept for i in doc]
    assert chunk.info["train"]["dropped_tokens"] == sum(len(d) % T for d in ids) > 0
    assert len(chunk.train) == sum(len(d) // T for d in ids)
    assert chunk.info["pack"] == "chunk" and chunk.info["cache_dir"] != concat.info["cache_dir"]


def test_long_documents_are_cut_only_where_ids_cannot_change():
    rng = np.random.default_rng(0)
    parts = ["word", " ", "  ", "\n", "\n\n", "   x", ",", "'s", "2024", "é", "тест", "\t", "  \n "]
    text = "".join(rng.choice(parts, size=60_000))
    tok = train_bpe([text[:20_000]], 400, 1, ["<|endoftext|>"])
    assert splittable(tok.backend_tokenizer)
    pieces = safe_pieces(text, 1000)
    assert "".join(pieces) == text and len(pieces) > 50 and max(map(len, pieces)) <= 1000
    whole = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    cut = [i for p in tok.backend_tokenizer.encode_batch(pieces, add_special_tokens=False) for i in p.ids]
    assert cut == whole


def test_long_documents_are_packed_exactly(tmp_path, monkeypatch):
    from gptlab.data import pack

    text = " ".join(make_docs(300))
    tok = train_bpe([text], 400, 1, ["<|endoftext|>"])
    monkeypatch.setattr(pack, "PIECE_CHARS", 500)
    monkeypatch.setattr(pack, "BATCH_CHARS", 2000)
    info = write_token_streams([(False, text), (True, "tail")], tok, tmp_path, show_progress=False)
    got = np.fromfile(tmp_path / "train.bin", dtype=info["dtype"]).tolist()
    assert got == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert info["valid"]["documents"] == 1 and info["train"]["documents"] == 1


@requires_shared
@pytest.mark.parametrize("name", ["gpt2", "rugpt3"])
def test_shared_tokenizers_encode_a_novel_in_pieces_exactly(name):
    tok = load_tokenizer(SHARED / "tokenizers" / name)
    text = (SHARED / "tolstoy" / "war_and_peace.txt").read_text(encoding="utf-8")[:200_000]
    backend = tok.backend_tokenizer
    assert splittable(backend)
    cut = [i for e in backend.encode_batch(safe_pieces(text, 4096), add_special_tokens=False) for i in e.ids]
    assert cut == backend.encode(text, add_special_tokens=False).ids


def test_token_dtype_follows_the_vocab():
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def source_files(tmp_path, name):
    """Small inputs for each source and the overrides that reach it from config alone."""
    texts = make_docs(30)
    if name == "text":
        (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
        return ["data=text", f"data.files=[{tmp_path}/*.txt]"]
    if name == "jsonl":
        write_jsonl(tmp_path / "train.jsonl", texts[:25], "input")
        write_jsonl(tmp_path / "test.jsonl", texts[25:], "input")
        return ["data=jsonl", f"data.files=[{tmp_path / 'train.jsonl'}]", "data.text_field=input",
                f"data.valid_files=[{tmp_path / 'test.jsonl'}]"]
    if name == "sqlite":
        import sqlite3
        con = sqlite3.connect(tmp_path / "wiki.db")
        con.execute("CREATE TABLE ru (body_text TEXT)")
        con.executemany("INSERT INTO ru VALUES (?)", [(t,) for t in texts] + [(None,), ("",)])
        con.commit()
        con.close()
        return ["data=sqlite", f"data.db={tmp_path / 'wiki.db'}", "data.query='SELECT body_text FROM ru LIMIT 3300'"]
    if name == "hf":
        write_jsonl(tmp_path / "code.jsonl", texts, "content")
        return ["data=hf", f"data.files=[{tmp_path / 'code.jsonl'}]", "data.keywords=[pandas,sklearn]",
                "data.pack=chunk"]
    if name == "librus_html":
        for i in range(3):
            page = "<!--Section Begins-->" + "".join(f"<dd>&nbsp;&nbsp;{t}\n" for t in texts[i::3])
            (tmp_path / f"text_{i}.shtml").write_bytes((page + "<!--Section Ends-->").encode("cp1251"))
        return ["data=librus_html", f"data.files=[{tmp_path}/*.shtml]", "data.valid_fraction=0.3"]
    for i, t in enumerate(texts):
        (tmp_path / f"m{i}.py").write_text(f"# {t}\n")
    return [f"data.paths=[{tmp_path}]", "data.valid_fraction=0.2"]


@pytest.mark.parametrize("name", ["python_source", "text", "jsonl", "sqlite", "hf", "librus_html"])
def test_every_source_is_reachable_from_config_alone(tmp_path, name):
    cfg = compose([*source_files(tmp_path, name), "data.block_size=16", "tokenizer.vocab_size=300",
                   "tokenizer.min_frequency=1"])
    data = P.prepare(cfg, tmp_path / "c", show_progress=False)
    assert len(data.train) > 0 and len(data.valid) > 0
    assert data.info["split"]["train"]["kept"] > 0 and data.info["pack"] == cfg.data.pack


# ---------------------------------------------------------------- cache

def test_cache_hit_skips_every_stage(tmp_path, corpus, monkeypatch):
    cache = tmp_path / "c"
    first = run_prepare(cache, corpus)
    assert [b["stage"] for b in builds(cache)] == ["splits", "tokenizers", "tokens"]
    meta = Path(first.info["cache_dir"]) / C.META
    mtime = meta.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a cache hit must not read, train or tokenize")

    for name in ("plan_split", "train_bpe", "write_token_streams", "labelled_documents"):
        monkeypatch.setattr(P, name, boom)
    again = run_prepare(cache, corpus)
    assert again.info["cache_dir"] == first.info["cache_dir"] and meta.stat().st_mtime_ns == mtime
    assert len(builds(cache)) == 3
    assert np.array_equal(again.train.tokens, first.train.tokens)


@pytest.mark.parametrize("change", [
    "data.keywords=[pandas]", "data.min_chars=100", "data.valid_fraction=0.3", "data.split_seed=7",
    "data.pack=chunk", "tokenizer.vocab_size=320", "touch",
])
def test_any_setting_or_file_change_rebuilds(tmp_path, corpus, change):
    cache = tmp_path / "c"
    before = run_prepare(cache, corpus).info["cache_dir"]
    if change == "touch":
        with open(corpus, "a") as f:
            f.write(json.dumps({"text": "one more document."}) + "\n")
        change = "data.block_size=16"
    after = run_prepare(cache, corpus, change).info["cache_dir"]
    assert after != before and builds(cache)[-1]["stage"] == "tokens" and len(builds(cache)) > 3


def test_block_size_reuses_a_concat_cache(tmp_path, corpus):
    cache = tmp_path / "c"
    a = run_prepare(cache, corpus, "data.block_size=16")
    b = run_prepare(cache, corpus, "data.block_size=8")
    assert a.info["cache_dir"] == b.info["cache_dir"] and len(builds(cache)) == 3
    assert len(b.train) == len(b.train.tokens) // 8


BUILDER = """
import sys, time
from pathlib import Path
from gptlab.data.cache import build_once
def build(tmp):
    time.sleep(1.5)
    if sys.argv[2] == "fail":
        raise ValueError("no tokens today")
    (tmp / "x").write_text("built")
    return {"ok": True}
build_once(Path(sys.argv[1]), build, is_builder=True, poll_s=0.05)
"""
WAITER = """
import sys
from pathlib import Path
from gptlab.data.cache import build_once
d = build_once(Path(sys.argv[1]), lambda tmp: {}, is_builder=False, poll_s=0.05)
print((d / "x").read_text())
"""


@pytest.mark.parametrize("fail", [False, True])
def test_other_ranks_poll_for_the_builder(tmp_path, fail):
    directory = tmp_path / "root" / "tokens" / "key"
    directory.parent.mkdir(parents=True)
    # a failure marker from an earlier launch must not stop this one
    stale = directory.with_name("key" + C.FAILED)
    stale.write_text("old failure")
    os.utime(stale, (time.time() - 3600,) * 2)
    run = lambda code: subprocess.Popen([sys.executable, "-c", code, str(directory), "fail" if fail else "ok"],  # noqa
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiters = [run(WAITER) for _ in range(2)]
    builder = run(BUILDER)
    results = [p.communicate(timeout=120) for p in waiters]
    builder.communicate(timeout=60)
    if fail:
        assert builder.returncode != 0 and all(p.returncode != 0 for p in waiters)
        assert all("failed on the main process: ValueError: no tokens today" in err for _, err in results)
        assert not builds(tmp_path / "root") and not directory.exists()
    else:
        assert builder.returncode == 0 and [out for out, _ in results] == ["built\n"] * 2
        assert [b["stage"] for b in builds(tmp_path / "root")] == ["tokens"]


# ---------------------------------------------------------------- tokenizers

@requires_shared
def test_load_gpt2_and_rugpt3(caplog):
    gpt2 = load_tokenizer(SHARED / "tokenizers" / "gpt2")
    assert gpt2("Hello world")["input_ids"] == [15496, 995] and gpt2.eos_token_id == 50256 == gpt2.pad_token_id
    with caplog.at_level(logging.INFO):
        ru = load_tokenizer(SHARED / "tokenizers" / "rugpt3")
    assert "AutoTokenizer cannot load" in caplog.text and "is not in its vocabulary and was added as id 50257" \
        in caplog.text
    assert len(ru) == 50258 and ru.eos_token_id == 50257
    text = "Все счастливые семьи похожи друг на друга"
    ids = ru(text)["input_ids"]
    assert ru.decode(ids) == text and len(ids) < len(gpt2(text)["input_ids"]) / 3


def test_tokenizer_errors_hash_and_vocab_check(tmp_path):
    from gptlab.errors import ConfigError, MissingPathError

    with pytest.raises(MissingPathError, match="^tokenizer.path=.*missing: no such directory$"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("no tokenizer here")
    with pytest.raises(ConfigError, match="^tokenizer.path=.*junk: cannot load a tokenizer there"):
        load_tokenizer(tmp_path / "junk")
    tok = train_bpe(make_docs(20), 300, 1, ["<|endoftext|>"])
    tok.save_pretrained(str(tmp_path / "tok"))
    h = tokenizer_hash(tmp_path / "tok")
    assert h == tokenizer_hash(tmp_path / "tok")
    check_vocab(tok, 300)
    with pytest.raises(ValueError, match="the tokenizer has 300 tokens but the model's embedding has only 256 rows"):
        check_vocab(tok, 256)
    train_bpe(make_docs(20, seed=1), 300, 1, ["<|endoftext|>"]).save_pretrained(str(tmp_path / "tok"))
    assert tokenizer_hash(tmp_path / "tok") != h


@requires_shared
def test_prepare_a_novel_with_the_rugpt3_tokenizer(tmp_path):
    novel = tmp_path / "dekabristy.txt"
    novel.write_text((SHARED / "tolstoy" / "dekabristy.txt").read_text(encoding="utf-8"), encoding="cp1251")
    cfg = compose(["data=text", f"data.files=[{novel}]", "data.encoding=cp1251", "data.valid_fraction=0.1",
                   f"tokenizer.path={SHARED / 'tokenizers' / 'rugpt3'}", "data.block_size=128"])
    data = P.prepare(cfg, tmp_path / "c", show_progress=False)
    assert data.train.tokens.dtype == np.uint16 and len(data.tokenizer) == 50258
    assert data.info["split"]["train"]["kept"] > 50 and len(data.valid) > 0
    text = data.tokenizer.decode(np.concatenate([data.train.tokens, data.valid.tokens]).tolist())
    assert text.startswith("ГЛАВА I") and "в царствование Александра II" in text


# ---------------------------------------------------------------- processes

@pytest.mark.slow
def test_two_processes_build_the_cache_exactly_once(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "train.py"), "debug=smoke", "trainer.max_steps=2",
           f"cache_dir={cache}", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert re.search(r"; 2 process\(es\), DistributedType.MULTI_CPU", log), log[:2000]
    assert sorted(b["stage"] for b in builds(cache)) == ["splits", "tokenizers", "tokens"]
    assert len({b["pid"] for b in builds(cache)}) == 1
    assert len(list((cache / "tokens").iterdir())) == 1  # no leftover temporary directory


@pytest.mark.slow
def test_prepare_entry_point(tmp_path, corpus):
    cmd = [sys.executable, "-m", "gptlab.data.prepare", "data=jsonl", f"data.files=[{corpus}]",
           "data.block_size=16", "data.valid_fraction=0.2", "tokenizer.vocab_size=300", f"cache_dir={tmp_path / 'c'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["valid"]["documents"] == 8 and summary["train"]["documents"] == 32
    assert summary["vocab_size"] == 300 and summary["train_blocks"] > 0
    assert "tokenize (concat)" in proc.stderr  # the progress bar
    assert [b["stage"] for b in builds(tmp_path / "c")] == ["splits", "tokenizers", "tokens"]


@pytest.mark.slow
def test_bench_prep_runs_on_a_slice(tmp_path):
    """CI-sized: every variant runs and reports positive numbers (speed is not asserted)."""
    text = "\n\n".join(" ".join(make_docs(5, seed=i)) for i in range(120))
    (tmp_path / "corpus.txt").write_text(text)
    train_bpe([text], 400, 1, ["<|endoftext|>"]).save_pretrained(str(tmp_path / "tok"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prep.py"), "--file", str(tmp_path / "corpus.txt"),
                           "--tokenizer", str(tmp_path / "tok"), "--max-bytes", "100000",
                           "--json", str(tmp_path / "prep.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if re.match(r"\| [\d.]+ \| \w+ \|", line)]
    assert [r[1].strip() for r in rows] == ["encode", "seed", "gptlab", "gptlab_cached"]
    for row in rows:
        mb, seconds, mb_s, _, tokens, peak = (float(row[i]) for i in (0, 2, 3, 4, 5, 6))
        assert 0.05 < mb <= 0.1 and seconds > 0 and mb_s > 0 and tokens > 1000 and peak > 10, row
    raw = json.loads((tmp_path / "prep.json").read_text())  # the raw rows behind the table
    assert [r["variant"] for r in raw["rows"]] == [r[1].strip() for r in rows] and "--max-bytes 100000" in raw["command"]
