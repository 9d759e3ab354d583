"""GPT-2 124M at T=1024 on one GPU: gptlab's configurations against the HF Trainer, and a
profile of one compiled step. One call of a device loan, arms in priority order until
--budget-s is spent; a short table last.

    python bench/gpu_profile.py --budget-s 240 --json OUT/gpu_profile.json
    python bench/gpu_profile.py --arm trainer:16 --arm gptlab:adamw:compiled:32
    python bench/gpu_profile.py --tiny --budget-s 120 --arm trainer:2 --arm profile:muon:2   # CPU smoke

Arms: `gptlab:OPTIM:MODE:BATCH` (bench/gpu.py: the real run(), MODE compiled or eager),
`trainer:BATCH` (the HF Trainer on the same model: GPT-2 124M with the same 50,304 vocab and
tanh GELU, SDPA attention, bf16 autocast, its fused AdamW, no compile; the same random
tokens), `profile:OPTIM:BATCH` (gptlab compiled, torch.profiler over one step after the
compile). Each arm is a fresh process with its own time limit.

The profile's breakdown is of the step's wall time (host clock, device synchronised at both
ends): GEMMs, attention, optimizer (every kernel launched inside Optimizer.step, Muon's
Newton-Schulz matmuls included), data (host-to-device copies), other kernels (elementwise,
norms, loss), and host gaps (wall time with no kernel or copy running).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULT, ROOT, add_json_option, as_overrides, gptlab_run, print_result, write_json
from gpu import GPT2_VOCAB, model_shape, random_tokens

BENCH = ROOT / "bench"
DEFAULT_ARMS = ["trainer:16", "profile:muon:16", "gptlab:adamw:compiled:16", "gptlab:muon:compiled:32",
                "gptlab:muon:compiled:8", "gptlab:adamw:eager:16", "gptlab:muon:eager:32", "gptlab:muon:eager:8",
                "gptlab:adamw:compiled:32", "gptlab:adamw:compiled:8", "gptlab:adamw:eager:32",
                "gptlab:adamw:eager:8"]
ARM_LIMIT_S = {"trainer": 90, "profile": 120, "compiled": 120, "eager": 75}


# --- the profile: which kernel belongs where ---

ATTENTION = ("flash", "fmha", "attention", "attn", "sdpa")
GEMM = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "wgmma", "triton_tem")  # triton_tem: Inductor's mm templates


def _union(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def breakdown(trace: dict, wall_us: float, top: int = 15) -> dict:
    """Shares of one step's wall time (µs) from a torch.profiler Chrome trace, and the top kernels by time."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    steps = [e for e in events if e.get("cat") in ("user_annotation", "cpu_op")
             and e["name"].startswith("Optimizer.step")]

    def in_optimizer(kernel) -> bool:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        return launch is not None and any(s["ts"] <= launch["ts"] <= s["ts"] + s["dur"] and s["tid"] == launch["tid"]
                                          for s in steps)

    times = {"gemm": 0.0, "attention": 0.0, "optimizer": 0.0, "data": 0.0, "other": 0.0}
    per_kernel = {}
    for e in device:
        name = e["name"].lower()
        if e["cat"] == "gpu_memcpy":
            kind = "data" if "htod" in name else "other"
        elif in_optimizer(e):
            kind = "optimizer"
        elif any(k in name for k in ATTENTION):
            kind = "attention"
        elif any(k in name for k in GEMM):
            kind = "gemm"
        else:
            kind = "other"
        times[kind] += e["dur"]
        row = per_kernel.setdefault(e["name"], {"kernel": e["name"][:100], "kind": kind, "calls": 0, "us": 0.0})
        row["calls"] += 1
        row["us"] += e["dur"]
    busy = _union((e["ts"], e["ts"] + e["dur"]) for e in device)
    # Kernels can overlap (copies behind compute), so the kinds' sum may pass the busy time a little.
    shares = {k: v / wall_us for k, v in times.items()}
    shares["host_gaps"] = max(wall_us - busy, 0.0) / wall_us
    kernels = sorted(per_kernel.values(), key=lambda r: -r["us"])[:top]
    for r in kernels:
        r["share"] = r["us"] / wall_us
    return {"wall_ms": wall_us / 1e3, "device_busy_ms": busy / 1e3, "shares": shares, "top_kernels": kernels,
            "n_kernels": len(device)}


# --- workers (each in its own process) ---

def profile_worker(args) -> dict:
    """gptlab's run() with the profiler around one optimizer step after the compile."""
    import torch
    import gptlab.loop

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities)
    target, calls, wall = args.warmup_steps + 1, [0], {}
    set_lr = gptlab.loop.set_lr

    def bracketing_set_lr(optimizer, lr):  # called first thing in every step
        calls[0] += 1
        if calls[0] in (target, target + 1):
            sync()
            if calls[0] == target:
                prof.start()
                wall["t0"] = time.perf_counter()
            else:
                wall["us"] = (time.perf_counter() - wall["t0"]) * 1e6
                prof.stop()
        set_lr(optimizer, lr)

    gptlab.loop.set_lr = bracketing_set_lr
    block = 64 if args.tiny else 1024
    shape = model_shape(args.tiny)
    settings = {**{f"model.{k}": v for k, v in shape.items()}, "model.n_positions": block, "data.block_size": block,
                "trainer.micro_batch_size": args.batch, "trainer.mixed_precision": "bf16" if cuda else "no",
                "trainer.compile": not args.tiny, "scheduler.warmup_steps": 2}  # tiny: the CPU smoke test, eager
    steps = target + 1
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        data = random_tokens(Path(tmp), 512 if args.tiny else GPT2_VOCAB, (steps + 1) * args.batch * block, block,
                             args.batch)
        gptlab_run(data, [f"optim={args.optim}", *as_overrides(settings), f"trainer.max_steps={steps}",
                          f"trainer.log_every={steps}", f"trainer.save_every={steps * 10}",
                          f"trainer.eval_every={10 ** 9}"])
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
    result = breakdown(trace, wall["us"])
    # Where the host's time goes (launch-bound steps show it here, not in the kernels).
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    result["top_cpu_ops"] = [{"op": e.key[:100], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                             for e in ops]
    result.update(optim=args.optim, batch=args.batch, profiled_step=target,
                  tokens_per_s=args.batch * block / (wall["us"] / 1e6),
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
    return result


def trainer_worker(args) -> dict:
    """The HF Trainer on the same model and tokens, bf16, SDPA, fused AdamW; timed between two synced steps."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments,
                              default_data_collator)
    from gptlab.flops import gpu_peak, model_flops_per_token

    cuda = torch.cuda.is_available()
    block, vocab = (64, 512) if args.tiny else (1024, 50304)
    steps, warm = args.steps, args.warmup_steps
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, ((steps + 1) * args.batch, block), generator=g)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=block, activation_function="gelu_pytorch_tanh",
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **model_shape(args.tiny)),
                            ).to(dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step in (warm, steps):  # the only syncs added: at the two timed boundaries
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch,
                                  learning_rate=6e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                                  max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=warm,
                                  bf16=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
                                  save_strategy="no", eval_strategy="no", report_to=[], use_cpu=not cuda,
                                  disable_tqdm=True, logging_steps=warm, dataloader_drop_last=True,
                                  dataloader_pin_memory=cuda, seed=0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=default_data_collator,
                          callbacks=[Clock()])
        trainer.train()
    tokens_per_s = args.batch * block * (steps - warm) / (marks[steps] - marks[warm])
    peak = gpu_peak(torch.cuda.get_device_name(), "bf16") if cuda else None
    return {"tokens_per_s": tokens_per_s, "batch": args.batch,
            "mfu": tokens_per_s * model_flops_per_token(model, block) / peak if peak else None,
            "optimizer": trainer.args.optim.value, "attention": model.config._attn_implementation,
            "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}


# --- the driver ---

def command(arm: str, args, json_path: Path) -> list:
    kind, *rest = arm.split(":")
    if len(rest) != {"gptlab": 3, "trainer": 1, "profile": 2}.get(kind):
        raise SystemExit(f"--arm {arm}: not gptlab:OPTIM:MODE:BATCH, trainer:BATCH or profile:OPTIM:BATCH")
    tiny = ["--tiny"] if args.tiny else []
    timing = ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    if kind == "gptlab":
        optim, mode, batch = rest
        if mode not in ("compiled", "eager"):
            raise SystemExit(f"--arm {arm}: MODE is compiled or eager")
        return [sys.executable, str(BENCH / "gpu.py"), "--optim", optim, "--batch", batch, "--json", str(json_path),
                *timing, *tiny, *(["--no-compile"] if mode == "eager" else []),
                *(["--block", "64"] if args.tiny else [])]
    if kind == "trainer":
        return [sys.executable, __file__, "--worker", "trainer", "--batch", rest[0], *timing, *tiny]
    return [sys.executable, __file__, "--worker", "profile", "--optim", rest[0], "--batch", rest[1], *timing, *tiny]


def run_arm(arm: str, args, left_s: float) -> dict:
    kind = arm.split(":")[0]
    limit = min(ARM_LIMIT_S[arm.split(":")[2] if kind == "gptlab" else kind], left_s)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "arm.json"
        cmd = command(arm, args, json_path)
        print(f"=== {arm} (limit {limit:.0f}s): {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            print(out[-2000:], flush=True)
            return {"arm": arm, "status": f"timed out after {limit:.0f}s"}
        seconds = time.perf_counter() - t0
        print(proc.stdout[-3000:] + proc.stderr[-3000:], flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode or not lines:
            return {"arm": arm, "status": f"exit {proc.returncode}", "seconds": seconds,
                    "error": proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []}
        result = json.loads(lines[-1][len(RESULT):])
        if kind == "gptlab":
            result["mfu"] = result.get("logged_mfu")
        return {"arm": arm, "status": "ok", "seconds": seconds, **result}


def table(rows: list) -> None:
    trainer = next((r["tokens_per_s"] for r in rows if r["arm"].startswith("trainer") and r["status"] == "ok"), None)
    print(f"\n{'arm':28} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs Trainer':>10}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['arm']:28} {r['status']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        ratio = f"{r['tokens_per_s'] / trainer:.2f}x" if trainer and r["arm"].split(":")[0] == "gptlab" else ""
        print(f"{r['arm']:28} {r['tokens_per_s']:10.0f} {mfu:>6} {peak:>9} {ratio:>10}")
    for r in rows:
        if r["arm"].startswith("profile") and r["status"] == "ok":
            s = r["shares"]
            print(f"\nprofile {r['arm']}: step {r['wall_ms']:.1f} ms wall, device busy {r['device_busy_ms']:.1f} ms; "
                  + ", ".join(f"{k} {v:.1%}" for k, v in s.items()))
            for k in r["top_kernels"]:
                print(f"  {k['share']:6.1%} {k['calls']:4d}x {k['kind']:9} {k['kernel'][:80]}")
            print("  host, by self CPU time: " + ", ".join(f"{o['op']} {o['self_cpu_ms']:.1f} ms/{o['calls']}x"
                                                       for o in r["top_cpu_ops"][:6]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", action="append", help=f"repeatable; default, in this order: {' '.join(DEFAULT_ARMS)}")
    p.add_argument("--budget-s", type=float, default=480, help="no arm starts once this is spent")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model, block 64: the CPU smoke test")
    p.add_argument("--worker", choices=["trainer", "profile"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--optim", default="muon", help=argparse.SUPPRESS)
    add_json_option(p, "gpu/gpu_profile")
    args = p.parse_args()
    if args.worker:
        print_result((trainer_worker if args.worker == "trainer" else profile_worker)(args))
        return
    arms = args.arm or DEFAULT_ARMS
    for arm in arms:  # every spelling checked before the first arm runs
        command(arm, args, Path("-"))
    start, rows = time.perf_counter(), []
    for arm in arms:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            rows.append({"arm": arm, "status": "not run: budget spent"})
            continue
        rows.append(run_arm(arm, args, left))
        write_json(args.json, {"budget_s": args.budget_s, "rows": rows})  # after each arm: nothing lost on a kill
    table(rows)


if __name__ == "__main__":
    main()
