"""Tokenize labelled documents and write the train and valid token streams.

`concat`: each document's ids then EOS, all in one stream; blocks are cut when the
stream is read (data/blocks.py), so the remainder of the last block is dropped there
and changing block_size needs no new cache. `chunk`: each document on its own is cut
into block_size pieces and its short tail dropped (seed 002's
`return_overflowing_tokens`), so the stream is a whole number of blocks. `sample`: each
document is one training sample (seed 003's one padded row per line), its ids stored as
they are, cut at block_size, with its start offset in `<split>.bin.idx`.

Speed: documents go to the Rust tokenizer in batches of about 256k characters, which it
encodes on all cores. A long document is cut into pieces first, only at places where
byte-level BPE can never merge across (before a space that follows a non-space), so the
ids are exactly those of the whole document while memory stays at one batch.
"""
import itertools
from pathlib import Path
from typing import Iterable, List, Tuple

import numpy as np
from tokenizers import pre_tokenizers
from tqdm.auto import tqdm

PIECE_CHARS = 16_384
BATCH_CHARS = 1 << 18
BATCH_PIECES = 2048


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def splittable(backend) -> bool:
    """True when cutting before ' ' (after a non-space) cannot change the ids: GPT-2's
    byte-level pre-tokenizer with its regex, no prefix space and no normalizer."""
    pre = backend.pre_tokenizer
    return (backend.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel)
            and pre.use_regex and not pre.add_prefix_space)


def safe_pieces(text: str, size: int = PIECE_CHARS) -> List[str]:
    """`text` cut into pieces of about `size` characters at token-safe places."""
    pieces, start, n = [], 0, len(text)
    while n - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:  # no safe place in the window: take the next one after it
            cut = start + size
            while cut < n and not (text[cut] == " " and not text[cut - 1].isspace()):
                cut += 1
            if cut >= n:
                break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class _Stream:
    """One split's output file and counters."""

    def __init__(self, path: Path, dtype: np.dtype, pack: str, block_size: int, eos: int):
        self.f = open(path, "wb")
        self.dtype, self.pack, self.block_size, self.eos = dtype, pack, block_size, eos
        self.out: List[list] = []  # id lists waiting for the next write
        self.doc: List[list] = []  # chunk and sample modes: the current document's pieces
        self.tokens = self.documents = self.dropped = 0
        self.bytes = 0  # UTF-8 bytes of the split's text, as tokenized
        self.offsets = [0] if pack == "sample" else None

    def add(self, ids: list, doc_end: bool) -> None:
        if self.pack == "concat":
            self.out.append(ids)
            if doc_end:
                self.out.append([self.eos])
        else:
            self.doc.append(ids)
            if doc_end:
                flat = list(itertools.chain.from_iterable(self.doc))
                if self.pack == "chunk":
                    keep = len(flat) // self.block_size * self.block_size
                else:
                    keep = min(len(flat), self.block_size)
                    self.offsets.append(self.offsets[-1] + keep)
                self.out.append(flat[:keep])
                self.dropped += len(flat) - keep
                self.doc = []
        self.documents += doc_end

    def flush(self) -> None:
        count = sum(len(ids) for ids in self.out)
        np.fromiter(itertools.chain.from_iterable(self.out), dtype=self.dtype, count=count).tofile(self.f)
        self.tokens += count
        self.out = []

    def close(self) -> dict:
        self.flush()
        self.f.close()
        if self.offsets is not None:
            np.array(self.offsets, dtype=np.uint64).tofile(f"{self.f.name}.idx")
        return {"tokens": self.tokens, "documents": self.documents, "dropped_tokens": self.dropped, "bytes": self.bytes}


def write_token_streams(labelled: Iterable[Tuple[bool, str]], tokenizer, out_dir: Path, pack: str = "concat",
                        block_size: int = 0, total_chars: int = None, show_progress: bool = True) -> dict:
    """Write `train.bin` and `valid.bin` from (is_valid, text) pairs; memory stays at one batch."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    dtype = token_dtype(len(tokenizer))
    cut = splittable(backend)
    streams = {v: _Stream(Path(out_dir) / f"{'valid' if v else 'train'}.bin", dtype, pack, block_size,
                          tokenizer.eos_token_id) for v in (False, True)}
    texts: List[str] = []
    where: List[Tuple[bool, bool]] = []  # (is_valid, last piece of its document)

    def run_batch():
        for enc, text, (valid, end) in zip(encode(texts, add_special_tokens=False), texts, where):
            streams[valid].add(enc.ids, end)
            streams[valid].bytes += len(text.encode("utf-8"))
        for s in streams.values():
            s.flush()
        bar.update(sum(map(len, texts)))
        texts.clear()
        where.clear()

    with tqdm(total=total_chars, desc=f"tokenize ({pack})", unit="char", unit_scale=True,
              disable=not show_progress) as bar:
        size = 0
        for valid, text in labelled:
            pieces = safe_pieces(text) if cut and len(text) > PIECE_CHARS else [text]
            for i, piece in enumerate(pieces):
                texts.append(piece)
                where.append((valid, i == len(pieces) - 1))
                size += len(piece)
                if size >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
                    run_batch()
                    size = 0
        run_batch()
    info = {("valid" if v else "train"): s.close() for v, s in streams.items()}
    info["dtype"] = dtype.name
    return info
