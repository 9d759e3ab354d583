"""One live run per run directory: rank 0 holds an exclusive lock on `run_dir/run.lock`.

The lock is a `flock` on an open file, so the kernel drops it when its process dies in
any way (SIGKILL, OOM, a lost node's NFS lease expiring): a dead owner never blocks
`resume=auto`. The file also names the owner (host, pid, start time) for the message
a second run stops with. A process may take the lock of a directory it already holds
(a run resumed in the same process, as the tests do). The owner removes the file when it
lets go, so a finished run leaves none behind; a process that opened the file just before
it went checks, once locked, that it holds the file still at that path.
"""
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import RunDirBusyError

LOCK_FILE = "run.lock"
_held: dict = {}  # run dir -> the open lock file of this process


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory or raise RunDirBusyError naming its live owner."""
    path = (Path(run_dir) / LOCK_FILE).absolute()
    if path in _held:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not path.exists() or path.stat().st_ino != os.fstat(f.fileno()).st_ino:
            f.close()  # the owner removed it between our open and our lock: take the new one
            return lock_run_dir(run_dir)
    except BlockingIOError:
        owner = _read_owner(f)
        who = (f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}" if owner
               else "a process that has not written its name yet")
        f.close()
        raise RunDirBusyError(f"run_dir={run_dir} is in use by a live run ({who}); wait for it to end, "
                              "or choose another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    f.flush()
    _held[path] = f


def _read_owner(f) -> dict | None:
    f.seek(0)
    try:
        owner = json.loads(f.read())
    except ValueError:
        return None
    return owner if {"pid", "host", "started"} <= set(owner) else None


def live_owner(run_dir: Path) -> dict | None:
    """The run that holds run_dir's lock ({"host", "pid", "started"}), or None when no process holds
    it (no lock file, or one left by a killed run). Its name may not be written yet: {}."""
    try:
        with open(Path(run_dir) / LOCK_FILE) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                return _read_owner(f) or {}
    except FileNotFoundError:
        return None


def release_run_dirs() -> None:
    """Let go of every run directory this process holds (the end of a run, or its failure)."""
    while _held:
        path, f = _held.popitem()
        path.unlink(missing_ok=True)  # while still locked, so no one takes a file about to go
        f.close()  # closing the only descriptor drops the flock
