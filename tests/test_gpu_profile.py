"""bench/gpu_profile.py: the profile's breakdown of a step, and the script's CPU smoke run."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from gpu_profile import breakdown  # noqa: E402


def _kernel(name, ts, dur, corr, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts, corr, tid=1, cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
            "args": {"correlation": corr}}


def test_breakdown_shares_of_a_step():
    # A 400 µs step: a GEMM, attention, an optimizer GEMM (launched inside Optimizer.step, so it counts
    # as optimizer), a copy in, an elementwise kernel overlapping the copy; 200 µs with nothing running.
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "Optimizer.step#Muon.step", "ts": 50, "dur": 20, "tid": 1},
        _launch(0, 1), _kernel("sm90_xmma_gemm_bf16", 100, 100, 1),
        _launch(10, 2), _kernel("pytorch_flash::flash_fwd_kernel", 200, 50, 2),
        _launch(60, 3, cat="cuda_driver"), _kernel("nvjet_tst_128x256", 250, 30, 3),
        _launch(61, 4), _kernel("Memcpy HtoD (Pinned -> Device)", 0, 10, 4, cat="gpu_memcpy"),
        _launch(80, 5), _kernel("triton_poi_fused_add_0", 5, 10, 5),
        _launch(63, 6, tid=2), _kernel("nvjet_other_thread", 280, 0, 6),  # launched on another thread: not optimizer
    ]
    b = breakdown({"traceEvents": events}, wall_us=400)
    s = b["shares"]
    assert (s["gemm"], s["attention"], s["optimizer"], s["data"], s["other"]) == (0.25, 0.125, 0.075, 0.025, 0.025)
    assert s["host_gaps"] == pytest.approx((400 - 15 - 180) / 400)  # busy: [0, 15) and [100, 280)
    assert b["device_busy_ms"] == pytest.approx(0.195)
    assert [k["kernel"] for k in b["top_kernels"][:2]] == ["sm90_xmma_gemm_bf16", "pytorch_flash::flash_fwd_kernel"]
    assert b["top_kernels"][0]["share"] == 0.25 and b["n_kernels"] == 6


@pytest.mark.slow
def test_gpu_profile_runs_its_arms_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_profile.py"), "--tiny", "--steps", "6",
                           "--warmup-steps", "3", "--arm", "trainer:2", "--arm", "profile:adamw:2", "--arm",
                           "gptlab:adamw:sideways:2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "MODE is compiled or eager" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_profile.py"), "--tiny", "--steps", "6",
                           "--warmup-steps", "3", "--arm", "trainer:2", "--arm", "profile:adamw:2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["arm"], r["status"]) for r in rows] == [("trainer:2", "ok"), ("profile:adamw:2", "ok")]
    trainer, profile = rows
    assert trainer["tokens_per_s"] > 0 and trainer["optimizer"] == "adamw_torch" and trainer["attention"] == "sdpa"
    assert profile["profiled_step"] == 4 and profile["wall_ms"] > 0 and profile["optim"] == "adamw"
    assert "profile profile:adamw:2: step" in proc.stdout
