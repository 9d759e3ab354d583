"""Muon's Newton–Schulz in bf16 or in fp32, on a CPU with native bf16 matmul and on one without.

A CPU without AVX512-BF16 or AMX (the AVX-only machines) emulates bf16 matmul. This script
shows how such a CPU computes on this one: a second process limits oneDNN and ATen to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2). In each process, one torch thread:
- Newton–Schulz alone: the time-to-quality model's 16 matrices (4 layers × c_attn, attn
  c_proj, c_fc, mlp c_proj), stacked by shape as Muon stacks them, 5 iterations, bf16 and fp32;
- gptlab's default recipe at that size (bench/time_to_quality.py's data and shape), tokens/s
  over a few steps with Newton–Schulz in bf16 (what gptlab did everywhere before) and in fp32,
  and the seeds' Trainer (time_to_quality.py's Trainer arm, fp32) over as many steps.
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

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def newton_schulz_s(shape: dict, dtype: torch.dtype, repeats: int, qkv_pieces: int = 1) -> float:
    """Seconds for one Muon step's Newton–Schulz on the model's matrices (the best of `repeats`);
    qkv_pieces=3: c_attn as Q, K and V apart, as optim.muon_split_qkv gives it to Muon."""
    from gptlab.muon import orthogonalise

    n, d = shape["model.n_layer"], shape["model.n_embd"]
    stacks = [torch.randn(k * n, *s) for k, s in ((qkv_pieces, (d, 3 * d // qkv_pieces)), (1, (d, d)),
                                                  (1, (d, 4 * d)), (1, (4 * d, d)))]
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        for g in stacks:
            orthogonalise(g, 5, dtype)
        best = min(best, time.perf_counter() - start)
    return best


def default_tokens_per_s(data, shape: dict, steps: int, warmup_steps: int) -> float:
    """The default recipe's tokens/s at `shape`, one thread, over `steps` after `warmup_steps`."""
    return run_gptlab(data, [*as_overrides(shape), "trainer.cpu_threads=1", "trainer.sample_prompts=[]",
                             "trainer.save_every=0"], steps + warmup_steps, warmup_steps)["tokens_per_s"]


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

    torch.set_num_threads(1)
    shape = TINY if args.tiny else SHAPE
    result = {f"ns_{name}_s": newton_schulz_s(shape, dtype, args.repeats) for name, dtype in DTYPES.items()}
    data = load_data(SimpleNamespace(tiny=args.tiny, text=args.text, cache_dir=args.cache_dir, worker=True))
    for name in DTYPES:
        gptlab.muon.native_bf16_matmul = lambda device, bf16=name == "bf16": bf16
        result[f"default_{name}_tokens_per_s"] = default_tokens_per_s(data, shape, args.steps, 2)
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
    print(f"{'bf16 matmul':22s} {'NS bf16 s':>10s} {'NS fp32 s':>10s} {'bf16/fp32':>9s}   "
          f"{'default tok/s, NS bf16':>22s} {'NS fp32':>8s} {'Trainer':>8s}   x Trainer, NS bf16 / fp32")
    for cpu, r in results.items():
        bf16, fp32, trainer = (r[k] for k in ("default_bf16_tokens_per_s", "default_fp32_tokens_per_s",
                                               "trainer_tokens_per_s"))
        print(f"{'native' if cpu == 'native' else 'emulated (AVX2 only)':22s} {r['ns_bf16_s']:10.3f} "
              f"{r['ns_fp32_s']:10.3f} {r['ns_bf16_s'] / r['ns_fp32_s']:8.1f}x   "
              f"{bf16:22.0f} {fp32:8.0f} {trainer:8.0f}   {bf16 / trainer:.2f}x / {fp32 / trainer:.2f}x")


if __name__ == "__main__":
    main()
