"""Stop a live run and wait until it has saved: `python -m gptlab.stop RUN_DIR`.

It sends SIGTERM to the run's rank 0 (named in RUN_DIR/run.lock; the other processes agree to
stop with it at the next log step), then waits for the run to let go of its directory, which it
does after its checkpoint is written. Under `accelerate launch` the launcher then exits 0 with
its workers. Ctrl-C in the launcher's terminal saves as well, but the launcher raises
KeyboardInterrupt and returns the prompt before the save (docs/checkpoints.md)."""
import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .checkpoint_format import CheckpointError, find_checkpoint
from .lock import LOCK_FILE, live_owner


def stop(run_dir: Path, poll_s: float = 0.5) -> str:
    """Signal the run in `run_dir` and return once it has saved; the line that says where."""
    run_dir = Path(run_dir).expanduser()
    owner = live_owner(run_dir)
    if owner is None:
        raise SystemExit(f"error: no live run in {run_dir} (no {LOCK_FILE} held)")
    if not owner:
        raise SystemExit(f"error: the run in {run_dir} has not written its name to {LOCK_FILE} yet; try again")
    if owner["host"] != socket.gethostname():
        raise SystemExit(f"error: the run in {run_dir} is on host {owner['host']}: run this there, or under "
                         f"SLURM `scancel --signal=TERM --full JOBID`")
    os.kill(owner["pid"], signal.SIGTERM)
    print(f"sent SIGTERM to pid {owner['pid']}; waiting for the run to save and exit", file=sys.stderr, flush=True)
    started = time.monotonic()
    while live_owner(run_dir) is not None:
        time.sleep(poll_s)
        print(f"\r  {time.monotonic() - started:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    try:
        ckpt = find_checkpoint(run_dir)
    except CheckpointError:
        return f"the run ended with no checkpoint in {run_dir} (stopped before step 1?)"
    return f"stopped; latest checkpoint {ckpt}; continue with resume=auto run_dir={run_dir}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptlab.stop", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run's directory (where run.lock is)")
    print(stop(parser.parse_args(argv).run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
