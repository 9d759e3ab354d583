"""Where documents come from. Each source yields (key, text) pairs in a fixed order.

A key names a document stably (file name and position, row number), so the split,
which hashes keys, does not depend on where a corpus lives. `fingerprint()` is cheap
(file stats and settings, no reading), so every rank computes the same cache keys
before anything is built.
"""
import codecs
import glob
import hashlib
import json
import logging
import os
import re
import sqlite3
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, List, Sequence, Tuple

from ..errors import DataError

log = logging.getLogger(__name__)

# Generated tables and vendored blobs teach a model nothing about code.
MAX_FILE_BYTES = 500_000
READ_BLOCK_BYTES = 1 << 20

Doc = Tuple[str, str]


class MissingFileError(DataError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class SourceFile:
    path: Path
    key: str  # stable name, independent of where the installation lives
    size: int
    mtime_ns: int


def file_stats(paths: Sequence[Path]) -> list:
    return [(str(p), *_stat(p)) for p in paths]


def _stat(p: Path) -> Tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def resolve_files(patterns: Sequence[str], setting: str) -> List[Path]:
    """Files and globs, in the given order; a missing file or an empty glob is an error."""
    out: List[Path] = []
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        if any(c in pat for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(pat, recursive=True) if Path(m).is_file())
            if not matches:
                raise MissingFileError(f"{setting}: the glob {pat!r} matches no file")
            out.extend(matches)
        elif Path(pat).is_dir():
            raise DataError(f"{setting}: {pat} is a directory; give files or a glob such as {pat}/*.txt")
        elif not Path(pat).is_file():
            raise MissingFileError(f"{setting}: file {pat} does not exist")
        else:
            out.append(Path(pat))
    seen = set()
    return [p.resolve() for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


# ---------------------------------------------------------------- decoding text files

def decoded_blocks(path: Path, encoding: str) -> Iterator[str]:
    """A file's text in blocks of about 1 MB, CRLF/CR turned into LF.

    A byte that does not decode is an error naming the file, the byte offset and the
    line, which `open(..., errors="strict")` would not tell.
    """
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"data.encoding={encoding!r} is not a known codec") from None
    offset, line, carry, cr = 0, 1, b"", False
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK_BYTES)
            data, last = carry + block, not block
            try:
                text, carry = data.decode(encoding), b""
            except UnicodeDecodeError as e:
                # a multi-byte character cut by the block boundary: finish it next block
                if not last and e.end == len(data) and e.start >= len(data) - 4:
                    text, carry = data[:e.start].decode(encoding), data[e.start:]
                else:
                    at = offset + e.start
                    line_at = line + data[:e.start].count(b"\n")
                    raise DataError(f"{path}: byte 0x{data[e.start]:02x} at offset {at} (line {line_at}) is not "
                                    f"valid {encoding}; set data.encoding (e.g. cp1251)") from None
            consumed = len(data) - len(carry)
            line += data[:consumed].count(b"\n")
            offset += consumed
            if cr:  # a CR that ended the previous block
                text = "\r" + text
            cr = text.endswith("\r") and not last
            if cr:
                text = text[:-1]
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if last:
                return


_PARAGRAPH = re.compile(r"\n\s*\n")


def split_units(blocks: Iterator[str], unit: str) -> Iterator[str]:
    """Documents in a decoded stream: the whole stream, paragraphs or lines.

    The result does not depend on where the blocks were cut: only text up to the last
    non-blank character is split, the rest waits for the next block.
    """
    if unit == "file":
        yield "".join(blocks)
        return
    sep = _PARAGRAPH if unit == "paragraph" else re.compile("\n")
    buf = ""
    for block in blocks:
        buf += block
        end = len(buf.rstrip())
        parts = sep.split(buf[:end])
        yield from filter(None, (p.strip("\n") for p in parts[:-1]))
        buf = parts[-1] + buf[end:]
    yield from filter(None, (p.strip("\n") for p in sep.split(buf)))


# ---------------------------------------------------------------- sources

class Source:
    """Base: `settings` holds this source's keys (see `KEYS`) merged from data.*."""
    name = ""
    KEYS: Tuple[str, ...] = ()

    def __init__(self, settings: SimpleNamespace, cache_root: Path):
        self.s, self.cache_root = settings, cache_root

    def fingerprint(self) -> dict:
        return {"name": self.name, **{k: getattr(self.s, k) for k in self.KEYS}}

    @property
    def has_valid(self) -> bool:
        return False

    def documents(self, part: str = "train") -> Iterator[Doc]:
        raise NotImplementedError


class FileSource(Source):
    """Sources reading `files` (train) and `valid_files` (an explicit validation split)."""

    def __init__(self, settings, cache_root):
        super().__init__(settings, cache_root)
        if not settings.files:
            raise DataError(f"data.files is empty: the {self.name} source needs files or globs")
        self.parts = {"train": resolve_files(settings.files, "data.files"),
                      "valid": resolve_files(settings.valid_files, "data.valid_files")}

    @property
    def has_valid(self) -> bool:
        return bool(self.parts["valid"])

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "stats": {p: file_stats(fs) for p, fs in self.parts.items()}}

    def documents(self, part: str = "train") -> Iterator[Doc]:
        for i, path in enumerate(self.parts[part]):
            for j, text in enumerate(self.file_documents(path)):
                yield f"{part}/{i}/{path.name}#{j}", text

    def file_documents(self, path: Path) -> Iterator[str]:
        raise NotImplementedError


class TextSource(FileSource):
    name = "text"
    KEYS = ("encoding", "text_unit")

    def file_documents(self, path):
        return split_units(decoded_blocks(path, self.s.encoding), self.s.text_unit)


class JsonlSource(FileSource):
    name = "jsonl"
    KEYS = ("encoding", "text_field")

    def file_documents(self, path):
        field = self.s.text_field
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode(self.s.encoding)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} line {n}: byte 0x{raw[e.start]:02x} is not valid {self.s.encoding}; "
                                    f"set data.encoding") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
                if field not in row:
                    raise DataError(f"{path} line {n}: no field {field!r} (fields: {', '.join(row) or 'none'}); "
                                    f"set data.text_field")
                text = row[field]
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path} line {n}: field {field!r} is {type(text).__name__}, not a string")
                yield text or ""


class HfSource(FileSource):
    """`datasets.load_dataset(builder, data_files=...)`, `load_from_disk` for builder=disk, or a
    dataset repo: a Hub id (through the HF cache, see hub.py) or a local directory laid out like one.

    streaming=true reads rows as they are used: a local directory file by file, a Hub id over
    the network at its pinned commit, with nothing downloaded or converted to Arrow first, so
    a keyword filter keeps a small part of a big repository (seed 002) in little memory.
    select=N keeps N rows, as seed 002's `shuffle(seed).select(range(N))`.
    """
    name = "hf"
    KEYS = ("builder", "text_field", "streaming", "select", "valid_select", "split_seed")
    BUILDERS = ("json", "csv", "parquet", "arrow", "text", "disk")

    def __init__(self, settings, cache_root):
        if settings.builder not in self.BUILDERS:
            self.repos = self._repos(settings)
            Source.__init__(self, settings, cache_root)
            self.parts = {p: [r[0].path or r[0].repo_id] if r else [] for p, r in self.repos.items()}
        elif settings.builder == "disk":  # files are save_to_disk directories: stat what is inside
            for key in ("files", "valid_files"):
                for d in getattr(settings, key):
                    if not Path(d).expanduser().is_dir():
                        raise MissingFileError(f"data.{key}: {d} is not a directory saved with save_to_disk")
            Source.__init__(self, settings, cache_root)
            self.parts = {p: [Path(d).expanduser().resolve() for d in getattr(settings, k)]
                          for p, k in (("train", "files"), ("valid", "valid_files"))}
            if not self.parts["train"]:
                raise DataError("data.files is empty: the hf source needs files or a save_to_disk directory")
        else:
            super().__init__(settings, cache_root)

    @classmethod
    def reads_repo(cls, dc) -> bool:
        """Whether data.* reads dataset repos (data.builder is an id or a directory, not a file format)."""
        return dc.source == "hf" and dc.builder not in cls.BUILDERS

    @staticmethod
    def _repos(s) -> dict:
        """{part: (Snapshot, split) or None}; a missing id fails here, before any data work."""
        from ..hub import HUB_ID, resolve

        if not (Path(s.builder).expanduser().is_dir() or HUB_ID.match(s.builder)):
            raise DataError(f"data.builder={s.builder!r}: choose one of {', '.join(HfSource.BUILDERS)}, "
                            f"a Hub dataset id (org/name) or a local dataset directory")
        train = resolve(s.builder, s.revision, key="data.builder", repo_type="dataset", download=not s.streaming)
        valid = None
        if s.valid_builder:
            valid = (resolve(s.valid_builder, s.valid_revision, key="data.valid_builder", repo_type="dataset",
                             download=not s.streaming), s.valid_split or s.split)
        elif s.valid_split:
            valid = (train, s.valid_split)
        return {"train": (train, s.split), "valid": valid}

    def fingerprint(self) -> dict:
        if self.s.builder in self.BUILDERS and self.s.builder != "disk":
            return super().fingerprint()
        if self.s.builder == "disk":
            stats = {p: [file_stats(sorted(x for x in d.rglob("*") if x.is_file())) for d in ds]
                     for p, ds in self.parts.items()}
            return {**Source.fingerprint(self), "stats": stats}
        return {**Source.fingerprint(self), "config_name": self.s.config_name,
                "repos": {p: r and (_repo_identity(r[0]), r[1]) for p, r in self.repos.items()}}

    def _load(self, part: str):
        import datasets

        files = [str(p) for p in self.parts[part]]
        try:
            if self.s.builder not in self.BUILDERS:
                snapshot, split = self.repos[part]
                where = {"path": snapshot.repo_id, "revision": snapshot.commit} if snapshot.path is None else {
                    "path": str(snapshot.path)}
                return datasets.load_dataset(**where, name=self.s.config_name, split=split,
                                             streaming=self.s.streaming,
                                             cache_dir=str(self.cache_root / "hf_datasets"))
            if self.s.builder == "disk":
                loaded = [datasets.load_from_disk(f) for f in files]
                loaded = [d["train"] if isinstance(d, datasets.DatasetDict) else d for d in loaded]
                return loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
            return datasets.load_dataset(self.s.builder, data_files=files, split="train",
                                         streaming=self.s.streaming,
                                         cache_dir=str(self.cache_root / "hf_datasets"))
        except KeyError as e:
            raise DataError(f"data.files {files}: the saved dataset has no 'train' split ({e})") from None
        except Exception as e:  # datasets wraps parse errors in many types
            raise DataError(f"data.builder={self.s.builder} could not load {files}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None

    def _selected(self, ds, part: str):
        n = self.s.select if part == "train" else self.s.valid_select
        if n is None:
            return ds
        if self.s.streaming:  # an approximate shuffle through a buffer, as datasets streams it
            return ds.shuffle(seed=self.s.split_seed, buffer_size=10_000).take(n)
        return ds.shuffle(seed=self.s.split_seed).select(range(min(n, len(ds))))

    def documents(self, part: str = "train") -> Iterator[Doc]:
        ds, col = self._selected(self._load(part), part), self.s.text_field
        names = ds.column_names
        if names is not None and col not in names:
            raise DataError(f"data.text_field={col!r} is not a column of {self.parts[part][0]} "
                            f"(columns: {', '.join(names)})")
        i = 0
        for batch in ds.iter(batch_size=1000):
            if col not in batch:
                raise DataError(f"data.text_field={col!r} is not a column of {self.parts[part][0]} "
                                f"(columns: {', '.join(batch)})")
            for text in batch[col]:
                yield f"{part}/row{i}", text if isinstance(text, str) else ("" if text is None else str(text))
                i += 1


def _repo_identity(snapshot):
    """A Hub snapshot is named by its commit; a local dataset directory by its files' stats."""
    if snapshot.commit:
        return [snapshot.repo_id, snapshot.commit]
    return file_stats(sorted(x for x in snapshot.path.rglob("*") if x.is_file()))


class SqliteSource(Source):
    """Rows of a query: the text is its only column, or the column named data.text_field."""
    name = "sqlite"
    KEYS = ("query", "valid_query", "encoding", "text_field")

    def __init__(self, settings, cache_root):
        super().__init__(settings, cache_root)
        if not settings.db:
            raise DataError("data.db is not set: the sqlite source needs a database file")
        if not settings.query:
            raise DataError("data.query is not set: the sqlite source needs a query (its text column: its only "
                            "one, or data.text_field)")
        self.db = Path(settings.db).expanduser().resolve()
        if not self.db.is_file():
            raise MissingFileError(f"data.db: file {settings.db} does not exist")

    @property
    def has_valid(self) -> bool:
        return bool(self.s.valid_query)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "db": file_stats([self.db])}

    def documents(self, part: str = "train") -> Iterator[Doc]:
        query = self.s.query if part == "train" else self.s.valid_query
        setting = "data.query" if part == "train" else "data.valid_query"
        # The BPE trainer pulls documents from its own threads, one at a time: the connection
        # may be used from another thread than the one that opened it, never from two at once.
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, check_same_thread=False)
        try:
            try:
                cur = con.execute(query)
            except sqlite3.Error as e:
                tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
                raise DataError(f"{setting} on {self.db}: {e} (tables: {', '.join(tables) or 'none'})") from None
            columns = [d[0] for d in cur.description]
            if len(columns) == 1:
                col = 0
            elif self.s.text_field in columns:
                col = columns.index(self.s.text_field)
            else:
                raise DataError(f"{setting} returns the columns {', '.join(columns)}: set data.text_field to the "
                                f"text's (not {self.s.text_field!r}), or select that one column")
            for i, row in enumerate(cur):
                text = row[col]
                if isinstance(text, bytes):
                    text = text.decode(self.s.encoding, errors="strict")
                yield f"{part}/row{i}", "" if text is None else str(text)
        finally:
            con.close()


class PythonSource(Source):
    """The embedded default corpus: .py files of the interpreter, one document per file."""
    name = "python_source"
    KEYS = ("paths", "max_bytes")

    def __init__(self, settings, cache_root):
        super().__init__(settings, cache_root)
        self.files = python_source_files(list(settings.paths), settings.max_bytes)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "files": [(f.key, f.size, f.mtime_ns) for f in self.files]}

    def documents(self, part: str = "train") -> Iterator[Doc]:
        for f in self.files:
            try:
                yield f.key, f.path.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # the stdlib's encoding tests
                log.debug("skipping non-UTF-8 file %s", f.path)


def default_python_roots() -> List[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    return sorted({r.resolve() for r in roots if r.is_dir()})


def _py_files(root: Path) -> Iterator[Tuple[str, int, int]]:
    """(path, size, mtime_ns) of .py files under root; scandir is ~3x faster than rglob."""
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name.endswith(".py") and e.is_file():
                    st = e.stat()
                    yield e.path, st.st_size, st.st_mtime_ns


def python_source_files(paths: Sequence[str], max_bytes: int) -> List[SourceFile]:
    """Deterministic selection of .py files under `paths` up to `max_bytes` in total.

    Files are ordered by a hash of their path relative to their root, so the cap
    samples the whole installation instead of the alphabetically first packages.
    """
    roots = [Path(p).expanduser().resolve() for p in paths] or default_python_roots()
    candidates = []
    for root in roots:
        if not root.is_dir():
            raise MissingFileError(f"data.paths: {root} is not a directory")
        for path, size, mtime_ns in _py_files(root):
            if 0 < size <= MAX_FILE_BYTES:
                key = f"{root.name}/{Path(path).relative_to(root).as_posix()}"
                candidates.append(SourceFile(Path(path), key, size, mtime_ns))
    candidates.sort(key=lambda f: (hashlib.sha1(f.key.encode()).hexdigest(), f.key))
    chosen, total = [], 0
    for f in candidates:
        if total + f.size > max_bytes:
            continue
        chosen.append(f)
        total += f.size
    if not chosen:
        raise DataError(f"data.paths: no .py files found under {[str(r) for r in roots]}")
    return sorted(chosen, key=lambda f: f.key)
