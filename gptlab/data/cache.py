"""Fingerprinted, build-once cache directories shared by runs and by ranks.

The local main process builds into a temporary directory and renames it into place;
the other ranks poll for it instead of waiting in a collective, so a tokenization
that takes longer than the process group's timeout cannot kill a multi-process run.
Every build appends one line to `<cache root>/builds.log`, which is how a test (or a
person) tells a cache hit from a rebuild.
"""
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import psutil

META = "meta.json"  # written last: its presence marks the directory complete
FAILED = ".failed"
BUILD_LOG = "builds.log"


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / META).read_text())


def _log_build(root: Path, directory: Path, seconds: float) -> None:
    line = json.dumps({"stage": directory.parent.name, "key": directory.name, "seconds": round(seconds, 3),
                       "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    with open(root / BUILD_LOG, "a") as f:  # one short append: atomic on POSIX
        f.write(line + "\n")


def _wait(directory: Path, failed: Path, poll_s: float) -> None:
    # A failure marker left by an earlier run predates this process and is ignored;
    # a fresh one means the builder of this launch failed, so waiting is pointless.
    started = psutil.Process().create_time() - 1.0
    while not (directory / META).exists():
        try:
            if failed.stat().st_mtime >= started:
                raise RuntimeError(f"building {directory} failed on the main process: {failed.read_text()}")
        except FileNotFoundError:
            pass
        time.sleep(poll_s)


def build_once(directory: Path, build: Callable[[Path], dict], is_builder: bool, poll_s: float = 0.5) -> Path:
    """Return `directory`, calling `build(tmp_dir) -> meta` first if it is not there yet.

    `meta` is written as `meta.json`, the marker that the directory is complete. The
    cache root is the directory's grandparent (`<root>/<stage>/<key>`).
    """
    directory = Path(directory)
    if (directory / META).exists():
        return directory
    failed = directory.with_name(directory.name + FAILED)
    if not is_builder:
        _wait(directory, failed, poll_s)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        meta = build(tmp)
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
