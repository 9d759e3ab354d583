import math

import pytest

from gptlab.config import DataConfig, SchedulerConfig, TrainerConfig
from gptlab.schedule import SeqWarmup, make_schedule, sequence_warmup

LR, MIN, W, M = 1e-3, 1e-4, 10, 110


def lr_at(step, name, max_steps=M, warmup=W, decay_fraction=0.2, decay="linear", min_lr=MIN):
    sc = SchedulerConfig(name=name, warmup_steps=warmup, min_lr=min_lr, decay_fraction=decay_fraction, decay=decay)
    return make_schedule(sc, LR, max_steps)(step)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_points(name):
    assert lr_at(0, name) == 0.0
    assert lr_at(5, name) == pytest.approx(LR / 2)
    assert lr_at(W, name) == pytest.approx(LR)
    assert lr_at(W + (M - W) // 2, name) == pytest.approx((LR + MIN) / 2)
    assert lr_at(M, name) == pytest.approx(MIN, abs=1e-15)


def test_cosine_and_linear_differ_between_points():
    q = W + (M - W) // 4
    assert lr_at(q, "cosine") == pytest.approx(MIN + (LR - MIN) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(q, "linear") == pytest.approx(MIN + (LR - MIN) * 0.75)


def test_constant_and_min_lr_null():
    assert lr_at(50, "constant") == LR
    assert lr_at(M, "cosine", min_lr=None) == pytest.approx(LR / 10)  # a tenth of the peak


@pytest.mark.parametrize("decay", ["linear", "sqrt"])
def test_wsd_holds_then_decays_over_the_last_fraction(decay):
    # M=110, decay_fraction 0.2: the decay starts after step 88 and ends at 110.
    assert lr_at(5, "wsd", decay=decay) == pytest.approx(LR / 2)
    assert lr_at(W, "wsd", decay=decay) == LR  # warmup end
    assert lr_at(50, "wsd", decay=decay) == LR
    assert lr_at(88, "wsd", decay=decay) == LR  # decay start
    half = 0.5 if decay == "linear" else 1 - math.sqrt(0.5)
    assert lr_at(99, "wsd", decay=decay) == pytest.approx(MIN + (LR - MIN) * half)
    assert lr_at(M, "wsd", decay=decay) == MIN  # exactly, at max_steps


def test_wsd_decay_never_starts_inside_the_warmup():
    assert lr_at(8, "wsd", max_steps=10, warmup=8, decay_fraction=0.5) == LR
    assert lr_at(9, "wsd", max_steps=10, warmup=8, decay_fraction=0.5) == pytest.approx((LR + MIN) / 2)


def warmup(max_steps=300, default_recipe=True, block_size=256, pack="concat", **trainer):
    return sequence_warmup(TrainerConfig(**trainer), DataConfig(block_size=block_size, pack=pack), max_steps,
                           default_recipe)


def test_the_default_recipe_warms_up_on_half_blocks_for_at_most_a_third_of_the_run():
    assert warmup() == SeqWarmup(steps=100, length=128, split=True)
    assert warmup(max_steps=5000).steps == 100
    assert warmup(max_steps=8, block_size=64) == SeqWarmup(steps=2, length=32, split=True)
    assert warmup(max_steps=2).steps == 0


def test_the_sequence_warmup_is_off_outside_the_default_recipe_unless_asked():
    assert warmup(default_recipe=False).steps == 0  # a named optimizer, or fine-tuning
    assert warmup(block_size=255).steps == 0  # no half-block rows to split it into
    assert warmup(pack="sample").steps == 0  # no blocks
    assert warmup(seq_warmup_steps=0).steps == 0
    assert warmup(default_recipe=False, seq_warmup_steps=40, seq_warmup_len=64, seq_warmup_split=False) == \
        SeqWarmup(steps=40, length=64, split=False)
    assert warmup(seq_warmup_len=64) == SeqWarmup(steps=100, length=64, split=True)
