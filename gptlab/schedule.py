"""The LR schedule: make_schedule(scheduler config, lr, max_steps) -> (step -> lr); Muon's momentum
warmup; the sequence warmup's steps and rows.

Steps are optimizer steps, 1-based: the update logged as step t runs at schedule(t); never
micro-batches. Every schedule warms up linearly to `lr` at scheduler.warmup_steps and ends at
min_lr exactly at max_steps."""
import math
from collections.abc import Callable
from dataclasses import dataclass

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


# The default recipe's sequence warmup (optim=auto from scratch): 100 steps of half-block rows won
# the time-to-quality bench and lowered the default run's held-out loss (bench/RESULTS.md, eleventh
# and twelfth rounds, 300-step runs). At most a third of a run, so that the positions past the
# rows' length, which the warmup never trains, train for most of it.
SEQ_WARMUP_STEPS = 100


@dataclass(frozen=True)
class SeqWarmup:
    """trainer.seq_warmup_*, decided for this run: steps 1..steps read rows of `length` tokens,
    split: every token of each block, as block_size / length rows (a shorter context alone), or
    else each block's first `length` tokens (cheaper steps)."""
    steps: int
    length: int
    split: bool

    def blocks(self, train_blocks):
        """The view of train_blocks that the warmup's steps read (train_blocks itself when off)."""
        if not self.steps:
            return train_blocks
        return (train_blocks.rows if self.split else train_blocks.prefix)(self.length)

    def describe(self, block_size: int) -> str:
        how = f"all, as rows of {self.length}," if self.split else f"the first {self.length}"
        return f"sequence warmup: steps 1-{self.steps} read {how} of each block's {block_size} tokens"


def seq_warmup_length(tc, block_size: int) -> int:
    """trainer.seq_warmup_len, or half the block when null."""
    return block_size // 2 if tc.seq_warmup_len is None else tc.seq_warmup_len


def sequence_warmup(tc, data, max_steps: int, default_recipe: bool) -> SeqWarmup:
    """trainer.seq_warmup_steps, or when null: SEQ_WARMUP_STEPS, at most a third of max_steps, in
    the default recipe where its rows fit the blocks; none with a named optimizer, to fine-tune,
    with data.pack=sample or an odd block."""
    length, steps = seq_warmup_length(tc, data.block_size), tc.seq_warmup_steps
    if steps is None:
        fits = (data.pack != "sample" and 2 <= length <= data.block_size
                and (not tc.seq_warmup_split or data.block_size % length == 0))
        steps = min(SEQ_WARMUP_STEPS, max_steps // 3) if default_recipe and fits else 0
    return SeqWarmup(steps, length, tc.seq_warmup_split)
