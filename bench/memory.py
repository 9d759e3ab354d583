"""Peak memory per process and tokens/s of GPT-2 124M on 2 processes, per parallel configuration.

    python bench/memory.py                         # every configuration: block 1024, micro batch 2
    python bench/memory.py --configs DDP+AC --steps 4
    python bench/memory.py --tiny --block 64       # the same path with a toy model (a test runs this)

Each configuration is one `accelerate launch --num_processes N` of this file in worker mode:
gptlab's real run() on random GPT-2-vocab tokens (as bench/gpu.py; no data files needed),
global batch = micro batch x N (grad_accum 1), stopped right after the last measured step
(evaluation, checkpoint and export are not what is measured). Every rank reports
  peak      torch.cuda.max_memory_allocated on a GPU, peak RSS (ru_maxrss) on a CPU,
            which also counts the interpreter, torch and the data (about 0.5 GB);
  state     its parameter, gradient and optimizer-state bytes after step 1 (gptlab.footprint);
and rank 0 the loop's train/tokens_per_s (all processes), median over the steps after the
first. Ratios are against the first configuration run.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, add_json_option, as_overrides, compose, free_port, print_result, write_json

# name: (accelerate launch arguments, train.py overrides). One line adds a configuration.
CONFIGS = {
    "DDP": (["--multi_gpu"], []),
    "DDP+AC": (["--multi_gpu"], ["trainer.activation_checkpointing=true"]),
    "FSDP2": (["--config_file", str(ROOT / "launch" / "accelerate" / "fsdp.yaml")], []),
    "FSDP2+AC": (["--config_file", str(ROOT / "launch" / "accelerate" / "fsdp.yaml")],
                 ["trainer.activation_checkpointing=true"]),
    "DDP+LoRA16": (["--multi_gpu"], ["model.lora.r=16"]),
    "DDP+AC+LoRA16": (["--multi_gpu"], ["trainer.activation_checkpointing=true", "model.lora.r=16"]),
    "DDP+Muon": (["--multi_gpu"], ["optim.name=muon"]),
    "FSDP2+Muon": (["--config_file", str(ROOT / "launch" / "accelerate" / "fsdp.yaml")], ["optim.name=muon"]),
}


class Measured(Exception):
    """Raised by every rank after the last measured step: the run ends there."""


def peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args, overrides: list) -> None:
    """One rank of one configuration; writes out/rank<r>.json."""
    import torch.distributed as dist

    import gptlab.loop as gptlab_loop
    import gptlab.run as gptlab_run
    from gptlab.distributed import settle_gloo
    from gpu import random_tokens

    measured = {"tokens_per_s": []}
    log_state_bytes = gptlab_loop.log_state_bytes

    def capture(*a, **k):
        measured["state"] = log_state_bytes(*a, **k)
        return measured["state"]

    class MeasuringTracker(gptlab_run.Tracker):
        def log(self, metrics, step):
            super().log(metrics, step)
            if "train/tokens_per_s" in metrics:
                if step > 1:
                    measured["tokens_per_s"].append(metrics["train/tokens_per_s"])
                if step == args.steps:
                    measured["peak_bytes"] = peak_bytes()
                    raise Measured

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    gptlab_loop.log_state_bytes = capture
    gptlab_run.Tracker = MeasuringTracker
    with tempfile.TemporaryDirectory() as tmp:
        global_batch = args.batch * world
        data = random_tokens(Path(tmp), args.vocab, (args.steps + 1) * global_batch * args.block, args.block,
                             global_batch)
        gptlab_run.prepare = lambda cfg, *a, **k: data
        cfg = compose([*overrides, f"run_dir={tmp}/run", f"trainer.max_steps={args.steps}"])
        try:
            gptlab_run.run(cfg)
        except Measured:  # out of run() before its own end: end the process group as run() would
            if dist.is_initialized():
                settle_gloo()
                dist.destroy_process_group()
    out = {"rank": rank, "peak_bytes": measured["peak_bytes"], "state": measured["state"],
           "tokens_per_s": statistics.median(measured["tokens_per_s"])}
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(out))


def measure(name: str, args, out_dir: Path) -> dict:
    launch, extra = CONFIGS[name]
    settings = model_settings(args)
    out_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", str(args.processes),
           "--main_process_port", str(free_port()), __file__, "--worker", str(out_dir),
           "--block", str(args.block), "--batch", str(args.batch), "--steps", str(args.steps),
           "--vocab", str(args.vocab), "--", *as_overrides(settings), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    return {"peak_bytes": [r["peak_bytes"] for r in ranks], "state": [r["state"] for r in ranks],
            "tokens_per_s": ranks[0]["tokens_per_s"]}


def model_settings(args) -> dict:
    model = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64} if args.tiny else \
        {"model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768}
    return {**model, "model.n_positions": args.block, "model.dropout": 0.0, "data.block_size": args.block,
            "trainer.micro_batch_size": args.batch, "trainer.grad_accum": 1, "trainer.log_every": 1,
            "trainer.eval_every": 10 ** 9, "trainer.save_every": 0, "trainer.sample_prompts": [],
            "scheduler.warmup_steps": 1, "logger.tensorboard": False,
            # AdamW unless a row says Muon: one optimizer keeps the other rows comparable
            "optim.name": "adamw"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2, help="micro batch per process")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps; tokens/s is timed after the first")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model with a 512 vocab, for CPU tests")
    p.add_argument("--vocab", type=int, default=50257)
    add_json_option(p, "memory")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first is not timed)")
    if args.tiny:
        args.vocab = min(args.vocab, 512)
    if args.worker:
        return worker(args, overrides)

    import torch

    names = args.configs.split(",")
    unknown = set(names) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configuration(s) {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device}, torch {torch.__version__}, {args.processes} processes, block {args.block}, micro batch "
          f"{args.batch}, {args.steps} steps, {'tiny model' if args.tiny else 'GPT-2 124M'}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = measure(name, args, Path(tmp) / name)
    base = results[names[0]]
    mib = 2 ** 20
    print(f"{'config':<10} {'peak MiB/process (max)':>23} {'x base':>7} {'params+grads+optim MiB':>23} "
          f"{'tokens/s':>9} {'x base':>7}")
    for name, r in results.items():
        state = r["state"][0]
        r["peak_ratio"] = max(r["peak_bytes"]) / max(base["peak_bytes"])
        r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{name:<10} {max(r['peak_bytes']) / mib:>23.0f} {r['peak_ratio']:>7.2f} "
              f"{'+'.join(f'{v / mib:.1f}' for v in state.values()):>23} {r['tokens_per_s']:>9.0f} "
              f"{r['speed_ratio']:>7.2f}", flush=True)
    summary = {"device": device, "settings": vars(args), "results": results}
    print_result(summary)
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
