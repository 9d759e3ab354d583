"""Stop cleanly on SIGTERM/SIGINT: the signal sets a flag, the loop saves and returns."""
import signal
import threading

import torch
import torch.distributed as dist


class StopSignals:
    """SIGTERM (what SLURM sends before preemption) and SIGINT only set a flag.

    The loop reads it between steps, so a handler never interrupts a save. One process
    stops at the next step. Several stop together at the next log step: there the flags
    are max-reduced over a CPU (gloo) group, a collective every process waits for, so
    between log steps nobody waits (SLURM's grace before SIGKILL must cover log_every
    steps). Repeated signals are harmless (torchrun forwards the ones SLURM already sent);
    SIGKILL still ends a process at once.
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

    def requested(self, log_step: bool) -> bool:
        if not self._distributed:
            return self.received is not None
        if not log_step:
            return False
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
