"""Time to a held-out loss: gptlab's recipes against the HF Trainer as the seeds use it.

War and Peace: the first 90% by bytes (cut at a line end) trains, the last 10% is held
out; one 8192-token byte-level BPE (gptlab's, trained on the train part) for every arm;
GPT-2 with 4 layers, 256 wide, block 256, micro batch 8.

The Trainer arm: `Trainer` with default_data_collator and GPT2Config defaults otherwise
(dropout 0.1, gelu_new), lr 1e-3, cosine, 30 warmup steps, weight decay 0.1, clipping 1.0,
300 steps. Its held-out loss after those steps is the target L*. It too is evaluated every
--eval-every steps (time left out), and `trainer-bf16` is the same Trainer with
TrainingArguments(bf16=True), the like-for-like rival of the bf16 gptlab arms (run by
default only where bf16 matmul is native: a GPU, or a CPU with AVX512-BF16 or AMX); it is
evaluated under the same bf16 autocast as gptlab's bf16 arms. Every arm runs on the same
number of torch threads (--threads, by default gptlab's choice), checked at every step.

Each gptlab arm (gptlab's real run(), bench/common.py) evaluates on the whole held-out
split every --eval-every steps; it reports the training seconds (evaluation excluded)
until its held-out loss first reaches L*, with the step, the ratio of those seconds to
the Trainer's training seconds for its whole run, tokens/s and the final held-out loss.
Seconds are wall time and this process's CPU time (user + system, which neighbours on a
shared machine barely inflate); ratios are taken within a round and the summary gives
medians. Arms run in fresh processes, interleaved, every other round reversed.

    python bench/time_to_quality.py                                  # the issue's arms (+ bf16 ones), 1 round
    python bench/time_to_quality.py --arm adamw-cosine --arm muon-wsd --arm "mine=optim=muon,optim.muon_lr=4e-3"
    python bench/time_to_quality.py --tiny --steps 4 --eval-every 2  # the CI-sized run
    python bench/time_to_quality.py --isa avx2 --arm default      # as an AVX2-only CPU would run it

--isa avx2 caps the arms' kernels at AVX2 (ATen's, MKL's and oneDNN's), which makes an AVX512
machine stand in for one without AVX512 or native bf16: fp32 matmuls lose their AVX512 FMAs and
bf16 matmul becomes emulated, so Muon's Newton-Schulz runs in fp32 there, as gptlab chooses on
such a CPU.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common import (ISA_ENV, RESULT, add_json_option, as_overrides, cap_isa, compose, gptlab_run, print_result,
                    split_overrides, write_json)
from gptlab.distributed import cpu_threads_per_process, fast_cpu_precision
from train_vs_trainer import WAR_AND_PEACE, make_trainer

SHAPE = {"model.n_layer": 4, "model.n_head": 4, "model.n_embd": 256, "model.n_positions": 256,
         "data.block_size": 256, "trainer.micro_batch_size": 8, "trainer.grad_accum": 1,
         "tokenizer.vocab_size": 8192, "seed": 1337}
# --tiny: the same work on a 2-layer, 32-wide model, for the CI-sized run.
TINY = {**SHAPE, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.n_positions": 64,
        "data.block_size": 64, "trainer.micro_batch_size": 4, "tokenizer.vocab_size": 512}
# The Trainer arm's recipe (everything else is a GPT2Config or TrainingArguments default).
TRAINER = {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 30, "weight_decay": 0.1,
           "max_grad_norm": 1.0}
# gptlab arms: name -> Hydra overrides on top of conf/ (each names its optimizer and schedule,
# so an arm keeps its meaning when the defaults change). `default` is whatever conf/ says.
ADAMW, COSINE = ["optim=adamw"], ["scheduler=cosine"]
# Muon and WSD as they were when these arms were first run (lr 1e-3, betas 0.9/0.95, Q, K and V
# orthogonalised as one matrix, 30 warmup steps)
FIRST_MUON = ["optim=muon", "optim.betas=[0.9,0.95]", "optim.muon_split_qkv=false"]
MUON, WSD, BF16 = FIRST_MUON + ["optim.lr=1e-3"], ["scheduler=wsd", "scheduler.warmup_steps=30"], ["trainer.mixed_precision=bf16"]
MW = ["optim.momentum_warmup_steps=100"]
BATCH_WARMUP = ["trainer.batch_warmup_steps=100", "trainer.batch_warmup_micro=4"]
ARMS = {
    "default": [],
    "adamw-cosine": ADAMW + COSINE,  # the default before Muon + WSD: AdamW 0.9/0.95, cosine to 1e-4
    "adamw-wsd": ADAMW + WSD,
    "adamw-wsd-sqrt": ADAMW + WSD + ["scheduler.decay=sqrt"],
    "adamw-lr2e-3": ADAMW + COSINE + ["optim.lr=2e-3"],
    "adamw-lr3e-3": ADAMW + COSINE + ["optim.lr=3e-3"],
    "muon-cosine": MUON + COSINE,
    "muon-wsd": MUON + WSD,
    "muon-wsd-4e-3": MUON + WSD + ["optim.muon_lr=4e-3"],
    "muon-wsd-8e-3": MUON + WSD + ["optim.muon_lr=8e-3"],
    # issue 28's candidates, each on the default recipe; each keeps a plain GPT2LMHeadModel
    "zero-proj": MUON + WSD + ["model.zero_init_proj=true"],
    "untied": MUON + WSD + ["model.tie_embeddings=false"],
    "relu2": MUON + WSD + ["model.activation=relu2"],
    "momentum-warmup": MUON + WSD + MW,
    "ema-0.95": MUON + WSD + ["trainer.ema_decay=0.95"],
    # the two that won their first round, together
    "untied-momentum-warmup": MUON + WSD + ["model.tie_embeddings=false"] + MW,
    "ema-0.98": MUON + WSD + ["trainer.ema_decay=0.98"],
    # this session's: a higher AdamW lr (embeddings, head, norms), a shorter LR warmup, cheaper first steps
    "lr3e-3-warmup10": MUON + WSD + MW + ["optim.lr=3e-3", "scheduler.warmup_steps=10"],
    "fast": MUON + WSD + MW + ["optim.lr=3e-3", "scheduler.warmup_steps=10", "optim.muon_lr=4e-3"] + BATCH_WARMUP,
    "fast-warmup30": MUON + WSD + MW + ["optim.lr=3e-3", "optim.muon_lr=4e-3"] + BATCH_WARMUP,
    # issue 28's fifth round: the default recipe on transformers' rotary architectures (model.arch)
    "llama-untied": FIRST_MUON + ["scheduler=wsd", "model.arch=llama", "model.tie_embeddings=false"],
    "qwen3": FIRST_MUON + ["scheduler=wsd", "model.arch=qwen3"],
    "qwen3-untied": FIRST_MUON + ["scheduler=wsd", "model.arch=qwen3", "model.tie_embeddings=false"],
    # bf16 autocast: native on a CPU with AVX512-BF16 or AMX (emulated, and refused here, elsewhere)
    "adamw-cosine-bf16": ADAMW + COSINE + BF16,
    "muon-wsd-bf16": MUON + WSD + BF16,
    "muon-wsd-4e-3-bf16": MUON + WSD + ["optim.muon_lr=4e-3"] + BF16,
}
# `trainer` sets L*; `trainer-bf16` is the same Trainer under bf16 autocast (TrainingArguments(bf16=True)),
# so a bf16 gptlab arm has a like-for-like Trainer to face.
TRAINER_ARMS = ("trainer", "trainer-bf16")
DEFAULT_ARMS = ["adamw-cosine", "adamw-wsd", "adamw-lr2e-3", "muon-cosine", "muon-wsd"]
BF16_ARMS = ["trainer-bf16", "adamw-cosine-bf16", "muon-wsd-bf16"]


def split_text(text: Path, out_dir: Path) -> tuple:
    """(train, held-out) files: the first 90% of the bytes up to the last line end, and the rest."""
    data = text.read_bytes()
    cut = data.rindex(b"\n", 0, int(len(data) * 0.9)) + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.txt", out_dir / "heldout.txt"
    for path, part in zip(paths, (data[:cut], data[cut:])):
        if not path.is_file() or path.read_bytes() != part:  # the token cache is keyed on the files
            path.write_bytes(part)
    return paths


def shape(args) -> dict:
    return TINY if args.tiny else SHAPE


def data_overrides(args) -> list:
    train, held = split_text(Path(args.text), Path(args.cache_dir).expanduser() / "time_to_quality" /
                             Path(args.text).stem)
    # A line (the novel's paragraph) is one document, as in train_vs_trainer.py.
    return ["data=text", f"data.files=[{json.dumps(str(train))}]", f"data.valid_files=[{json.dumps(str(held))}]",
            "data.text_unit=line", *as_overrides(shape(args))]


def load_data(args):
    from gptlab.data.prepare import prepare

    return prepare(compose(data_overrides(args)), Path(args.cache_dir).expanduser(), show_progress=not args.worker)


def held_out_loss(model, data, batch_size: int, bf16: bool) -> float:
    """gptlab's own evaluate() on the whole held-out split, for a model trained anywhere; bf16:
    under the autocast gptlab's bf16 arms evaluate with (Accelerator(mixed_precision="bf16"))."""
    from gptlab.evaluate import evaluate

    autocast = (lambda: torch.autocast(model.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    one_process = SimpleNamespace(device=model.device, num_processes=1, process_index=0,
                                  reduce=lambda t, reduction: t, autocast=autocast)
    return evaluate(model, data.valid, batch_size, one_process)["eval/loss"]


# --- the arms, each in its own process ---

def run_trainer(args, bf16: bool = False) -> dict:
    """The Trainer's run, with the held-out loss every eval_every steps (its time left out, as
    for gptlab's arms). bf16: TrainingArguments(bf16=True), autocast on a CPU that has it."""
    from transformers import TrainerCallback

    data, sh = load_data(args), shape(args)
    batch = sh["trainer.micro_batch_size"]
    curve, spent, threads = [], {"wall": 0.0, "cpu": 0.0}, set()

    class Clocked(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            self.since = time.perf_counter(), time.process_time()

        def on_step_end(self, targs, state, control, model=None, **kw):
            spent["wall"] += time.perf_counter() - self.since[0]
            spent["cpu"] += time.process_time() - self.since[1]
            threads.add(torch.get_num_threads())
            if state.global_step % args.eval_every == 0:
                curve.append({"step": state.global_step, "train_s": spent["wall"], "train_cpu_s": spent["cpu"],
                              "eval_loss": held_out_loss(model, data, batch, bf16)})
            self.since = time.perf_counter(), time.process_time()

    model_kw = {"n_positions": sh["model.n_positions"], "n_embd": sh["model.n_embd"], "n_layer": sh["model.n_layer"],
                "n_head": sh["model.n_head"]}
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(data, sh["data.block_size"], args.steps, out, model_kw, dict(
            per_device_train_batch_size=batch, logging_steps=args.eval_every, seed=sh["seed"], bf16=bf16,
            **TRAINER), [Clocked()])
        trainer.train()
    tokens = batch * sh["data.block_size"] * args.steps
    return {"curve": curve, "train_s": spent["wall"], "train_cpu_s": spent["cpu"],
            "tokens_per_s": tokens / spent["wall"], "final_loss": curve[-1]["eval_loss"], "threads": sorted(threads)}


def run_gptlab_arm(args, overrides: list) -> dict:
    """Held-out loss every eval_every steps, against training time with evaluation left out."""
    marks, threads = [], set()  # (step, what, wall, cpu, eval loss)

    def on_log(metrics, step):
        what = "start" if metrics is None else "eval" if "eval/loss" in metrics else "train"
        # an arm with a weight average is judged by it: those are the weights it exports
        metrics = metrics or {}
        marks.append((step, what, time.perf_counter(), time.process_time(),
                      metrics.get("eval/ema_loss", metrics.get("eval/loss"))))
        threads.add(torch.get_num_threads())

    sh = shape(args)
    # the arm's overrides come after --steps: an arm may size its own run (trainer.max_steps)
    cfg, _ = gptlab_run(load_data(args), [
        *data_overrides(args), f"trainer.cpu_threads={args.threads}", f"trainer.max_steps={args.steps}", *overrides,
        f"trainer.eval_every={args.eval_every}", f"trainer.log_every={args.eval_every}", "trainer.save_every=0",
        "trainer.sample_prompts=[]"], on_log)
    # Training time runs from the start (or the end of an evaluation) to the next train log,
    # which the loop writes right before it evaluates at the same step.
    curve, wall, cpu, since = [], 0.0, 0.0, marks[0]
    for mark in marks[1:]:
        if mark[1] == "train":
            wall, cpu = wall + mark[2] - since[2], cpu + mark[3] - since[3]
        elif mark[1] == "eval":
            curve.append({"step": mark[0], "train_s": wall, "train_cpu_s": cpu, "eval_loss": mark[4]})
            since = mark
    tc = cfg.trainer
    warm = min(tc.batch_warmup_steps, tc.max_steps)  # steps that read batch_warmup_micro of each micro batch
    tokens = (tc.micro_batch_size * (tc.max_steps - warm) + (tc.batch_warmup_micro or 0) * warm) * sh["data.block_size"]
    return {"curve": curve, "train_s": wall, "train_cpu_s": cpu, "tokens_per_s": tokens / wall,
            "final_loss": curve[-1]["eval_loss"], "threads": sorted(threads), "max_steps": cfg.trainer.max_steps,
            "mixed_precision": cfg.trainer.mixed_precision, "optimizer": cfg.optim.name}


def worker(args) -> None:
    cap_isa(args.isa)
    torch.set_num_threads(args.threads)  # the Trainer's; gptlab's run() sets trainer.cpu_threads
    name = args.worker
    res = (run_trainer(args, bf16=name == "trainer-bf16") if name in TRAINER_ARMS
           else run_gptlab_arm(args, arm_overrides(name)))
    print_result({**res, "cpu_capability": torch.backends.cpu.get_cpu_capability()})


def arm_overrides(arm: str) -> list:
    name, _, extra = arm.partition("=")
    return ARMS[name] if not extra else split_overrides(extra)


# --- the driver ---

def spawn(arm: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", arm, "--text", args.text, "--cache-dir", str(args.cache_dir),
           "--steps", str(args.steps), "--eval-every", str(args.eval_every), *(["--tiny"] if args.tiny else []),
           "--threads", str(args.threads), *(["--isa", args.isa] if args.isa else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.exit(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def time_to(target: float, run: dict) -> dict:
    """The first evaluation at or below `target`: its step and training seconds (None if never)."""
    hit = next((p for p in run["curve"] if p["eval_loss"] <= target), None)
    return hit or {"step": None, "train_s": None, "train_cpu_s": None}


def load() -> str:
    return os.getloadavg().__repr__() if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", action="append", help=f"trainer, trainer-bf16, a gptlab arm: one of {', '.join(ARMS)}, "
                   f"or NAME=override,... (default: {' '.join(DEFAULT_ARMS)}, and {' '.join(BF16_ARMS)} where bf16 "
                   "is native); `trainer` runs first unless given or --no-trainer")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--text", default=str(WAR_AND_PEACE))
    p.add_argument("--cache-dir", default="~/.cache/gptlab")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide model, block 64, batch 4, vocab 512 "
                   "(the CI-sized run; a cheap full run on a loaded machine)")
    p.add_argument("--threads", type=int, help="torch threads for every arm (default: the physical cores, "
                   "gptlab's choice); 1 is steadier on a machine shared with other jobs")
    p.add_argument("--isa", choices=sorted(ISA_ENV), help="cap every arm's CPU kernels at this instruction set")
    add_json_option(p, "time_to_quality")
    p.add_argument("--no-trainer", action="store_true", help="only the gptlab arms (combine with --summarize)")
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="no runs: one table from the runs in these "
                   "--json files, the Trainer's among them (with their --steps and --eval-every)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps % args.eval_every:
        p.error("--steps must be a multiple of --eval-every")
    if args.worker:
        return worker(args)
    if not Path(args.text).is_file():
        sys.exit(f"{args.text} not found: the bench needs the shared War and Peace text (--text)")
    args.threads = args.threads or cpu_threads_per_process()
    if args.summarize:
        results = merge(args.summarize)
        return summarize(results, args.steps, args.eval_every, args.json)
    native_bf16 = (fast_cpu_precision("bf16") and not args.isa) or torch.cuda.is_available()
    arms = args.arm or DEFAULT_ARMS + (BF16_ARMS if native_bf16 else [])
    if not args.no_trainer and "trainer" not in arms:
        arms = ["trainer", *arms]
    for arm in arms:
        if arm not in TRAINER_ARMS and arm.partition("=")[0] not in ARMS and "=" not in arm:
            p.error(f"--arm {arm}: not one of trainer, trainer-bf16, {', '.join(ARMS)} and not NAME=override,...")
        if "bf16" in arm and not native_bf16:
            p.error(f"--arm {arm}: this CPU has no native bf16 matmul (emulated, far slower); leave bf16 arms out")
    load_data(args)  # the tokenizer and token cache, once; the arms find them cached
    print(f"{len(arms)} arms x {args.repeats} rounds, {args.steps} steps, held-out eval every {args.eval_every}, "
          f"{args.threads} threads; "
          f"load average {load()}", flush=True)
    results = {arm: [] for arm in arms}
    for r in range(args.repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            res = spawn(arm, args)
            if res["threads"] != [args.threads]:
                sys.exit(f"arm {arm} ran on {res['threads']} threads, not {args.threads}")
            results[arm].append(res)
            # after every arm: a long bench loses nothing to a crash or a kill
            write_json(args.json, {"threads": args.threads, "results": results})
            print(f"  round {r + 1} {arm:28s} {res['train_s']:7.1f} s training ({res['train_cpu_s']:7.1f} CPU-s) "
                  f"{res['tokens_per_s']:6.0f} tok/s  held-out loss {res['final_loss']:.4f}  load {load()}",
                  flush=True)

    if "trainer" in results:
        summarize(results, args.steps, args.eval_every, args.json)
    print(f"load average at the end {load()}")


def summarize(results: dict, steps: int, eval_every: int, json_path) -> None:
    """L* and the Trainer's seconds per round; each arm's ratio within its round (its i-th run
    against the Trainer's i-th)."""
    arms = list(results)
    repeats = len(results["trainer"])
    targets = [t["final_loss"] for t in results["trainer"]]
    target = statistics.median(targets)
    summary = {"target_loss": target, "steps": steps, "eval_every": eval_every, "arms": {}, "results": results}
    print(f"\nL* = {target:.4f} (the Trainer's held-out loss after {steps} steps; "
          f"{statistics.median(t['train_s'] for t in results['trainer']):.1f} s training); medians over "
          f"{repeats} round(s):")
    for arm in arms:
        rows, row = results[arm], {}
        row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rows)
        row["final_loss"] = statistics.median(r["final_loss"] for r in rows)
        if arm != "trainer":
            hits = [time_to(L, r) for L, r in zip(targets, rows)]
            reached = [(h, t) for h, t in zip(hits, results["trainer"]) if h["step"] is not None]
            row["reached"] = f"{len(reached)}/{len(rows)}"
            if reached:
                row["step"] = statistics.median(h["step"] for h, _ in reached)
                row["train_s_to_target"] = statistics.median(h["train_s"] for h, _ in reached)
                row["ratio"] = statistics.median(h["train_s"] / t["train_s"] for h, t in reached)
                row["cpu_ratio"] = statistics.median(h["train_cpu_s"] / t["train_cpu_s"] for h, t in reached)
        summary["arms"][arm] = row
        at = (f"L* at step {row['step']:.0f} after {row['train_s_to_target']:6.1f} s: {row['ratio']:.2f}x the "
              f"Trainer ({row['cpu_ratio']:.2f}x in CPU-s)" if "ratio" in row else
              "trainer (the target)" if arm == "trainer" else "never reached L*")
        print(f"  {arm:28s} {row['tokens_per_s']:6.0f} tok/s  final held-out {row['final_loss']:.4f}  {at}")
    write_json(json_path, summary)


def merge(paths: list) -> dict:
    """The runs of several --json files (say, arms run at the same time with --no-trainer) in one table."""
    results = {}
    for path in paths:
        for arm, runs in json.loads(Path(path).read_text())["results"].items():
            if runs:  # an arm a stopped bench never finished has none
                results.setdefault(arm, []).extend(runs)
    if "trainer" not in results:
        sys.exit("--summarize: none of the files has a trainer arm")
    return results


if __name__ == "__main__":
    main()
