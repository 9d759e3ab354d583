"""Muon's Newton–Schulz in bf16 or in fp32, on a CPU with native bf16 matmul and on one without.

A CPU without AVX512-BF16 or AMX (the AVX-only machines) emulates bf16 matmul. This script
shows how such a CPU computes on this one: a second process limits oneDNN and ATen to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2). In each process, one torch thread:
- Newton–Schulz alone: the time-to-quality model's matrices as today's default gives them to
  Muon (4 layers × Q, K, V, attn c_proj, c_fc, mlp c_proj), stacked by shape as Muon stacks
  them, 5 iterations, in bf16, in fp32 (where the MLP's wide matrices iterate on their Gram
  matrix) and in fp32 with the textbook iteration for every matrix (gptlab before that);
- gptlab's default recipe at that size (bench/time_to_quality.py's data and shape), tokens/s
  over a few steps with each of the three, and the seeds' Trainer (time_to_quality.py's
  Trainer arm, fp32) over as many steps.
gptlab now takes bf16 where the CPU says it has native bf16 matmul and fp32 elsewhere
(gptlab.distributed.native_bf16_matmul); the AVX2 process's CPU still says it has it, so there
both are forced.

    python bench/ns_precision.py --json bench/results/ns_precision.json
    python bench/ns_precision.py --tiny --steps 2     # the CI-sized run
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from common import AVX2, RESULT, StepClock, add_json_option, as_overrides, print_result, run_gptlab, write_json
from time_to_quality import SHAPE, TINY, TRAINER, WAR_AND_PEACE, load_data
from train_vs_trainer import make_trainer

# name: (Newton–Schulz's dtype, whether every matrix takes the textbook iteration)
VARIANTS = {"bf16": (torch.bfloat16, False), "fp32": (torch.float32, False), "fp32_textbook": (torch.float32, True)}


def newton_schulz_s(shape: dict, dtype: torch.dtype, repeats: int) -> float:
    """Seconds for one Muon step's Newton–Schulz on the model's matrices (the best of `repeats`)."""
    from gptlab.muon import orthogonalise

    n, d = shape["model.n_layer"], shape["model.n_embd"]
    stacks = [torch.randn(k * n, *s) for k, s in ((3, (d, d)), (1, (d, d)), (1, (d, 4 * d)), (1, (4 * d, d)))]
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        for g in stacks:
            orthogonalise(g, 5, dtype)
        best = min(best, time.perf_counter() - start)
    return best


def trainer_tokens_per_s(data, shape: dict, steps: int, warmup_steps: int) -> float:
    from transformers import TrainerCallback

    clock = StepClock()

    class Clocked(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            clock.stamp(state.global_step)

    model_kw = {k: shape[f"model.{k}"] for k in ("n_positions", "n_embd", "n_layer", "n_head")}
    batch = shape["trainer.micro_batch_size"]
    with tempfile.TemporaryDirectory() as out:
        make_trainer(data, shape["data.block_size"], steps, out, model_kw, dict(
            per_device_train_batch_size=batch, logging_steps=warmup_steps, seed=shape["seed"], **TRAINER),
            [Clocked()]).train()
    return clock.rates(batch * shape["data.block_size"], warmup_steps, steps)["tokens_per_s"]


def worker(args) -> None:
    import gptlab.muon

    gram = gptlab.muon._gram_newton_schulz
    torch.set_num_threads(1)
    shape = TINY if args.tiny else SHAPE
    result = {}
    for name, (dtype, textbook) in VARIANTS.items():
        gptlab.muon._gram_newton_schulz = gptlab.muon._newton_schulz if textbook else gram
        result[f"ns_{name}_s"] = newton_schulz_s(shape, dtype, args.repeats)
    data = load_data(SimpleNamespace(tiny=args.tiny, text=args.text, cache_dir=args.cache_dir, worker=True))
    for name, (dtype, textbook) in VARIANTS.items():
        gptlab.muon._gram_newton_schulz = gptlab.muon._newton_schulz if textbook else gram
        gptlab.muon.native_bf16_matmul = lambda device, bf16=dtype == torch.bfloat16: bf16
        run = run_gptlab(data, [*as_overrides(shape), "trainer.cpu_threads=1", "trainer.sample_prompts=[]",
                                "trainer.save_every=0"], args.steps + 2, 2)
        result[f"default_{name}_tokens_per_s"] = run["tokens_per_s"]
    result["trainer_tokens_per_s"] = trainer_tokens_per_s(data, shape, args.steps + 2, 2)
    print_result(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per run, after 2 untimed ones")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text", default=str(WAR_AND_PEACE))
    p.add_argument("--cache-dir", default="~/.cache/gptlab")
    p.add_argument("--tiny", action="store_true", help="the 2-layer, 32-wide model (the CI-sized run)")
    add_json_option(p, "ns_precision")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    load_data(SimpleNamespace(tiny=args.tiny, text=args.text, cache_dir=args.cache_dir, worker=False))
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--text", args.text, "--cache-dir", args.cache_dir, *(["--tiny"] if args.tiny else [])]
    results = {}
    for cpu, extra in (("native", {}), ("avx2", AVX2)):
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **extra})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
        if proc.returncode or not lines:
            sys.exit(f"the {cpu} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[cpu] = json.loads(lines[-1][len(RESULT):])
    write_json(args.json, {"results": results})
    print(f"{'bf16 matmul':22s} {'NS s: bf16':>10s} {'fp32':>6s} {'textbook':>8s}   "
          f"{'default tok/s, NS bf16':>22s} {'fp32':>6s} {'textbook':>8s} {'Trainer':>8s}   x Trainer, NS bf16 / fp32 / textbook")
    for cpu, r in results.items():
        ns = [r[f"ns_{name}_s"] for name in VARIANTS]
        rates = [r[f"default_{name}_tokens_per_s"] for name in VARIANTS]
        trainer = r["trainer_tokens_per_s"]
        print(f"{'native' if cpu == 'native' else 'emulated (AVX2 only)':22s} {ns[0]:10.3f} {ns[1]:6.3f} {ns[2]:8.3f}   "
              f"{rates[0]:22.0f} {rates[1]:6.0f} {rates[2]:8.0f} {trainer:8.0f}   "
              + " / ".join(f"{rate / trainer:.2f}x" for rate in rates))

if __name__ == "__main__":
    main()
