"""gptlab's loop against the Hugging Face Trainer on the same work, side by side.

Same tiny GPT-2 (4 layers, 256 wide, vocab 8192, block 256, micro batch 8), the same
War and Peace tokens, the same AdamW, LR schedule, clipping and number of steps.
Each arm runs in a fresh process, interleaved A B A B, so a neighbour that loads the
machine for a while slows both arms alike; the summary gives medians.

    python bench/train_vs_trainer.py                     # gptlab and both Trainers: 3 rounds of 60 steps
    python bench/train_vs_trainer.py --threads 1 --arm gptlab --arm trainer
    python bench/train_vs_trainer.py --arm gptlab --arm gptlab:trainer.compile=true
    python bench/train_vs_trainer.py --arm gptlab --arm gptlab-fused_loss   # without one optimisation

The Trainer arm builds the model as the seeds do, from a GPT2Config of the same shape,
whose default activation is "gelu_new"; `trainer:gelu_pytorch_tanh` gives it the same
tanh GELU in one kernel that gptlab's models use, so both run the identical model: the
like-for-like rival. gptlab over `trainer` (the headline) counts the loop, the fused head
+ loss and the one-kernel GELU; over `trainer:gelu_pytorch_tanh`, the loop and the fused
head + loss alone. Every arm runs on the same number of torch threads (--threads, by
default gptlab's choice: the physical cores), checked where the steps are timed.

Throughput counts the steps after the first `--warmup-steps` (allocator and thread
pool warm-up), timed where gptlab's loop logs and by a Trainer callback at the same
step boundaries, both in wall time (tokens/s) and in this process's CPU time
(tokens per CPU-second, which neighbours on a shared machine barely inflate). MFU is
gptlab.flops' FLOPs per token times each rate, over the best fp32 1024² matmul rate
measured (the same two ways) just before any of the runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (RESULT, ROOT, StepClock, add_json_option, as_overrides, compose, matmul_peak, print_result,
                    run_gptlab, write_json)

WAR_AND_PEACE = ROOT.parent / "shared" / "data" / "tolstoy" / "war_and_peace.txt"
# The model and optimisation both arms share (gptlab's config names).
COMMON = {
    "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 256, "model.n_positions": 256,
    "data.block_size": 256, "trainer.micro_batch_size": 8, "trainer.grad_accum": 1,
    "trainer.max_grad_norm": 1.0, "optim.lr": 1e-3, "optim.weight_decay": 0.1, "optim.betas": [0.9, 0.95],
    "optim.eps": 1e-8, "optim.name": "adamw", "scheduler.name": "cosine", "scheduler.warmup_steps": 10,
    "scheduler.min_lr": 1e-4,
    "seed": 1337,
}


# --- data: gptlab's own text source and BPE on the novel, prepared once into its token cache ---

def data_overrides(args) -> list:
    # A line (the novel's paragraph) is one document; 5% of them, by a seeded hash, is the
    # validation split, enough for an evaluation batch even in the test's slice of the novel.
    return ["data=text", f"data.files=[{json.dumps(str(Path(args.text).resolve()))}]", "data.text_unit=line",
            "data.valid_fraction=0.05", f"tokenizer.vocab_size={args.vocab_size}"]


def load_data(args):
    from gptlab.data.prepare import prepare

    cfg = compose([*as_overrides(COMMON), *data_overrides(args)])
    return prepare(cfg, Path(args.cache_dir).expanduser(), show_progress=not args.worker)


# --- arm A: gptlab's real run(): accelerator, model, optimizer, loop, export (bench/common.py) ---

# Each undoes one optimisation of gptlab's training step, to measure what it gives:
# `--arm gptlab-fused_loss` is gptlab with the logits path instead of the fused head + loss.
def _logits_loss():
    import gptlab.loop

    gptlab.loop.forward_loss = lambda model, x, loss_fn, z: loss_fn(model(input_ids=x, use_cache=False).logits, x, z)


def _gelu_new():
    import gptlab.model

    config = gptlab.model.GPT2Config
    gptlab.model.GPT2Config = lambda **kw: config(**{**kw, "activation_function": "gelu_new"})


def _foreach_adamw():
    import torch
    import gptlab.run
    from gptlab.optim import param_groups

    gptlab.run.build_optimizer = lambda model, c: torch.optim.AdamW(
        param_groups(model, c.weight_decay), lr=c.lr, betas=tuple(c.betas), eps=c.eps, foreach=True)


ABLATIONS = {"fused_loss": _logits_loss, "tanh_gelu": _gelu_new, "fused_adamw": _foreach_adamw}
SAME_MODEL = "trainer:gelu_pytorch_tanh"  # the Trainer on gptlab's exact model: the like-for-like arm


def run_gptlab_arm(args, extra: list, without: str = "") -> dict:
    for name in filter(None, without.split("-")):
        ABLATIONS[name]()
    return run_gptlab(load_data(args), [*as_overrides(COMMON), *data_overrides(args),
                                        f"trainer.cpu_threads={args.threads}", *extra], args.steps, args.warmup_steps)


# --- arm B: the Trainer with default_data_collator, as the seeds use it (run_clm style) ---

def make_trainer(data, block_size: int, steps: int, out_dir: str, model_kw: dict, args_kw: dict, callbacks=()):
    """The seeds' Trainer over gptlab's tokens of `data`: run_clm's group_texts, default_data_collator,
    GPT2LMHeadModel(GPT2Config(**model_kw)), TrainingArguments(**args_kw); seeded by args_kw["seed"]."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

    T = block_size
    ids = np.asarray(data.train.tokens[: len(data.train) * T], dtype=np.int64).reshape(-1, T).tolist()
    # group_texts in run_clm: labels are a copy of input_ids; the model shifts them.
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * T] * len(ids), "labels": ids})
    tok = data.tokenizer
    torch.manual_seed(args_kw["seed"])
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id,
                                       eos_token_id=tok.eos_token_id, **model_kw))
    targs = TrainingArguments(output_dir=out_dir, max_steps=steps, save_strategy="no", eval_strategy="no",
                              report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                              dataloader_drop_last=True, **args_kw)
    return Trainer(model=model, args=targs, train_dataset=ds, data_collator=default_data_collator,
                   callbacks=list(callbacks))


def run_trainer(args, extra: list) -> dict:
    from transformers import TrainerCallback

    cfg = compose([*as_overrides(COMMON), *data_overrides(args)])
    data = load_data(args)
    m, o = cfg.model, cfg.optim
    # The seeds' model: a GPT2Config with the same shape (and gptlab's dropout of 0), whose
    # default activation is "gelu_new"; `trainer:gelu_pytorch_tanh` gives it gptlab's kernel.
    model_kw = {"n_positions": m.n_positions, "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head,
                "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
                **({"activation_function": extra[0]} if extra else {})}
    clock = StepClock()

    class Clocked(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            clock.stamp(state.global_step)

    steps, warm = args.steps, args.warmup_steps
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(data, cfg.data.block_size, steps, out, model_kw, dict(
            per_device_train_batch_size=cfg.trainer.micro_batch_size, learning_rate=o.lr,
            weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
            max_grad_norm=cfg.trainer.max_grad_norm, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr": cfg.scheduler.min_lr}, warmup_steps=cfg.scheduler.warmup_steps,
            logging_steps=warm, seed=cfg.seed), [Clocked()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**clock.rates(cfg.trainer.micro_batch_size * cfg.data.block_size, warm, steps),
            "optimizer": trainer.args.optim.value, "final_loss": losses[-1]}


# --- the driver ---

def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)  # the Trainer's; gptlab's run() sets trainer.cpu_threads
    kind, _, extra = args.worker.partition(":")
    kind, _, without = kind.partition("-")
    extra = [e for e in extra.split(",") if e]
    print_result(run_gptlab_arm(args, extra, without) if kind == "gptlab" else run_trainer(args, extra))


def spawn(arm: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", arm, "--text", args.text, "--vocab-size", str(args.vocab_size),
           "--cache-dir", str(args.cache_dir), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.exit(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def flops_per_token(args) -> float:
    from gptlab.flops import model_flops_per_token
    from gptlab.model import build_model

    cfg = compose([*as_overrides(COMMON), *data_overrides(args)])
    model = build_model(cfg.model, load_data(args).tokenizer, cfg.data.block_size)
    return model_flops_per_token(model, cfg.data.block_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", action="append", help="gptlab[-ablation...][:hydra.override,...] or trainer[:activation]; "
                   f"ablations: {', '.join(ABLATIONS)}; "
                   "default: gptlab and trainer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=10, help="steps not timed; also the log interval")
    p.add_argument("--text", default=str(WAR_AND_PEACE))
    p.add_argument("--cache-dir", default="~/.cache/gptlab")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--threads", type=int, help="torch threads for every arm and the peak measurement "
                   "(default: the physical cores, gptlab's choice); 1 is steadier on a machine shared with other jobs")
    add_json_option(p, "train_vs_trainer")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps % args.warmup_steps or args.steps <= args.warmup_steps:
        p.error("--steps must be a larger multiple of --warmup-steps")
    if args.worker:
        return worker(args)
    if not Path(args.text).is_file():
        sys.exit(f"{args.text} not found: the bench needs the shared War and Peace text (--text)")

    import torch
    from gptlab.distributed import cpu_threads_per_process

    args.threads = args.threads or cpu_threads_per_process()
    torch.set_num_threads(args.threads)
    arms = args.arm or ["gptlab", "trainer", SAME_MODEL]
    fpt = flops_per_token(args)  # prepares the data (once; the arms find it cached)
    print(f"{len(arms)} arms x {args.repeats} repeats, {args.steps} steps ({args.warmup_steps} untimed), "
          f"{torch.get_num_threads()} threads, {fpt / 1e6:.1f} MFLOPs per token", flush=True)
    results, peaks = {arm: [] for arm in arms}, []
    for r in range(args.repeats):
        # A B A B, with every other round reversed so a drifting load favours no arm.
        for arm in arms if r % 2 == 0 else arms[::-1]:
            peaks.append(matmul_peak())  # next to each run, under the same neighbours
            res = spawn(arm, args)
            results[arm].append(res)
            print(f"  round {r + 1} {arm:32s} {res['tokens_per_s']:6.0f} tok/s  {res['tokens_per_cpu_s']:6.0f} tok/CPU-s"
                  f"  (matmul {peaks[-1]['flops'] / 1e9:.0f} GFLOP/s, {peaks[-1]['flops_per_cpu_s'] / 1e9:.0f} "
                  f"GFLOP/CPU-s)  loss {res['final_loss']:.3f}", flush=True)

    ran_on = {arm: sorted({t for r in rows for t in r["threads"]}) for arm, rows in results.items()}
    if any(t != [args.threads] for t in ran_on.values()):
        sys.exit(f"the arms did not all run on {args.threads} threads: {ran_on}")
    # One peak for every run: the best matmul seen, so MFU is never flattered by a slow moment.
    peak = {k: max(p[k] for p in peaks) for k in ("flops", "flops_per_cpu_s")}
    summary = {"flops_per_token": fpt, "threads": torch.get_num_threads(), "peak": peak, "arms": {}}
    print(f"\nmedians over {args.repeats} rounds; MFU against the best fp32 1024² matmul of the bench "
          f"({peak['flops'] / 1e9:.1f} GFLOP/s, {peak['flops_per_cpu_s'] / 1e9:.1f} GFLOP/CPU-s):")
    for arm, rows in results.items():
        tps, tpc = (statistics.median(r[k] for r in rows) for k in ("tokens_per_s", "tokens_per_cpu_s"))
        summary["arms"][arm] = {"tokens_per_s": tps, "mfu": tps * fpt / peak["flops"], "tokens_per_cpu_s": tpc,
                                "cpu_mfu": tpc * fpt / peak["flops_per_cpu_s"], "runs": rows}
        print(f"  {arm:40s} {tps:6.0f} tok/s (MFU {tps * fpt / peak['flops']:4.0%})  "
              f"{tpc:6.0f} tok/CPU-s (MFU {tpc * fpt / peak['flops_per_cpu_s']:4.0%})")
    # Each gptlab arm against each Trainer: the seeds' model (the headline) and the same model.
    for base, key in (("trainer", "vs_trainer"), (SAME_MODEL, "vs_same_model")):
        for arm in [a for a in arms if a in results and not a.startswith("trainer")] if base in results else []:
            ratio = {k: statistics.median(a[k] / b[k] for a, b in zip(results[arm], results[base]))
                     for k in ("tokens_per_s", "tokens_per_cpu_s")}
            summary["arms"][arm][f"ratio_{key}"] = ratio["tokens_per_s"]
            summary["arms"][arm][f"cpu_ratio_{key}"] = ratio["tokens_per_cpu_s"]
            print(f"  {arm} / {base} (median of the rounds' ratios): {ratio['tokens_per_s']:.2f}x in tok/s, "
                  f"{ratio['tokens_per_cpu_s']:.2f}x in tok/CPU-s")
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
