"""Fingerprinted, build-once cache directories shared by runs and by ranks.

The local main process builds into a temporary directory and renames it into place;
the other ranks poll for it instead of waiting in a collective, so a tokenization
that takes longer than the process group's timeout cannot kill a multi-process run.
Every build appends one line to `<cache root>/builds.log`, which is how a test (or a
person) tells a cache hit from a rebuild.

Every load checks the directory against what its meta.json recorded at build time: each
file's size and a sampled checksum (the whole file up to 8 MiB; beyond that 32 pieces of
64 KiB spread over it: 11 ms on a 1 GiB file, where a full blake2b takes 5.6 s). A
truncated, missing or rewritten file is reported with a warning naming it, and the
stage is rebuilt, so a damaged cache never trains silently.
"""
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import psutil

log = logging.getLogger(__name__)

META = "meta.json"  # written last: its presence marks the directory complete
FAILED = ".failed"
BUILD_LOG = "builds.log"
BUILDER = ".builder.json"  # in a temporary build directory: who builds it
STALE_AFTER_S = 24 * 3600  # a build from another host (or of unknown origin) that wrote nothing for this long
RECORD = "file_record"  # the meta.json key: {file name: [bytes, sampled checksum]}
SAMPLES, SAMPLE_BYTES = 32, 1 << 16


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / META).read_text())


def sampled_checksum(path: Path) -> str:
    """blake2b of the size and of 32 evenly spread 64 KiB pieces (the whole file when small)."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= 4 * SAMPLES * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def file_record(directory: Path) -> dict:
    return {p.name: [p.stat().st_size, sampled_checksum(p)]
            for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != META}


def check_files(directory: Path):
    """None if the directory holds exactly what its meta.json recorded, else what differs."""
    try:
        recorded = read_meta(directory)[RECORD]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{directory / META} is unreadable or records no files ({type(e).__name__})"
    for name, (size, checksum) in recorded.items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when it was built"
        if sampled_checksum(path) != checksum:
            return f"{path} changed since it was built (checksum)"
    return None


def _log_build(root: Path, directory: Path, seconds: float) -> None:
    line = json.dumps({"stage": directory.parent.name, "key": directory.name, "seconds": round(seconds, 3),
                       "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    with open(root / BUILD_LOG, "a") as f:  # one short append: atomic on POSIX
        f.write(line + "\n")


def _wait(directory: Path, failed: Path, poll_s: float) -> None:
    # A failure marker left by an earlier run predates this process and is ignored;
    # a fresh one means the builder of this launch failed, so waiting is pointless.
    started = psutil.Process().create_time() - 1.0
    while not ((directory / META).exists() and check_files(directory) is None):
        try:
            if failed.stat().st_mtime >= started:
                raise RuntimeError(f"building {directory} failed on the main process: {failed.read_text()}")
        except FileNotFoundError:
            pass
        time.sleep(poll_s)


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0  # not a reused pid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _last_write(path: Path) -> float:
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()])


def remove_stale_builds(stage_dir: Path, stale_after_s: float = STALE_AFTER_S) -> None:
    """Delete the `<key>.tmp<pid>` directories that killed builds of this stage left.

    A build is gone when it ran on this host and its process no longer exists (pid and
    start time, so a reused pid does not count), or, when its host is another one (a
    shared file system) or unknown, when it wrote nothing for `stale_after_s`. A live
    builder's directory is never touched.
    """
    host = socket.gethostname()
    for tmp in stage_dir.glob("*.tmp*"):
        if not (tmp.is_dir() and re.match(r"^[0-9a-f]{16}\.tmp\d+$", tmp.name)):  # only builds of a fingerprint
            continue
        pid = tmp.name.rpartition(".tmp")[2]
        if int(pid) == os.getpid():
            continue
        try:
            owner = json.loads((tmp / BUILDER).read_text())
        except (OSError, ValueError):
            owner = {}
        try:
            if owner.get("host") == host:
                stale = not _alive(int(owner["pid"]), float(owner["started"]))
            else:
                stale = time.time() - _last_write(tmp) > stale_after_s
        except FileNotFoundError:  # finished or removed meanwhile
            continue
        if stale:
            log.info("removing %s, left by a build that is gone (%s)", tmp,
                     f"pid {pid} on this host" if owner.get("host") == host else "no write for a day")
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(directory: Path) -> None:
    """Move a damaged directory out of the way in one rename (waiting ranks then see no
    meta.json), then delete it; the rename's name marks it as this process's litter."""
    doomed = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    directory.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def build_once(directory: Path, build: Callable[[Path], dict], is_builder: bool, poll_s: float = 0.5) -> Path:
    """Return `directory`, calling `build(tmp_dir) -> meta` first if it is not there yet.

    `meta` is written as `meta.json`, the marker that the directory is complete. The
    cache root is the directory's grandparent (`<root>/<stage>/<key>`).
    """
    directory = Path(directory)
    if (directory / META).exists():
        problem = check_files(directory)
        if problem is None:
            return directory
        if is_builder:
            log.warning("the %s cache is damaged: %s; rebuilding it", directory.parent.name, problem)
            _discard(directory)
    failed = directory.with_name(directory.name + FAILED)
    if not is_builder:
        _wait(directory, failed, poll_s)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    remove_stale_builds(directory.parent)
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / BUILDER).write_text(json.dumps(_me()))
    t0 = time.perf_counter()
    try:
        meta = build(tmp)
        (tmp / BUILDER).unlink()
        meta[RECORD] = file_record(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        try:
            tmp.rename(directory)
        except OSError:  # another process sharing the filesystem finished first
            if not (directory / META).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return directory
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed.write_text(f"{type(e).__name__}: {e}")
        raise
    _log_build(directory.parent.parent, directory, time.perf_counter() - t0)
    return directory
