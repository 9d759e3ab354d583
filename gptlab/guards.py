"""Per-step guard: skip (or stop on) a non-finite loss or gradient norm, and skip loss spikes.

Two paths, one rule (`decide`):
- on the device, for fused Adam/AdamW without spike detection: the step's verdict is a
  device tensor handed to the fused kernel as its `found_inf` (the flag GradScaler uses),
  which leaves the weights, the moments and the step count as they were. The host replays
  `decide` over the buffered values only when the loop syncs anyway (`flush`: log, eval,
  epoch end, save), so a GPU syncs only there. After a halt (nonfinite=stop, max_skips)
  the device rejects every later update, so the state saved at the halt step is exact.
- on the host otherwise: a spike needs the recent accepted losses, and other optimizers
  have no `found_inf`; this costs one device->host sync of two floats per step.
Ranks decide on the all-reduced values, so every rank skips the same steps.
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
                 scaler_handles_overflow: bool = False, optimizer=None):
        self.nonfinite, self.max_skips, self.spike_zscore = nonfinite, max_skips, spike_zscore
        # fp16's GradScaler skips overflowing steps itself and lowers its scale; they are
        # part of its normal operation, not faults.
        self.scaler_handles_overflow = scaler_handles_overflow
        self.recent = deque(maxlen=spike_window)  # losses of accepted steps
        self.skipped = 0  # in this run, logged as train/skipped_steps
        self.in_a_row = 0
        self.on_device = spike_zscore is None and optimizer is not None and _has_found_inf(optimizer)
        self._taken = 0  # updates taken since the last flush
        self._pending = []  # device path: ([loss, grad norm, rejected] on the device, step) since the last flush
        self._run = self._frozen = None  # device path: skips in a row; no update after a halt

    @classmethod
    def from_config(cls, tc, accelerator, optimizer=None):
        return cls(tc.nonfinite, tc.max_skips, tc.spike_zscore, tc.spike_window,
                   scaler_handles_overflow=accelerator.scaler is not None, optimizer=optimizer)

    def step(self, optimizer, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, accelerator):
        """Take or skip this update. Returns whether it was taken: a bool on the host path, a
        0-d bool tensor on the device path (read only at `flush`)."""
        if not self.on_device:
            take = self.check(loss, grad_norm, step, accelerator)
            if take:
                optimizer.step()
            else:
                self.skip_update(accelerator)
            self._taken += take
            return take
        stats = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, reduction="mean")  # a collective, not a host sync
        if self._run is None:
            self._run = torch.zeros((), device=stats.device)
            self._frozen = torch.zeros((), dtype=torch.bool, device=stats.device)
        finite = torch.isfinite(stats)
        bad = ~finite[0] if self.scaler_handles_overflow else ~finite.all()
        reject = bad | self._frozen
        self._run = torch.where(reject, self._run + 1, 0.0)
        self._frozen = self._frozen | (self._run >= self.max_skips)
        if self.nonfinite == "stop":
            self._frozen = self._frozen | bad
        self._pending.append((torch.cat([stats, reject.float().reshape(1)]), step))
        _step_unless(optimizer, reject, accelerator)
        return ~reject

    def flush(self) -> int:
        """Bring the host up to date (warnings, counters, a halt); the number of updates taken
        since the last flush. On the device path this is the guard's one host sync."""
        if self._pending:
            rows = torch.stack([r for r, _ in self._pending]).tolist()
            steps = [t for _, t in self._pending]
            self._pending = []
            for (loss, norm, rejected), t in zip(rows, steps):
                take = self.decide(loss, norm, t)  # raises at a halt: the device froze the state there
                if take == bool(rejected):
                    raise RuntimeError(f"step {t}: the device {'skipped' if rejected else 'took'} the update "
                                       "but the guard's rule says otherwise")
                self._taken += take
        taken, self._taken = self._taken, 0
        return taken

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


def _has_found_inf(optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(inner.defaults.get("fused"))


def _step_unless(optimizer, reject: torch.Tensor, accelerator) -> None:
    """optimizer.step(), which the fused kernel turns into a no-op where `reject` is true."""
    inner = getattr(optimizer, "optimizer", optimizer)
    found_inf = reject.float()
    if accelerator.scaler is None:
        inner.found_inf, inner.grad_scale = found_inf, None  # what Adam.step reads, as GradScaler sets them
        try:
            optimizer.step()
        finally:
            del inner.found_inf, inner.grad_scale
        return
    # GradScaler.step overwrites found_inf with what unscale_ (in clip_grad_norm_) found, per
    # device; fold the guard's verdict into that record. Its update() then lowers the scale on
    # a rejected step too, which the host path does only when the gradients overflowed.
    per_device = accelerator.scaler._per_optimizer_states[id(inner)]["found_inf_per_device"]
    if not per_device:
        raise RuntimeError("the GradScaler has not unscaled the gradients before the guarded step")
    for dev, v in per_device.items():
        per_device[dev] = torch.maximum(v, found_inf.to(dev))
    optimizer.step()


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
