"""Stop cleanly on SIGTERM/SIGINT: the signal sets a flag, the loop saves and returns."""
import signal
import threading

import torch
import torch.distributed as dist


class StopSignals:
    """SIGTERM (what SLURM sends before preemption) and SIGINT only set a flag.

    The loop reads it between steps, so a handler never interrupts a save, and all
    processes stop at the same step: the flags are max-reduced every step over a CPU
    (gloo) group, which does not synchronise the GPU. Repeated signals are harmless
    (torchrun forwards the ones SLURM already sent); SIGKILL still ends a process at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator):
        self.received = None
        self._previous = {}
        self._group = None
        self._distributed = accelerator.num_processes > 1
        if self._distributed and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def requested(self) -> bool:
        if not self._distributed:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
