"""Tokenize documents and write them as one token stream, EOS after each document."""
from pathlib import Path
from typing import Iterable, Iterator, List

import numpy as np
from tqdm.auto import tqdm


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _batches(texts: Iterable[str], size: int) -> Iterator[List[str]]:
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_token_stream(texts: Iterable[str], tokenizer, out_path: Path, desc: str = "tokenize",
                       docs_per_batch: int = 256, show_progress: bool = True) -> dict:
    """Append every document's ids plus EOS to `out_path`; memory stays at one batch.

    `encode_batch` of the Rust tokenizer runs the batch on all cores.
    """
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    n_tokens = n_docs = 0
    with open(out_path, "wb") as f, tqdm(desc=desc, unit="doc", disable=not show_progress) as bar:
        for batch in _batches(texts, docs_per_batch):
            encs = backend.encode_batch(batch, add_special_tokens=False)
            ids = [e.ids + [eos] for e in encs]
            flat = np.fromiter((i for doc in ids for i in doc), dtype=dtype)
            flat.tofile(f)
            n_tokens += flat.size
            n_docs += len(batch)
            bar.update(len(batch))
    return {"tokens": n_tokens, "documents": n_docs, "dtype": dtype.name}
