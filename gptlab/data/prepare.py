"""sources -> split -> tokenizer -> packed token cache, each stage cached by fingerprint."""
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import load_tokenizer, train_bpe
from .blocks import TokenBlocks
from .cache import build_once, fingerprint
from .pack import write_token_stream
from .sources import python_source_files, read_texts, split_by_file

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    tokenizer: object
    train: TokenBlocks
    valid: TokenBlocks
    info: dict


def _tokenizer(cfg, train_files, source_fp: str, cache_root: Path, is_builder: bool):
    tc = cfg.tokenizer
    if tc.path:
        return load_tokenizer(tc.path)
    key = fingerprint({"train": source_fp, "vocab_size": tc.vocab_size,
                       "min_frequency": tc.min_frequency, "special_tokens": list(tc.special_tokens)})

    def build(tmp: Path) -> dict:
        log.info("training a %d-token byte-level BPE on %d files", tc.vocab_size, len(train_files))
        tok = train_bpe(read_texts(train_files), tc.vocab_size, tc.min_frequency, list(tc.special_tokens),
                        length=len(train_files))
        tok.save_pretrained(str(tmp))
        return {"vocab_size": len(tok)}

    return load_tokenizer(build_once(cache_root / "tokenizers" / key, build, is_builder))


def prepare(cfg, cache_root: Path, is_builder: bool = True, show_progress: bool = True) -> Prepared:
    dc = cfg.data
    if dc.source != "python_source":
        raise ValueError(f"data.source={dc.source!r} is not supported; choose python_source")
    files = python_source_files(list(dc.paths), dc.max_bytes)
    train_files, valid_files = split_by_file(files, dc.valid_fraction, dc.split_seed)
    describe = lambda fs: [(f.key, f.size, f.mtime_ns) for f in fs]  # noqa: E731
    train_fp = fingerprint(describe(train_files))
    tokenizer = _tokenizer(cfg, train_files, train_fp, cache_root, is_builder)

    key = fingerprint({"train": train_fp, "valid": fingerprint(describe(valid_files)),
                       "tokenizer": fingerprint(tokenizer.backend_tokenizer.to_str()), "pack": "concat-eos"})

    def build(tmp: Path) -> dict:
        info = {}
        for split, fs in (("train", train_files), ("valid", valid_files)):
            info[split] = write_token_stream(read_texts(fs), tokenizer, tmp / f"{split}.bin",
                                             desc=f"tokenize {split}", show_progress=show_progress)
            info[split]["files"] = len(fs)
        return info

    cache = build_once(cache_root / "tokens" / key, build, is_builder)
    info = json.loads((cache / "ready.json").read_text())
    T = dc.block_size
    train = TokenBlocks(cache / "train.bin", info["train"]["dtype"], T)
    valid = TokenBlocks(cache / "valid.bin", info["valid"]["dtype"], T)
    for name, blocks in (("train", train), ("valid", valid)):
        if len(blocks) == 0:
            raise ValueError(f"the {name} split has {len(blocks.tokens)} tokens, fewer than one "
                             f"block of data.block_size={T}")
    info["cache_dir"] = str(cache)
    return Prepared(tokenizer, train, valid, info)
