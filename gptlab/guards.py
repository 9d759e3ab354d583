"""Per-step guard: skip (or stop on) a non-finite loss or gradient norm, and skip loss spikes.

The decision needs the step's loss and grad norm on the host before optimizer.step(),
so the guard costs one device->host sync of two floats per optimizer step (fp16's
GradScaler already makes the same sync). Ranks decide on the all-reduced values, so
every rank skips the same steps.
"""
import logging
import math
from collections import deque

import torch

from .errors import GptlabError

log = logging.getLogger(__name__)


class TrainingHalted(GptlabError, RuntimeError):
    """The run stopped itself: nonfinite=stop, max_skips skipped updates in a row, or a NaN eval.

    `step` is the last optimizer step whose state is intact (a skipped step counts as done).
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class StepGuard:
    def __init__(self, nonfinite: str = "skip", max_skips: int = 10, spike_zscore=None, spike_window: int = 100,
                 scaler_handles_overflow: bool = False):
        self.nonfinite, self.max_skips, self.spike_zscore = nonfinite, max_skips, spike_zscore
        # fp16's GradScaler skips overflowing steps itself and lowers its scale; they are
        # part of its normal operation, not faults.
        self.scaler_handles_overflow = scaler_handles_overflow
        self.recent = deque(maxlen=spike_window)  # losses of accepted steps
        self.skipped = 0  # in this run, logged as train/skipped_steps
        self.in_a_row = 0

    @classmethod
    def from_config(cls, tc, accelerator):
        return cls(tc.nonfinite, tc.max_skips, tc.spike_zscore, tc.spike_window,
                   scaler_handles_overflow=accelerator.scaler is not None)

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, accelerator) -> bool:
        """True: take this update. False: skip it. Raises TrainingHalted to stop the run."""
        stats = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, reduction="mean")  # a NaN on any rank is a NaN here
        loss_v, norm_v = stats.tolist()  # the one host sync per step
        return self.decide(loss_v, norm_v, step)

    def decide(self, loss: float, grad_norm: float, step: int) -> bool:
        reason = self._fault(loss, grad_norm, step)
        if reason is None:
            self.in_a_row = 0
            if math.isfinite(loss):
                self.recent.append(loss)
            return True
        self.skipped += 1
        self.in_a_row += 1
        log.warning("step %d: update skipped: %s", step, reason)
        if self.in_a_row >= self.max_skips:
            raise TrainingHalted(f"step {step}: {self.in_a_row} updates skipped in a row "
                                 f"(trainer.max_skips={self.max_skips}); last: {reason}", step)
        return False

    def _fault(self, loss: float, grad_norm: float, step: int):
        if not math.isfinite(loss) or not (math.isfinite(grad_norm) or self.scaler_handles_overflow):
            reason = f"non-finite loss {loss} or grad norm {grad_norm}"
            if self.nonfinite == "stop":
                raise TrainingHalted(f"step {step}: {reason} (trainer.nonfinite=stop)", step - 1)
            return reason
        if self.spike_zscore is not None and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / (len(self.recent) - 1))
            z = (loss - mean) / std if std > 0 else 0.0
            if z > self.spike_zscore:
                return (f"loss spike {loss:.4f} is {z:.1f} std above the recent mean {mean:.4f} "
                        f"(trainer.spike_zscore={self.spike_zscore})")
        return None

    def skip_update(self, accelerator) -> None:
        # clip_grad_norm_ has unscaled the gradients; GradScaler needs update() before the
        # next unscale_, even when no step was taken.
        if accelerator.scaler is not None:
            accelerator.scaler.update()


def halt(error: TrainingHalted, checkpoints, max_steps: int):
    """Raise `error` after saving the state the guard kept intact; every process calls this."""
    if checkpoints is None:
        raise error
    from .checkpoint_io import CheckpointError, checkpoint_dir

    target = checkpoint_dir(checkpoints.root.parent, error.step)
    try:
        if not target.is_dir():  # unless that step's end already saved it
            checkpoints.save(target, error.step, max_steps)
        note = f"; the state after step {error.step} is saved in {target}"
    except CheckpointError as e:
        note = f"; saving that state failed too: {e}"
    raise TrainingHalted(f"{error}{note}", error.step) from error
