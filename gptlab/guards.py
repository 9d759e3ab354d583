"""Per-step guard: skip (or stop on) a non-finite loss or gradient norm, and skip loss spikes.

The verdict is computed on the device, from the step's (all-reduced) loss and grad norm, and
handed to the optimizer's masked step (optim.step_unless), so a GPU never waits for it:
- a non-finite loss or grad norm skips the update (nonfinite=stop halts the run instead);
  under fp16's GradScaler a non-finite grad norm is an overflow, which the scaler's own
  schedule handles: the update is skipped, and it is not counted as a fault;
- with spike_zscore, a loss that many standard deviations above the mean of the last
  spike_window accepted losses is skipped (as llm.c does);
- max_skips skipped updates in a row halt the run.
After a halt the device rejects every later update, so the state saved at the halt step is
exact however late the host hears of it. The host hears at `flush`, which the loop calls
where it syncs anyway (log, eval, epoch end, save): one read of the rows since the last
flush, replayed for warnings and counters, raising TrainingHalted at a halt.
Ranks decide on the all-reduced values, so every rank skips the same steps.
"""
import logging

import torch

from .errors import GptlabError

log = logging.getLogger(__name__)

TAKEN, NONFINITE, SPIKE, OVERFLOW = 0, 1, 2, 3  # a step's verdict, as recorded for flush


class TrainingHalted(GptlabError, RuntimeError):
    """The run stopped itself: nonfinite=stop, max_skips skipped updates in a row, or a NaN eval.

    `step` is the last optimizer step whose state is intact (a skipped step counts as done).
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class StepGuard:
    def __init__(self, nonfinite: str = "skip", max_skips: int = 10, spike_zscore=None, spike_window: int = 100,
                 scaler: bool = False, num_processes: int = 1, reduce=None):
        self.nonfinite, self.max_skips, self.spike_zscore = nonfinite, max_skips, spike_zscore
        self.window, self.scaler = spike_window, scaler
        self.reduce = reduce if num_processes > 1 else None  # a device collective: the host does not wait
        self.skipped = 0  # in this run, logged as train/skipped_steps
        self.in_a_row = 0
        self._pending = []  # ([loss, norm, verdict, z, mean] on the device, step) since the last flush
        self._dev = None  # device state: recent accepted losses (a ring), how many so far, skips in a row, halted

    @classmethod
    def from_config(cls, tc, accelerator):
        return cls(tc.nonfinite, tc.max_skips, tc.spike_zscore, tc.spike_window,
                   scaler=accelerator.scaler is not None, num_processes=accelerator.num_processes,
                   reduce=lambda t: accelerator.reduce(t, reduction="mean"))

    def _state(self, device) -> dict:
        if self._dev is None:
            f64 = {"dtype": torch.float64, "device": device}
            self._dev = {"recent": torch.zeros(self.window, **f64), "accepted": torch.zeros((), **f64),
                         "run": torch.zeros((), **f64), "halted": torch.zeros((), dtype=torch.bool, device=device)}
        return self._dev

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """Whether to reject this step's update: a 0-d bool tensor on the device, never read here."""
        stats = torch.stack([loss.detach().float(), grad_norm.detach().float()]).double()
        if self.reduce is not None:
            stats = self.reduce(stats)  # a NaN on any rank is a NaN here
        s = self._state(stats.device)
        loss_v, norm_v = stats[0], stats[1]
        overflow = ~torch.isfinite(norm_v) & self.scaler
        nonfinite = ~torch.isfinite(loss_v) | (~torch.isfinite(norm_v) & (not self.scaler))
        z = mean = torch.zeros((), dtype=torch.float64, device=stats.device)
        spike = torch.zeros((), dtype=torch.bool, device=stats.device)
        if self.spike_zscore is not None:
            mean = s["recent"].mean()
            std = s["recent"].std()
            z = torch.where(std > 0, (loss_v - mean) / std, 0.0)
            spike = (s["accepted"] >= self.window) & (z > self.spike_zscore) & ~nonfinite
        fault = nonfinite | spike
        reject = fault | overflow | s["halted"]
        verdict = torch.where(nonfinite, NONFINITE, torch.where(spike, SPIKE, torch.where(overflow, OVERFLOW, TAKEN)))
        accepted = ~fault & ~s["halted"] & torch.isfinite(loss_v)
        # The oldest of the window, once it is full. A mask, not recent[slot]: indexing by a 0-d
        # device tensor reads it back to the host (a GPU sync every step).
        slot = torch.arange(self.window, device=stats.device) == s["accepted"] % self.window
        s["recent"] = torch.where(slot & accepted, loss_v, s["recent"])
        s["accepted"] = s["accepted"] + accepted
        s["run"] = torch.where(fault, s["run"] + 1, 0.0)
        halt = s["run"] >= self.max_skips
        if self.nonfinite == "stop":
            halt = halt | nonfinite
        s["halted"] = s["halted"] | halt
        self._pending.append((torch.stack([loss_v, norm_v, verdict.double(), z, mean, reject.double()]), step))
        return reject

    def flush(self) -> int:
        """Bring the host up to date (warnings, counters, a halt); the number of updates taken
        since the last flush. This is the guard's one host read."""
        if not self._pending:
            return 0
        rows = torch.stack([r for r, _ in self._pending]).tolist()
        steps = [t for _, t in self._pending]
        self._pending = []
        taken = 0
        for (loss, norm, verdict, z, mean, rejected), t in zip(rows, steps):
            taken += not rejected
            if verdict in (TAKEN, OVERFLOW):
                self.in_a_row = 0
                continue
            if verdict == NONFINITE:
                reason = f"non-finite loss {loss} or grad norm {norm}"
                if self.nonfinite == "stop":
                    raise TrainingHalted(f"step {t}: {reason} (trainer.nonfinite=stop)", t - 1)
            else:
                reason = (f"loss spike {loss:.4f} is {z:.1f} std above the recent mean {mean:.4f} "
                          f"(trainer.spike_zscore={self.spike_zscore})")
            self.skipped += 1
            self.in_a_row += 1
            log.warning("step %d: update skipped: %s", t, reason)
            if self.in_a_row >= self.max_skips:
                raise TrainingHalted(f"step {t}: {self.in_a_row} updates skipped in a row "
                                     f"(trainer.max_skips={self.max_skips}); last: {reason}", t)
        return taken


def halt(error: TrainingHalted, checkpoints, max_steps: int):
    """Raise `error` after saving the state the guard kept intact; every process calls this."""
    if checkpoints is None:
        raise error
    from .checkpoint_format import CheckpointError, checkpoint_dir

    target = checkpoint_dir(checkpoints.root.parent, error.step)
    try:
        if not target.is_dir():  # unless that step's end already saved it
            checkpoints.save(target, error.step, max_steps)
        note = f"; the state after step {error.step} is saved in {target}"
    except CheckpointError as e:
        note = f"; saving that state failed too: {e}"
    raise TrainingHalted(f"{error}{note}", error.step) from error
