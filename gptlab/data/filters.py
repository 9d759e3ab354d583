"""Filter documents, then split them into train and validation by document.

split_method=hash (the default) ranks documents by a hash of (split_seed, key) and sends
the round(valid_fraction * n) lowest to validation, so whole documents go to one split
and the choice depends only on the keys, never on the order or on memory. One counting
pass finds the hash threshold; later passes stream and compare against it.
split_method=sklearn draws the same documents as the notebooks' scikit-learn
`train_test_split(texts, test_size=valid_fraction, random_state=split_seed)` over the kept
documents in order (a RandomState(split_seed) permutation; the first ceil(fraction * n) are
validation), kept as a bit mask beside the plan.
"""
import hashlib
import logging
import math
from pathlib import Path
from typing import Iterator, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from .cache import read_meta
from .sources import DataError, Source

log = logging.getLogger(__name__)


def keep(text: str, keywords: Sequence[str], min_chars: int) -> bool:
    """At least min_chars characters besides surrounding blanks (and never blank), and any
    keyword if keywords are given."""
    if not text or text.isspace() or (min_chars > 1 and len(text.strip()) < min_chars):
        return False
    return not keywords or any(k in text for k in keywords)


def doc_hash(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")


def kept_documents(source: Source, part: str, stats: dict = None) -> Iterator[Tuple[str, str]]:
    s = source.s
    for key, text in source.documents(part):
        ok = keep(text, s.keywords, s.min_chars)
        if stats is not None:
            stats["documents"] += 1
            stats["kept"] += ok
            stats["chars"] += len(text) if ok else 0
        if ok:
            yield key, text


def _filters(source: Source) -> str:
    s = source.s
    return f"min_chars={s.min_chars}" + (f", keywords={list(s.keywords)}" if s.keywords else "")


SPLIT_METHODS = ("hash", "sklearn")
MASK = "valid_mask.bin"  # split_method=sklearn: one bit per kept document, set for validation


def plan_split(sources: Sequence[Source], valid_fraction: float, seed: int, show_progress: bool = True,
               method: str = "hash", out_dir: Path = None) -> dict:
    """Count and filter every document once; return the split (a hash threshold, or a mask
    written to out_dir) and stats."""
    explicit = any(src.has_valid for src in sources)
    parts = ("train", "valid") if explicit else ("train",)
    hashes, stats = [], {p: {"documents": 0, "kept": 0, "chars": 0} for p in parts}
    per_source = []
    with tqdm(desc="read and filter", unit="doc", disable=not show_progress) as bar:
        for src in sources:
            mine = {p: {"documents": 0, "kept": 0, "chars": 0} for p in parts}
            for part in parts if src.has_valid else ("train",):
                for key, _ in kept_documents(src, part, mine[part]):
                    if not explicit:
                        hashes.append(doc_hash(seed, key))
                    bar.update(1)
            for part in parts:
                for k in mine[part]:
                    stats[part][k] += mine[part][k]
            n, kept = mine["train"]["documents"], mine["train"]["kept"]
            per_source.append({"source": src.name, **mine["train"]})
            if n and not kept:
                raise DataError(f"data.source {src.name}: all {n} documents were dropped by the filters "
                                f"({_filters(src)})")
            if n:
                log.info("%s: kept %d of %d documents (%.1f%%) with %s", src.name, kept, n, 100 * kept / n,
                         _filters(src))
    total = stats["train"]
    if not total["kept"]:
        raise DataError(f"the corpus is empty after filtering: {total['documents']} documents read, none kept")
    plan = {"explicit_valid": explicit, "per_source": per_source, "train": dict(total)}
    if explicit:
        if not stats["valid"]["kept"]:
            raise DataError(f"the validation split is empty: data.valid_files/valid_query gave "
                            f"{stats['valid']['documents']} documents, none kept by the filters")
        plan["valid"] = dict(stats["valid"])
        plan["n_valid"] = stats["valid"]["kept"]
        return plan
    n = len(hashes)
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"data.valid_fraction must be in (0, 1) without data.valid_files, got {valid_fraction}")
    if n < 2:
        raise DataError(f"the corpus has {n} document after filtering, too few to split by data.valid_fraction; "
                        f"give data.valid_files, or cut big files into documents with data.text_unit=paragraph or line")
    if method == "sklearn":
        k = math.ceil(valid_fraction * n)  # scikit-learn's n_test
        mask = np.zeros(n, dtype=bool)
        mask[np.random.RandomState(seed).permutation(n)[:k]] = True
        np.packbits(mask).tofile(Path(out_dir) / MASK)
        plan.update(method=method, n_valid=k)
        return plan
    k = min(n - 1, max(1, round(valid_fraction * n)))
    # the k-th smallest hash; 64-bit hashes of distinct keys do not tie in practice
    plan["threshold"] = int(np.partition(np.array(hashes, dtype=np.uint64), k - 1)[k - 1])
    plan["n_valid"] = k
    return plan


def read_plan(split_dir: Path) -> dict:
    """The split's meta.json, with the validation mask of split_method=sklearn loaded."""
    plan = read_meta(split_dir)
    if plan.get("method") == "sklearn":
        n = plan["train"]["kept"]
        plan["mask"] = np.unpackbits(np.fromfile(Path(split_dir) / MASK, dtype=np.uint8), count=n).astype(bool)
    return plan


def labelled_documents(sources: Sequence[Source], plan: dict, seed: int) -> Iterator[Tuple[bool, str]]:
    """(is_valid, text) for every kept document, in source order."""
    i = 0
    for src in sources:
        for key, text in kept_documents(src, "train"):
            if plan["explicit_valid"]:
                yield False, text
            elif "mask" in plan:
                yield bool(plan["mask"][i]), text
            else:
                yield doc_hash(seed, key) <= plan["threshold"], text
            i += 1
        if plan["explicit_valid"] and src.has_valid:
            for _, text in kept_documents(src, "valid"):
                yield True, text
