"""Where documents come from. Each source yields (name, text) pairs in a fixed order."""
import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

log = logging.getLogger(__name__)

# Generated tables and vendored blobs teach a model nothing about code.
MAX_FILE_BYTES = 500_000


@dataclass(frozen=True)
class SourceFile:
    path: Path
    key: str  # stable name, independent of where the installation lives
    size: int
    mtime_ns: int


def default_python_roots() -> List[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    return sorted({r.resolve() for r in roots if r.is_dir()})


def python_source_files(paths: Sequence[str], max_bytes: int) -> List[SourceFile]:
    """Deterministic selection of .py files under `paths` up to `max_bytes` in total.

    Files are ordered by a hash of their path relative to their root, so the cap
    samples the whole installation instead of the alphabetically first packages.
    """
    roots = [Path(p).expanduser().resolve() for p in paths] or default_python_roots()
    candidates = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"data.paths: {root} is not a directory")
        for p in root.rglob("*.py"):
            if not p.is_file():
                continue
            st = p.stat()
            if 0 < st.st_size <= MAX_FILE_BYTES:
                key = f"{root.name}/{p.relative_to(root).as_posix()}"
                candidates.append(SourceFile(p, key, st.st_size, st.st_mtime_ns))
    candidates.sort(key=lambda f: (hashlib.sha1(f.key.encode()).hexdigest(), f.key))
    chosen, total = [], 0
    for f in candidates:
        if total + f.size > max_bytes:
            continue
        chosen.append(f)
        total += f.size
    if not chosen:
        raise FileNotFoundError(f"no .py files found under {[str(r) for r in roots]}")
    return sorted(chosen, key=lambda f: f.key)


def split_by_file(files: Sequence[SourceFile], valid_fraction: float, seed: int) -> Tuple[list, list]:
    """Whole files go to one split, so no text leaks from train into validation."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"data.valid_fraction must be in (0, 1), got {valid_fraction}")
    if len(files) < 2:
        raise ValueError(f"need at least 2 files to split into train and validation, got {len(files)}")
    ranked = sorted(files, key=lambda f: hashlib.sha1(f"{seed}:{f.key}".encode()).hexdigest())
    n_valid = min(len(files) - 1, max(1, round(valid_fraction * len(files))))
    valid = set(f.key for f in ranked[:n_valid])
    return [f for f in files if f.key not in valid], [f for f in files if f.key in valid]


def read_texts(files: Sequence[SourceFile]) -> Iterator[str]:
    """File contents; files that are not UTF-8 (the stdlib's encoding tests) are skipped."""
    for f in files:
        try:
            yield f.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            log.debug("skipping non-UTF-8 file %s", f.path)
