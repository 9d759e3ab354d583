"""On one GPU: resume after SIGKILL, evaluation against the CPU, generation and export,
`accelerate launch` with the single-GPU config, no host sync between log steps, and the step guard's cost."""
import json
import math
import os
import signal
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_metrics, run_training, series
from gpu_common import gpu, no_tf32, report, smoke  # noqa: F401 (no_tf32 is a fixture)
from test_resume import HARNESS, _launch, latest_state

pytestmark = gpu

# CUDA's own deterministic settings for every subprocess: cuBLAS picks one reduction
# order only with a fixed workspace.
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# Resume on CUDA: the embedding's backward adds rows with atomics, so a resumed run sums
# some fp32 gradients in another order than the uninterrupted one (~1 ulp per step);
# 8 steps of Adam keep that under 1e-4 nats. (On a CPU the same test is bit-exact.)
RESUME_TOL = 1e-4


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, cache_dir, tiny_corpus):
    """A 12-step fp32 GPU run with dropout, exported; evaluation, generation and export start from it."""
    run_dir = tmp_path_factory.mktemp("gpu_run")
    result = run_training(smoke(run_dir, cache_dir, tiny_corpus, "trainer.max_steps=12", "trainer.eval_every=12",
                                "trainer.mixed_precision=no", "trainer.tf32=false", "model.dropout=0.1",
                                "optim.lr=3e-3"))
    return run_dir, result


def test_sigkill_then_resume_auto_gives_the_uninterrupted_curve(tmp_path, cache_dir, tiny_corpus, no_tf32):
    args = ["trainer.max_steps=8", "trainer.eval_every=4", "trainer.save_every=4", "trainer.mixed_precision=no",
            "trainer.tf32=false", "model.dropout=0.1", "trainer.grad_accum=2"]
    reference = tmp_path / "reference"
    run_training(smoke(reference, cache_dir, tiny_corpus, *args))
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    overrides = smoke(run_dir, cache_dir, tiny_corpus, *args)
    proc = _launch(HARNESS + overrides, {**DETERMINISTIC, "GPTLAB_FAULT": "pause_in_step:7",
                                         "GPTLAB_FAULT_MARKER": str(marker)}, marker)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert latest_state(run_dir)["step"] == 4
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, "resume=auto"], cwd=ROOT,
                             env={**os.environ, **DETERMINISTIC}, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, ref = read_metrics(run_dir), read_metrics(reference)
    for key in ("train/loss", "eval/loss"):
        a, b = dict(series(ours, key)), dict(series(ref, key))
        assert sorted(a) == sorted(b), key
        worst = max(abs(a[t] - b[t]) for t in b)
        report(f"resume_{key.replace('/', '_')}", max_abs_diff=worst, tolerance=RESUME_TOL)
        assert worst < RESUME_TOL, (key, a, b)


def _evaluate(final, env):
    proc = subprocess.run([sys.executable, "-m", "gptlab.evaluate", str(final), "trainer.mixed_precision=no"],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eval_loss_on_the_gpu_equals_the_cpu(fp32_run):
    final = fp32_run[0] / "final"
    on_gpu, on_cpu = _evaluate(final, {}), _evaluate(final, {"CUDA_VISIBLE_DEVICES": ""})
    report("eval_gpu_vs_cpu", gpu=on_gpu["loss"], cpu=on_cpu["loss"])
    assert on_gpu["tokens"] == on_cpu["tokens"] > 0
    assert abs(on_gpu["loss"] - on_cpu["loss"]) < 1e-4, (on_gpu, on_cpu)


def test_generation_on_the_gpu_and_the_export_loads_on_the_cpu(fp32_run, no_tf32):
    from gptlab.generate import main as generate_main
    from gptlab.trained import load_trained

    run_dir, _ = fp32_run
    samples = generate_main([str(run_dir), "--prompt", "def ", "--max_new_tokens", "12", "--device", "cuda"])
    text = samples[0]["samples"][0]
    assert text.startswith("def ") and len(text) > len("def "), text
    on_cpu, on_gpu = load_trained(run_dir / "final", "cpu"), load_trained(run_dir / "final", "cuda")
    assert next(on_cpu.model.parameters()).device.type == "cpu"
    ids = on_cpu.tokenizer("def main():\n    return 1\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = on_cpu.model(input_ids=ids).logits
        b = on_gpu.model(input_ids=ids.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_accelerate_launch_single_gpu_config(tmp_path, cache_dir, tiny_corpus):
    run_dir = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / "single_gpu.yaml"), str(ROOT / "train.py"),
           *smoke(run_dir, cache_dir, tiny_corpus)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [v for _, v in series(read_metrics(run_dir), "train/loss")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert torch.cuda.get_device_name() in (run_dir / "train.log").read_text()  # it trained on the GPU
    assert (run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("recipe", [["optim=muon"], ["optim=adamw"], ["optim=adafactor"],
                                    ["optim=muon", "trainer.mixed_precision=fp16"],
                                    ["optim=adamw", "trainer.spike_zscore=3"]], ids=str)
def test_no_step_between_log_steps_syncs_the_gpu(tmp_path, cache_dir, tiny_corpus, monkeypatch, recipe):
    """CUDA itself checks: torch.cuda.set_sync_debug_mode("error") raises at any op that makes the
    host wait for the GPU. It is on for every step that does not log, and off for those that do."""
    from gptlab.data.blocks import TrainOrder

    log_every, real = 4, TrainOrder.micro_batches

    def micro_batches(self, step):  # step + 1 is the optimizer step about to run
        torch.cuda.set_sync_debug_mode("default" if (step + 1) % log_every == 0 else "error")
        return real(self, step)

    monkeypatch.setattr(TrainOrder, "micro_batches", micro_batches)
    try:
        result = run_training(smoke(tmp_path, cache_dir, tiny_corpus, *recipe, "trainer.max_steps=12",
                                    f"trainer.log_every={log_every}", "trainer.eval_every=12", "trainer.save_every=0",
                                    "trainer.sample_prompts=[]"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report("no_sync_between_log_steps", recipe=" ".join(recipe), final_loss=result["train/loss"])
    assert math.isfinite(result["train/loss"])


def test_step_guard_costs_nothing_measurable(tmp_path, cache_dir, tiny_corpus):
    """A small model (where a per-step sync would show): the guard's spike check, all on the device,
    against no spike check. Both runs compute the same thing (the window never fills)."""
    common = ["trainer.max_steps=120", "trainer.log_every=20", "trainer.eval_every=1000", "trainer.save_every=0",
              "model.n_layer=2", "model.n_embd=128", "model.n_head=4", "trainer.micro_batch_size=8",
              "trainer.mixed_precision=no"]
    speed, final = {}, {}
    for path, extra in (("spike_check", ["trainer.spike_zscore=1e9", "trainer.spike_window=1000"]), ("plain", [])):
        run_dir = tmp_path / path
        result = run_training(smoke(run_dir, cache_dir, tiny_corpus, *common, *extra))
        rates = [v for s, v in series(read_metrics(run_dir), "train/tokens_per_s") if s > 20]
        speed[path], final[path] = statistics.median(rates), result["train/loss"]
    report("guard_step_time", spike_check_tokens_per_s=speed["spike_check"], plain_tokens_per_s=speed["plain"],
           ratio=speed["spike_check"] / speed["plain"])
    assert abs(final["plain"] - final["spike_check"]) < 1e-3  # the same training (CUDA atomics aside)
    assert speed["spike_check"] > 0.9 * speed["plain"], speed
