"""sources -> filter -> split -> tokenizer -> packed token cache, each stage cached by fingerprint.

Three cache stages live under the cache root, each `<stage>/<key>/meta.json`:
`splits` (counts, filter stats and the split's hash threshold), `tokenizers` (a
trained BPE) and `tokens` (train.bin and valid.bin). A key covers everything its
stage depends on: the sources (paths, sizes, mtimes, settings), the filter and split
settings, the tokenizer's content hash and the packing. So a second run with the same
settings reads nothing but stats and meta files, and any change rebuilds what it must.

Build only: `python -m gptlab.data.prepare [hydra overrides]`.
"""
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import List

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..hub import is_hub_id, resolve
from ..tokenizer import load_tokenizer, sample_evenly, token_byte_lengths, tokenizer_hash, tokenizer_path, train_bpe
from .blocks import TokenBlocks, TokenSamples
from .cache import build_once, fingerprint, read_meta
from .filters import SPLIT_METHODS, labelled_documents, plan_split, read_plan
from .librus import LibrusSource
from .pack import write_token_streams
from .sources import (DataError, HfSource, JsonlSource, PythonSource, Source, SqliteSource,
                      TextSource)

log = logging.getLogger(__name__)

SOURCES = {cls.name: cls for cls in (PythonSource, TextSource, JsonlSource, SqliteSource, HfSource, LibrusSource)}
# Keys a list entry of data.source may override for itself.
SOURCE_KEYS = ("files", "valid_files", "encoding", "text_unit", "text_field", "db", "query", "valid_query",
               "builder", "streaming", "select", "valid_select", "config_name", "revision", "split",
               "valid_builder", "valid_revision", "valid_split", "paths", "max_bytes", "urls", "download_dir",
               "download_timeout_s", "download_retries", "download_max_bytes", "keywords", "min_chars")
TEXT_UNITS = ("file", "paragraph", "line")
CACHE_VERSION = 2  # bump when the on-disk layout or the packing changes


@dataclass
class Prepared:
    tokenizer: object
    train: TokenBlocks | TokenSamples
    valid: TokenBlocks | TokenSamples
    info: dict


def _plain(obj):
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def make_sources(dc, cache_root: Path) -> List[Source]:
    """One Source per entry of data.source; resolving files here makes a missing one fail early."""
    data = _plain(dc)
    entries = data["source"] if isinstance(data["source"], list) else [data["source"]]
    if not entries:
        raise DataError("data.source is an empty list")
    sources = []
    for i, entry in enumerate(entries):
        settings = {k: data[k] for k in SOURCE_KEYS}
        if isinstance(entry, dict):
            entry = dict(entry)
            name = entry.pop("name", None)
            unknown = sorted(set(entry) - set(SOURCE_KEYS))
            if unknown:
                raise DataError(f"data.source[{i}]: unknown key(s) {unknown}; a source entry may set name and "
                                f"{', '.join(SOURCE_KEYS)}")
            settings.update(entry)
        else:
            name = entry
        if name not in SOURCES:
            raise DataError(f"data.source: {name!r} is not a source; choose from {', '.join(SOURCES)}")
        if settings["text_unit"] not in TEXT_UNITS:
            raise DataError(f"data.text_unit={settings['text_unit']!r}: choose one of {', '.join(TEXT_UNITS)}")
        settings["split_seed"] = data["split_seed"]  # one for the whole corpus (hf's select shuffles with it)
        sources.append(SOURCES[name](SimpleNamespace(**settings), cache_root))
    return sources


def _check(dc, sources) -> None:
    if (dc.select is not None or dc.valid_select is not None) and not any(isinstance(s, HfSource) for s in sources):
        raise DataError("data.select and data.valid_select sample rows of the hf source (datasets' "
                        "shuffle(seed).select(N)); this corpus has none")
    if dc.split_method not in SPLIT_METHODS:
        raise DataError(f"data.split_method={dc.split_method!r}: choose {' or '.join(SPLIT_METHODS)}")
    if dc.block_size < 2:
        raise DataError(f"data.block_size must be at least 2, got {dc.block_size}")
    if not any(s.has_valid for s in sources) and not 0.0 < dc.valid_fraction < 1.0:
        raise DataError(f"data.valid_fraction must be in (0, 1) without data.valid_files, got {dc.valid_fraction}")


def _tokenizer(cfg, sources, split_dir: Path, corpus_key: str, cache_root: Path, is_builder: bool):
    """(tokenizer, content hash): loaded from tokenizer.path, or a BPE trained on the train split."""
    tc = cfg.tokenizer
    path = tokenizer_path(cfg)
    if path:  # a directory or a Hub id; the cache key hashes the files, never the id
        if is_hub_id(path):
            revision = tc.revision if tc.path else cfg.model.revision
            path = resolve(path, revision, key="tokenizer.path", weights=False).path
        return load_tokenizer(path), tokenizer_hash(path)
    plan = read_plan(split_dir)
    # chars of the kept documents, valid ones included: an upper estimate of the train
    # split's size, close to its bytes for mostly-ASCII text.
    corpus_chars = plan["train"]["chars"]
    cap = tc.max_train_bytes
    sampled = cap is not None and corpus_chars > cap
    key = fingerprint({"corpus": corpus_key, "vocab_size": tc.vocab_size, "min_frequency": tc.min_frequency,
                       "special_tokens": list(tc.special_tokens),
                       **({"kind": tc.kind} if tc.kind != "byte_level" else {}),
                       # only a cap that cuts changes the tokenizer, so only then does it key it
                       **({"max_train_bytes": cap} if sampled else {})})

    def build(tmp: Path) -> dict:
        n_train = plan["train"]["kept"] - (0 if plan["explicit_valid"] else plan["n_valid"])
        texts = (text for valid, text in labelled_documents(sources, plan, cfg.data.split_seed) if not valid)
        seen = {"documents": 0, "bytes": 0}

        def counted(texts):
            for text in texts:
                seen["documents"] += 1
                seen["bytes"] += len(text.encode())
                yield text

        if sampled:
            log.info("tokenizer.max_train_bytes=%d: the BPE reads an even sample of the ~%d-character train split",
                     cap, corpus_chars)
        log.info("training a %d-token %s BPE on the train split (%d documents)", tc.vocab_size,
                 tc.kind.replace("_", "-"), n_train)
        tok = train_bpe(counted(sample_evenly(texts, corpus_chars, cap)), tc.vocab_size, tc.min_frequency,
                        list(tc.special_tokens), length=n_train, kind=tc.kind)
        log.info("the BPE was trained on %d documents, %.1f MB", seen["documents"], seen["bytes"] / 1e6)
        tok.save_pretrained(str(tmp))
        return {"vocab_size": len(tok), "documents": n_train, "sample_documents": seen["documents"],
                "sample_bytes": seen["bytes"]}

    directory = build_once(cache_root / "tokenizers" / key, build, is_builder)
    return load_tokenizer(directory), tokenizer_hash(directory)


def prepare(cfg, cache_root: Path, is_builder: bool = True, show_progress: bool = True) -> Prepared:
    dc = cfg.data
    cache_root = Path(cache_root).expanduser()
    sources = make_sources(dc, cache_root)
    _check(dc, sources)
    corpus = {"sources": [s.fingerprint() for s in sources],
              "filters": [(list(s.s.keywords), s.s.min_chars) for s in sources],
              "split": (dc.valid_fraction, dc.split_seed, *([dc.split_method] if dc.split_method != "hash" else [])),
              "version": CACHE_VERSION}
    corpus_key = fingerprint(corpus)
    split_dir = build_once(cache_root / "splits" / corpus_key,
                           lambda tmp: plan_split(sources, dc.valid_fraction, dc.split_seed, show_progress,
                                                  dc.split_method, tmp),
                           is_builder)
    tokenizer, tok_hash = _tokenizer(cfg, sources, split_dir, corpus_key, cache_root, is_builder)

    T = dc.block_size
    key = fingerprint({"corpus": corpus_key, "tokenizer": tok_hash, "eos": tokenizer.eos_token_id,
                       "pack": dc.pack, "block_size": None if dc.pack == "concat" else T})

    def build(tmp: Path) -> dict:
        plan = read_plan(split_dir)
        chars = plan["train"]["chars"] + plan.get("valid", {}).get("chars", 0)
        info = write_token_streams(labelled_documents(sources, plan, dc.split_seed), tokenizer, tmp, dc.pack, T,
                                   total_chars=chars, show_progress=show_progress)
        return {**info, "pack": dc.pack, "tokenizer_hash": tok_hash, "split": read_meta(split_dir)}

    cache = build_once(cache_root / "tokens" / key, build, is_builder)
    info = read_meta(cache)
    rows = TokenSamples if dc.pack == "sample" else TokenBlocks
    train = rows(cache / "train.bin", info["dtype"], T)
    valid = rows(cache / "valid.bin", info["dtype"], T)
    for name, blocks in (("train", train), ("valid", valid)):
        if len(blocks) == 0:
            raise DataError(f"the {name} split has {len(blocks.tokens)} tokens, fewer than one block of "
                            f"data.block_size={T}")
        info[name]["blocks"] = len(blocks)
        if dc.pack == "concat":  # the stream's tail that does not fill a block
            info[name]["dropped_tokens"] = len(blocks.tokens) - len(blocks) * T
    train.token_bytes = valid.token_bytes = token_byte_lengths(tokenizer)
    _log_summary(info, dc)
    info["cache_dir"] = str(cache)
    return Prepared(tokenizer, train, valid, info)


def _log_summary(info: dict, dc) -> None:
    plan = info["split"]
    read, kept = plan["train"]["documents"], plan["train"]["kept"]
    how = "explicit validation data" if plan["explicit_valid"] else f"valid_fraction={dc.valid_fraction}"
    log.info("corpus: kept %d of %d documents (%.1f%%) after filters; %s gives %d validation documents",
             kept, read, 100 * kept / max(read, 1), how, plan["n_valid"])
    for name in ("train", "valid"):
        s = info[name]
        if dc.pack == "sample":
            log.info("%s: %d samples of up to %d tokens (%s), %d tokens cut from longer ones", name, s["blocks"],
                     dc.block_size, info["dtype"], s["dropped_tokens"])
            continue
        log.info("%s: %d documents, %d blocks of %d tokens (%s) kept, %d tokens dropped by %s packing",
                 name, s["documents"], s["blocks"], dc.block_size, info["dtype"], s["dropped_tokens"], dc.pack)


def _main() -> None:
    import hydra

    from ..config import register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
    def main(cfg) -> None:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s %(name)s] %(message)s",
                            datefmt="%H:%M:%S")
        data = prepare(cfg, Path(cfg.cache_dir).expanduser(), is_builder=True, show_progress=True)
        summary = {k: data.info[k] for k in ("cache_dir", "train", "valid", "dtype", "pack")}
        summary.update(vocab_size=len(data.tokenizer), train_blocks=len(data.train), valid_blocks=len(data.valid))
        print(json.dumps(summary, indent=2))

    main()


if __name__ == "__main__":
    _main()
