"""The LR schedule: make_schedule(scheduler config, lr, max_steps) -> (step -> lr); Muon's momentum warmup.

Steps are optimizer steps, 1-based: the update logged as step t runs at schedule(t); never
micro-batches. Every schedule warms up linearly to `lr` at scheduler.warmup_steps and ends at
min_lr exactly at max_steps."""
import math
from collections.abc import Callable

from .config import Schedule, WsdDecay


def _progress(step: int, start: int, end: int) -> float:
    return min(1.0, (step - start) / max(1, end - start))


def _cosine(lr, min_lr, warmup, max_steps, sc):
    return lambda step: min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, max_steps)))


def _linear(lr, min_lr, warmup, max_steps, sc):
    return lambda step: min_lr + (lr - min_lr) * (1.0 - _progress(step, warmup, max_steps))


def _constant(lr, min_lr, warmup, max_steps, sc):
    return lambda step: lr


WSD_DECAYS = {WsdDecay.linear: lambda progress: progress, WsdDecay.sqrt: math.sqrt}  # 1-sqrt: Hägele et al. 2024


def _wsd(lr, min_lr, warmup, max_steps, sc):
    """Warmup-stable-decay: hold `lr`, then decay to min_lr over the last decay_fraction of
    max_steps (never starting inside the warmup)."""
    start, shape = max(warmup, max_steps - round(sc.decay_fraction * max_steps)), WSD_DECAYS[sc.decay]
    return lambda step: lr if step <= start else min_lr + (lr - min_lr) * (1.0 - shape(_progress(step, start,
                                                                                                  max_steps)))


SCHEDULES = {Schedule.cosine: _cosine, Schedule.linear: _linear, Schedule.wsd: _wsd, Schedule.constant: _constant}


def make_schedule(sc, lr: float, max_steps: int) -> Callable[[int], float]:
    """step -> lr for a run of max_steps: scheduler.* applied to `lr` (scheduler.min_lr null: lr / 10)."""
    min_lr = lr / 10 if sc.min_lr is None else sc.min_lr
    warmup, decay = sc.warmup_steps, SCHEDULES[sc.name](lr, min_lr, sc.warmup_steps, max_steps, sc)
    return lambda step: lr * step / warmup if step < warmup else decay(step)


def make_momentum(oc) -> Callable[[int], float] | None:
    """step -> Muon's momentum, rising linearly from optim.momentum_start to optim.momentum over
    optim.momentum_warmup_steps; None when it stays constant (or the optimizer is not Muon)."""
    warmup, start, end = oc.momentum_warmup_steps, oc.momentum_start, oc.momentum
    if not warmup or oc.name != "muon":
        return None
    return lambda step: start + (end - start) * min(1.0, step / warmup)
