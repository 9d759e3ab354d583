"""Fingerprinted, build-once cache directories shared by runs and by ranks.

The local main process builds into a temporary directory and renames it into place;
the other ranks poll for it instead of waiting in a collective, so a tokenization
that takes longer than the process group's timeout cannot kill a multi-process run.
"""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

READY = "ready.json"
FAILED = ".failed"


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_once(directory: Path, build: Callable[[Path], dict], is_builder: bool, poll_s: float = 0.5) -> Path:
    """Return `directory`, calling `build(tmp_dir) -> info` first if it is not there yet.

    `info` is written as `ready.json`, the marker that the directory is complete.
    """
    directory = Path(directory)
    if (directory / READY).exists():
        return directory
    failed = directory.with_name(directory.name + FAILED)
    if not is_builder:
        while not (directory / READY).exists():
            if failed.exists():
                raise RuntimeError(f"building {directory} failed on the main process: {failed.read_text()}")
            time.sleep(poll_s)
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = build(tmp)
        (tmp / READY).write_text(json.dumps(info, indent=2, default=str))
        try:
            tmp.rename(directory)
        except OSError:  # another node sharing the filesystem finished first
            if not (directory / READY).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed.write_text(f"{type(e).__name__}: {e}")
        raise
    return directory
