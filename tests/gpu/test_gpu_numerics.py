"""On one GPU: mixed precision against fp32, the fused LM-head loss under autocast, compiled
blocks against eager. Every tolerance below is stated with the reason it holds."""
import math
import time

import pytest
import torch

from conftest import read_metrics, run_training, series
from gpu_common import gpu, no_tf32, report, smoke  # noqa: F401 (no_tf32 is a fixture)
from gptlab.loss import CrossEntropy, KeytokenLoss, fused_linear_loss

pytestmark = gpu

STEPS = 20
# |train/loss - fp32's| at every one of 20 steps, in nats, from a loss near ln(384) = 5.95.
# bf16 keeps 8 significant bits: each activation is off by up to 2^-9 (0.2%) of its size,
# ~0.01 nats of loss at the first step; 20 updates from slightly different gradients let
# the weights drift apart and grow that a few times: 0.08 (1.3%). fp16 keeps 11 bits (8x
# finer) and the GradScaler only rescales: 0.03. On the CPU this fp32 run's loss falls
# 5.95 -> 5.33 over the 20 steps, about 0.05 a step early on. (At the scaler's
# initial scale 2^16, the largest gradient of this model at init, 0.11, stays 9x below
# fp16's maximum, so the scaler skips no step and the curves stay aligned step for step.)
# Both are far below what the 20 steps of training move the loss (asserted below).
TOLERANCE = {"bf16": 0.08, "fp16": 0.03}


def losses(run_dir) -> dict:
    return dict(series(read_metrics(run_dir), "train/loss"))


@pytest.fixture(scope="module")
def curves(tmp_path_factory, cache_dir, tiny_corpus):
    out = {}
    for precision in ("no", "bf16", "fp16"):
        run_dir = tmp_path_factory.mktemp(f"precision_{precision}")
        result = run_training(smoke(run_dir, cache_dir, tiny_corpus, f"trainer.max_steps={STEPS}",
                                    f"trainer.eval_every={STEPS}", f"trainer.mixed_precision={precision}",
                                    "trainer.tf32=false", "optim.lr=3e-3"))
        out[precision] = losses(run_dir), result
    return out


def test_fp32_run_learns(curves):
    fp32, result = curves["no"]
    assert sorted(fp32) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in fp32.values())
    assert fp32[1] - fp32[STEPS] > 4 * max(TOLERANCE.values()), fp32  # the tolerances are tighter than learning
    assert result["train/skipped_steps"] == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(curves, precision):
    fp32, ours = curves["no"][0], curves[precision][0]
    assert sorted(ours) == sorted(fp32) and all(math.isfinite(v) for v in ours.values()), ours
    worst = max(abs(ours[t] - fp32[t]) for t in fp32)
    report(f"loss_vs_fp32_{precision}", max_abs_diff=worst, tolerance=TOLERANCE[precision])
    assert worst < TOLERANCE[precision], {t: (ours[t], fp32[t]) for t in fp32}
    assert curves[precision][1]["train/skipped_steps"] == 0


# The fused loss against the logits path on GPT-2 124M's head width, a few hundred tokens.
# fp32 (TF32 off): the same sums in another order, ~1e-6 relative. Under autocast both
# paths round the same low-precision logits; the gradients differ in where they round
# (the fused path scales each row before its cast), so they agree to the dtype's
# precision: relative L2 error under 2e-2 for bf16 (8 bits), 4e-3 for fp16 (11 bits).
# fp16 backpropagates a scaled loss, as under the GradScaler: unscaled, the logits path
# flushes the small entries of the logits' gradient (w·softmax ~ 1e-8) to zero; at the
# scaler's initial 2^16 its fp16 weight gradient overflows under the keytoken weights
# (the scaler would halve the scale); 2^10 is where it settles for this shape.
FUSED_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-3, 2e-2), torch.float16: (5e-4, 4e-3)}


def _losses(device):
    return {"cross_entropy": CrossEntropy(), "keytoken": KeytokenLoss([3, 7, 11, 200], 1.5, False)}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_name", ["cross_entropy", "keytoken"])
def test_fused_loss_equals_logits_path_under_autocast(dtype, loss_name, no_tf32):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    B, T, C, V = 4, 96, 768, 50304
    h = torch.randn(B, T, C, device=dev, generator=g)
    w = (torch.randn(V, C, device=dev, generator=g) * 0.02)
    ids = torch.randint(0, V, (B, T), device=dev, generator=g)
    ids[:, ::5] = 7  # key tokens in every sample, unevenly weighted by the keytoken loss
    ids[0, ::3] = 3
    loss_fn = _losses(dev)[loss_name]
    results, scale = [], 2.0 ** 10 if dtype == torch.float16 else 1.0
    for fused in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            if fused:
                loss = fused_linear_loss(hh, ww, ids, loss_fn.token_weights(ids))
            else:
                loss = loss_fn(hh @ ww.t(), ids)
        (loss * scale).backward()
        hh.grad /= scale
        ww.grad /= scale
        assert loss.dtype == torch.float32 and hh.grad.dtype == ww.grad.dtype == torch.float32
        results.append((loss.detach(), hh.grad, ww.grad))
    (ref, ref_gh, ref_gw), (ours, gh, gw) = results
    value_tol, grad_tol = FUSED_TOL[dtype]
    errors = {"value": abs(ours.item() - ref.item()) / ref.item(), "grad_h": _rel(gh, ref_gh),
              "grad_w": _rel(gw, ref_gw)}
    report(f"fused_vs_logits_{loss_name}_{str(dtype).split('.')[-1]}", **errors)
    assert errors["value"] < value_tol and errors["grad_h"] < grad_tol and errors["grad_w"] < grad_tol, errors


# Compiled blocks against eager, fp32 with TF32 off and no dropout (Inductor draws its own
# dropout masks): Inductor fuses and reorders the same fp32 arithmetic, ~1e-6 per step,
# which 20 Adam updates grow to ~1e-5; 1e-3 nats holds with margin and still catches a
# wrong graph (a broken block moves the loss by whole units).
COMPILE_TOL = 1e-3


def test_compile_matches_eager_and_reports_compile_time(tmp_path, cache_dir, tiny_corpus, no_tf32):
    runs = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        start = time.perf_counter()
        run_training(smoke(run_dir, cache_dir, tiny_corpus, f"trainer.max_steps={STEPS}", f"trainer.eval_every={STEPS}",
                           "trainer.mixed_precision=no", "trainer.tf32=false", "model.dropout=0.0",
                           f"trainer.compile={str(compiled).lower()}"))
        runs[compiled] = losses(run_dir), time.perf_counter() - start
    (eager, t_eager), (comp, t_comp) = runs[False], runs[True]
    worst = max(abs(comp[t] - eager[t]) for t in eager)
    report("compile", eager_run_s=t_eager, compiled_run_s=t_comp, compile_s=t_comp - t_eager, max_abs_diff=worst)
    assert sorted(comp) == sorted(eager) and worst < COMPILE_TOL, (eager, comp)
