"""gptlab's loop against the Hugging Face Trainer on the same work, side by side.

Same tiny GPT-2 (4 layers, 256 wide, vocab 8192, block 256, micro batch 8), the same
War and Peace tokens, the same AdamW, LR schedule, clipping and number of steps.
Each arm runs in a fresh process, interleaved A B A B, so a neighbour that loads the
machine for a while slows both arms alike; the summary gives medians.

    python bench/train_vs_trainer.py                     # 3 repeats of 60 steps
    python bench/train_vs_trainer.py --arm gptlab --arm gptlab:trainer.compile=true --arm trainer

Throughput counts the steps after the first `--warmup-steps` (allocator and thread
pool warm-up), measured by gptlab's own loop (train/tokens_per_s) and by a Trainer
callback on the same step boundaries. MFU uses gptlab.flops against the best fp32
matmul FLOP/s measured before each round.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

WAR_AND_PEACE = ROOT.parent / "shared" / "data" / "tolstoy" / "war_and_peace.txt"
RESULT = "BENCH_RESULT "
# The model and optimisation both arms share (gptlab's config names).
COMMON = {
    "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 256, "model.n_positions": 256,
    "data.block_size": 256, "trainer.micro_batch_size": 8, "trainer.grad_accum": 1,
    "trainer.max_grad_norm": 1.0, "optim.lr": 1e-3, "optim.weight_decay": 0.1, "optim.betas": [0.9, 0.95],
    "optim.eps": 1e-8, "scheduler.name": "cosine", "scheduler.warmup_steps": 10, "scheduler.min_lr": 1e-4,
    "seed": 1337,
}


# --- data: a BPE trained with gptlab's tokenizer code, the novel as one token stream, cached ---

def prepare_tokens(text_path: Path, cache_root: Path, vocab_size: int, max_chars: int | None) -> Path:
    from gptlab.data.cache import build_once, fingerprint
    from gptlab.data.pack import write_token_stream
    from gptlab.tokenizer import train_bpe

    st = text_path.stat()
    key = fingerprint({"text": [str(text_path), st.st_size, st.st_mtime_ns], "vocab": vocab_size, "chars": max_chars})

    def build(tmp: Path) -> dict:
        text = text_path.read_text(encoding="utf-8")[:max_chars]
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        tok = train_bpe(paragraphs, vocab_size, 2, ["<|endoftext|>"], length=len(paragraphs))
        tok.save_pretrained(str(tmp / "tokenizer"))
        # The last 1% of paragraphs is the validation split gptlab's loop evaluates at its end.
        n_valid = max(1, len(paragraphs) // 100)
        info = {"vocab_size": len(tok)}
        for split, docs in (("train", paragraphs[:-n_valid]), ("valid", paragraphs[-n_valid:])):
            info[split] = write_token_stream(docs, tok, tmp / f"{split}.bin", desc=f"tokenize {split}")
        return info

    return build_once(cache_root / "bench" / key, build, is_builder=True)


def load_data(cache: Path, block_size: int):
    from gptlab.data.blocks import TokenBlocks
    from gptlab.data.prepare import Prepared
    from gptlab.tokenizer import load_tokenizer

    info = json.loads((cache / "ready.json").read_text())
    return Prepared(load_tokenizer(cache / "tokenizer"),
                    TokenBlocks(cache / "train.bin", info["train"]["dtype"], block_size),
                    TokenBlocks(cache / "valid.bin", info["valid"]["dtype"], block_size),
                    {**info, "cache_dir": str(cache)})


def compose(extra=()):
    """gptlab's real config, composed through Hydra as train.py composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from gptlab.config import register_configs

    register_configs()
    common = [f"{k}={json.dumps(v)}" for k, v in COMMON.items()]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*common, *extra])


# --- arm A: gptlab's real run(): accelerator, model, optimizer, loop, export ---

def run_gptlab(args, extra: list) -> dict:
    import gptlab.run as gptlab_run

    data = load_data(Path(args.data), COMMON["data.block_size"])
    # run() is used as is; only its data stage is pointed at the novel's cached tokens.
    gptlab_run.prepare = lambda cfg, *a, **k: data
    steps, warm = args.steps, args.warmup_steps
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose([f"run_dir={run_dir}", f"trainer.max_steps={steps}",
                       f"trainer.log_every={warm}", f"trainer.eval_every={10 ** 9}",
                       "trainer.sample_max_new_tokens=1", "logger.tensorboard=false", *extra])
        gptlab_run.run(cfg)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "train/tokens_per_s" in r and r["step"] > warm]
    tokens_per_step = COMMON["trainer.micro_batch_size"] * COMMON["data.block_size"]
    # Windows of `warm` steps: total tokens over total time, not a mean of rates.
    seconds = sum(tokens_per_step * warm / r["train/tokens_per_s"] for r in rows)
    return {"tokens_per_s": tokens_per_step * (steps - warm) / seconds,
            "logged_mfu": statistics.median(r["train/mfu"] for r in rows),
            "final_loss": rows[-1]["train/loss"]}


# --- arm B: the Trainer with default_data_collator, as the seeds use it (run_clm style) ---

def run_trainer(args, extra: list) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from gptlab.model import build_model

    cfg = compose()
    data = load_data(Path(args.data), cfg.data.block_size)
    T = cfg.data.block_size
    ids = np.asarray(data.train.tokens[: len(data.train) * T], dtype=np.int64).reshape(-1, T).tolist()
    # group_texts in run_clm: labels are a copy of input_ids; the model shifts them.
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * T] * len(ids), "labels": ids})
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.tokenizer, T)

    class StepClock(TrainerCallback):
        times = {}

        def on_step_end(self, targs, state, control, **kw):
            self.times[state.global_step] = time.perf_counter()

    steps, warm = args.steps, args.warmup_steps
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.trainer.micro_batch_size, max_steps=steps,
            learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0],
            adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.trainer.max_grad_norm,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": cfg.scheduler.min_lr},
            warmup_steps=cfg.scheduler.warmup_steps, logging_steps=warm, save_strategy="no", eval_strategy="no",
            report_to=[], seed=cfg.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
            dataloader_drop_last=True)
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=default_data_collator,
                          callbacks=[StepClock()])
        trainer.train()
    tokens = cfg.trainer.micro_batch_size * T * (steps - warm)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / (StepClock.times[steps] - StepClock.times[warm]),
            "optimizer": targs.optim.value, "final_loss": losses[-1]}


# --- the driver ---

def worker(args) -> None:
    kind, _, extra = args.worker.partition(":")
    extra = [e for e in extra.split(",") if e]
    result = run_gptlab(args, extra) if kind == "gptlab" else run_trainer(args, extra)
    print(RESULT + json.dumps(result), flush=True)


def spawn(arm: str, args, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", arm, "--data", str(data), "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.exit(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def flops_per_token(data: Path) -> float:
    from gptlab.flops import model_flops_per_token
    from gptlab.model import build_model

    cfg = compose()
    model = build_model(cfg.model, load_data(data, cfg.data.block_size).tokenizer, cfg.data.block_size)
    return model_flops_per_token(model, cfg.data.block_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", action="append", help="gptlab[:hydra.override,...] or trainer; "
                   "default: gptlab and trainer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=10, help="steps not timed; also the log interval")
    p.add_argument("--text", default=str(WAR_AND_PEACE))
    p.add_argument("--cache-dir", default="~/.cache/gptlab")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-chars", type=int, default=None, help="use only the novel's first N characters")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps % args.warmup_steps or args.steps <= args.warmup_steps:
        p.error("--steps must be a larger multiple of --warmup-steps")
    if args.worker:
        return worker(args)
    if not Path(args.text).is_file():
        sys.exit(f"{args.text} not found: the bench needs the shared War and Peace text (--text)")

    import torch
    from gptlab.flops import measured_matmul_flops

    arms = args.arm or ["gptlab", "trainer"]
    data = prepare_tokens(Path(args.text), Path(args.cache_dir).expanduser(), args.vocab_size, args.max_chars)
    fpt = flops_per_token(data)
    print(f"{len(arms)} arms x {args.repeats} repeats, {args.steps} steps ({args.warmup_steps} untimed), "
          f"{torch.get_num_threads()} threads, {fpt / 1e6:.1f} MFLOPs per token", flush=True)
    results = {arm: [] for arm in arms}
    peaks = []
    for r in range(args.repeats):
        measured_matmul_flops.cache_clear()
        peaks.append(measured_matmul_flops("cpu", budget_s=1.0))
        print(f"round {r + 1}: fp32 matmul peak {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
        for arm in arms:
            res = spawn(arm, args, data)
            results[arm].append(res)
            print(f"  {arm:40s} {res['tokens_per_s']:8.0f} tok/s  MFU {res['tokens_per_s'] * fpt / peaks[-1]:.1%}"
                  f"  loss {res['final_loss']:.3f}", flush=True)

    peak = statistics.median(peaks)
    summary = {"peak_flops": peak, "flops_per_token": fpt, "arms": {}}
    print(f"\nmedians over {args.repeats} rounds (peak {peak / 1e9:.1f} GFLOP/s):")
    for arm, rows in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        summary["arms"][arm] = {"tokens_per_s": tps, "mfu": tps * fpt / peak, "runs": rows}
        print(f"  {arm:40s} {tps:8.0f} tok/s  MFU {tps * fpt / peak:.1%}")
    if "trainer" in results:
        base = summary["arms"]["trainer"]["tokens_per_s"]
        for arm in arms:
            if arm != "trainer":
                ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results[arm], results["trainer"])]
                summary["arms"][arm]["ratio_vs_trainer"] = statistics.median(ratios)
                print(f"  {arm} / trainer: {summary['arms'][arm]['tokens_per_s'] / base:.2f}x "
                      f"(median of per-round ratios {statistics.median(ratios):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
