"""train.py with a deterministic fault point, for the crash and preemption tests.

    GPTLAB_FAULT=KIND:STEP[:RANK] python tests/fault_harness.py <hydra overrides>
    (or under `accelerate launch ... tests/fault_harness.py`)

KIND
  pause_in_step   when optimizer step STEP (1-based) starts, touch $GPTLAB_FAULT_MARKER and
                  wait for a signal: the test then sends SIGKILL (a crash while training)
                  or SIGTERM (a preemption; the run goes on to finish step STEP and stop).
  pause_in_save   inside the save of checkpoint step_STEP, after Accelerate has written
                  the model, optimizer and RNG files into the temporary directory: touch
                  the marker and wait, so the test's SIGKILL lands in the middle of a save.
  sigterm_in_step send SIGTERM to this process itself during step STEP.
RANK limits the fault to one process (default: every process).

Nothing here changes what training computes: it only chooses when a signal arrives.
"""
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _arrive(marker) -> None:
    if marker:
        Path(marker).write_text(str(os.getpid()))
    signal.pause()  # returns once a handled signal (SIGTERM) arrived; SIGKILL ends the process here


def install(spec: str, marker=None):
    """Patch the fault in; returns a function that removes it (for in-process tests)."""
    import accelerate

    from gptlab.data.blocks import TrainOrder

    kind, step, *rank = spec.split(":")
    step = int(step)
    if rank and int(os.environ.get("RANK", "0")) != int(rank[0]):
        return lambda: None
    undo = []

    if kind in ("pause_in_step", "sigterm_in_step"):
        original = TrainOrder.micro_batches

        def micro_batches(self, s):  # s is the 0-based step, so optimizer step s + 1 is starting
            if s + 1 == step:
                if kind == "pause_in_step":
                    _arrive(marker)
                else:
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(self, s)

        TrainOrder.micro_batches = micro_batches
        undo.append(lambda: setattr(TrainOrder, "micro_batches", original))
    elif kind == "pause_in_save":
        original = accelerate.Accelerator.save_state

        def save_state(self, output_dir=None, *args, **kwargs):
            out = original(self, output_dir, *args, **kwargs)
            if Path(output_dir).name == f".tmp-step_{step:07d}":
                _arrive(marker)
            return out

        accelerate.Accelerator.save_state = save_state
        undo.append(lambda: setattr(accelerate.Accelerator, "save_state", original))
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return lambda: [u() for u in undo]


if __name__ == "__main__":
    import runpy

    sys.path.insert(0, str(ROOT))
    sys.argv[0] = str(ROOT / "train.py")
    install(os.environ["GPTLAB_FAULT"], os.environ.get("GPTLAB_FAULT_MARKER"))
    runpy.run_path(sys.argv[0], run_name="__main__")  # as a script, so Hydra finds conf/ beside it
