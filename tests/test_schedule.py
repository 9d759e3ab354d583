import math

import pytest

from gptlab.optim import lr_at

LR, MIN, W, M = 1e-3, 1e-4, 10, 110


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_points(name):
    assert lr_at(0, LR, M, W, MIN, name) == 0.0
    assert lr_at(5, LR, M, W, MIN, name) == pytest.approx(LR / 2)
    assert lr_at(W, LR, M, W, MIN, name) == pytest.approx(LR)
    assert lr_at(W + (M - W) // 2, LR, M, W, MIN, name) == pytest.approx((LR + MIN) / 2)
    assert lr_at(M, LR, M, W, MIN, name) == pytest.approx(MIN, abs=1e-15)


def test_cosine_and_linear_differ_between_points():
    q = W + (M - W) // 4
    assert lr_at(q, LR, M, W, MIN, "cosine") == pytest.approx(MIN + (LR - MIN) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(q, LR, M, W, MIN, "linear") == pytest.approx(MIN + (LR - MIN) * 0.75)


def test_constant_and_bad_name():
    assert lr_at(50, LR, M, W, MIN, "constant") == LR
    with pytest.raises(ValueError, match="scheduler.name"):
        lr_at(50, LR, M, W, MIN, "step")


@pytest.mark.parametrize("decay", ["linear", "sqrt"])
def test_wsd_holds_then_decays_over_the_last_fraction(decay):
    # M=110, decay_fraction 0.2: the decay starts after step 88 and ends at 110.
    assert lr_at(5, LR, M, W, MIN, "wsd", 0.2, decay) == pytest.approx(LR / 2)
    assert lr_at(W, LR, M, W, MIN, "wsd", 0.2, decay) == LR  # warmup end
    assert lr_at(50, LR, M, W, MIN, "wsd", 0.2, decay) == LR
    assert lr_at(88, LR, M, W, MIN, "wsd", 0.2, decay) == LR  # decay start
    half = 0.5 if decay == "linear" else 1 - math.sqrt(0.5)
    assert lr_at(99, LR, M, W, MIN, "wsd", 0.2, decay) == pytest.approx(MIN + (LR - MIN) * half)
    assert lr_at(M, LR, M, W, MIN, "wsd", 0.2, decay) == MIN  # exactly, at max_steps


def test_wsd_decay_never_starts_inside_the_warmup():
    assert lr_at(8, LR, 10, 8, MIN, "wsd", 0.5, "linear") == LR
    assert lr_at(9, LR, 10, 8, MIN, "wsd", 0.5, "linear") == pytest.approx((LR + MIN) / 2)
    with pytest.raises(ValueError, match="scheduler.decay"):
        lr_at(9, LR, 10, 8, MIN, "wsd", 0.5, "cubic")
