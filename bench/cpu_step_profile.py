"""Where an fp32 training step on a CPU spends its time: gptlab's real run() at
bench/time_to_quality.py's size (GPT-2 4×256, block 256, micro batch 8, vocab 8192, War and
Peace), one torch thread, torch.profiler over a few steps after a warmup.

The ops' self CPU time goes into: matmuls (mm/addmm/bmm/linear), attention (SDPA's CPU kernels,
forward and backward), the optimizer (everything inside Optimizer.step, Newton–Schulz's
matmuls included, from its inclusive time), and the rest, by op. Against the step's wall time
and the matmul peak measured right after (1024² fp32 matmul, same thread count), it says what
is left between the step and that peak.

    python bench/cpu_step_profile.py --json bench/results/cpu_step_profile.json
    python bench/cpu_step_profile.py --arm "optim=adamw" --json ...   # overrides for one arm
    python bench/cpu_step_profile.py --tiny                            # the CI-sized smoke run
    python bench/cpu_step_profile.py --isa avx2 --json ...             # as an AVX2-only CPU runs it
"""
import argparse
import time
from types import SimpleNamespace

import torch

from common import ISA_ENV, add_json_option, as_overrides, cap_isa, gptlab_run, matmul_peak, print_result, write_json
from time_to_quality import SHAPE, TINY, WAR_AND_PEACE, load_data

MATMUL = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile(args) -> dict:
    import gptlab.loop

    warm, steps = args.warmup_steps, args.warmup_steps + args.steps
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    calls, wall = [0], {}
    set_lr = gptlab.loop.set_lr

    def bracketing_set_lr(optimizer, lr):  # first thing in every step
        calls[0] += 1
        if calls[0] == warm + 1:
            prof.start()
            wall["t0"] = time.perf_counter()
        set_lr(optimizer, lr)

    gptlab.loop.set_lr = bracketing_set_lr

    def on_log(metrics, step):  # the last step's train log: before the final evaluation and the export
        if metrics and "train/loss" in metrics and step == steps:
            wall["s"] = time.perf_counter() - wall["t0"]
            prof.stop()

    torch.set_num_threads(args.threads)
    shape = TINY if args.tiny else SHAPE
    data_args = SimpleNamespace(tiny=args.tiny, text=args.text, cache_dir=args.cache_dir, worker=True)
    # the steady step: the default's sequence warmup off unless an --arm asks for it
    ran, _ = gptlab_run(load_data(data_args), [*as_overrides(shape), f"trainer.cpu_threads={args.threads}",
                                               "trainer.seq_warmup_steps=0", *args.arm, f"trainer.max_steps={steps}", f"trainer.log_every={steps}",
                                               f"trainer.save_every={steps * 10}", f"trainer.eval_every={10 ** 9}",
                                               "trainer.sample_prompts=[]", "tasks.names=[]"], on_log)
    gptlab.loop.set_lr = set_lr
    wall_s = wall["s"]
    ops = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in ops) / 1e6
    # The optimizer: every op under an outermost Optimizer.step (MuonAdamW's wraps Muon's and AdamW's).
    inside, outer = set(), [e for e in prof.events() if _is_step(e) and not any(_is_step(a) for a in _ancestors(e))]
    for e in outer:
        inside.update(id(c) for c in _descendants(e))
    by = {"matmul": 0.0, "attention": 0.0, "optimizer": sum(e.cpu_time_total for e in outer) / 1e6}
    for e in prof.events():
        kind = "matmul" if e.name in MATMUL else "attention" if e.name in ATTENTION else None
        if kind and id(e) not in inside:
            by[kind] += e.self_cpu_time_total / 1e6
    by["other ops"] = max(total_self - sum(by.values()), 0.0)
    by["outside ops (Python, dispatch)"] = max(wall_s - total_self, 0.0)
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:15]
    peak = matmul_peak()
    tokens = shape["trainer.micro_batch_size"] * shape["data.block_size"] * args.steps
    return {
        "config": {"optim": ran.optim.name, "scheduler": ran.scheduler.name, "mixed_precision": ran.trainer.mixed_precision,
                   "overrides": args.arm, "threads": args.threads, "steps": args.steps, **shape,
                   "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "wall_s": wall_s, "profiled_self_s": total_self, "tokens_per_s": tokens / wall_s,
        "seconds": by, "shares": {k: v / wall_s for k, v in by.items()},
        "matmul_peak_flops": peak["flops"],
        "top_ops": [{"op": e.key[:90], "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                     "share": e.self_cpu_time_total / 1e6 / wall_s} for e in top],
    }


def _is_step(event) -> bool:
    return event.name.startswith("Optimizer.step#")


def _ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", action="append", default=[], help="a Hydra override for gptlab's run (repeatable)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", default=str(WAR_AND_PEACE))
    p.add_argument("--cache-dir", default="~/.cache/gptlab")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--isa", choices=sorted(ISA_ENV), help="cap the CPU kernels at this instruction set "
                   "(bench/common.py's cap_isa)")
    add_json_option(p, "cpu_step_profile")
    args = p.parse_args()
    cap_isa(args.isa)
    result = profile(args)
    write_json(args.json, result)
    print(f"{result['tokens_per_s']:.0f} tok/s; of the step's wall time: " +
          ", ".join(f"{k} {v:.1%}" for k, v in result["shares"].items()))
    for row in result["top_ops"]:
        print(f"  {row['op']:<60} {row['calls']:>6} calls {row['self_s']:8.3f} s {row['share']:6.1%}")
    print_result({k: v for k, v in result.items() if k != "top_ops"})


if __name__ == "__main__":
    main()
