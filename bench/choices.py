"""Multiple-choice accuracy over a run's checkpoints, and what scoring the tasks costs the run.

    python bench/choices.py outputs/default/<timestamp>            # the default run's next_line curve
    python bench/choices.py RUN --items 400 --limit 100

Each checkpoint of RUN (and, as step 0, a fresh model of the same shape, seeded as the run
was) is scored on --items next_line items of the run's validation split (more than a run
scores, so the curve stands above the noise: ±0.02 at 400 items). The cost is the time to
score tasks.limit items (what the run does at each evaluation; median of 3) over the run's
wall time between two evaluations (from train.log).
"""
import argparse
import re
import statistics
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

from common import add_json_option, print_result, write_json


def eval_intervals(train_log: Path) -> list:
    """Seconds between consecutive `step N: eval/loss` lines of a run's log (training, saving and evaluating)."""
    stamps = [datetime.strptime(m.group(1), "%H:%M:%S") for m in
              re.finditer(r"^\[(\d\d:\d\d:\d\d) INFO gptlab.loop\] step \d+: eval/loss", train_log.read_text(), re.M)]
    return [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--items", type=int, default=400, help="next_line items per checkpoint")
    p.add_argument("--limit", type=int, default=None, help="items for the cost (default: the run's tasks.limit)")
    add_json_option(p, "choices")
    args = p.parse_args()

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from gptlab.choices import Task, accuracy, documents, next_line_items
    from gptlab.config import GptlabConfig
    from gptlab.data.prepare import prepare

    cfg = OmegaConf.merge(OmegaConf.structured(GptlabConfig), OmegaConf.load(args.run_dir / ".hydra" / "config.yaml"))
    data = prepare(cfg, Path(cfg.cache_dir).expanduser(), show_progress=False)
    tok, texts = data.tokenizer, documents(data.valid, data.tokenizer)
    one = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                          reduce=lambda t, reduction: t, autocast=nullcontext)
    batch, block = cfg.trainer.micro_batch_size, cfg.data.block_size
    task = Task("next_line", next_line_items(texts, args.items, cfg.seed))
    steps = sorted(args.run_dir.glob("checkpoints/step_*"))
    final = AutoModelForCausalLM.from_pretrained(args.run_dir / "final").eval()
    torch.manual_seed(cfg.seed)
    models = [(0, AutoModelForCausalLM.from_config(final.config).eval())]
    models += [(int(s.name.split("_")[1]), AutoModelForCausalLM.from_pretrained(s).eval()) for s in steps]
    curve = []
    for step, model in models:
        r = accuracy(model, tok, task, batch, one, block)
        curve.append({"step": step, "acc": r["eval/next_line/acc"], "acc_norm": r["eval/next_line/acc_norm"]})
        print(f"step {step:5d}: acc {curve[-1]['acc']:.3f}, acc_norm {curve[-1]['acc_norm']:.3f} "
              f"({len(task.items)} items)", flush=True)

    limit = args.limit or cfg.tasks.limit
    small = Task("next_line", next_line_items(texts, limit, cfg.seed))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        accuracy(final, tok, small, batch, one, block)
        times.append(time.perf_counter() - t)
    intervals = eval_intervals(args.run_dir / "train.log")
    cost = {"items": len(small.items), "seconds": statistics.median(times), "threads": torch.get_num_threads(),
            "eval_interval_s": statistics.median(intervals) if intervals else None}
    if cost["eval_interval_s"]:
        cost["share_of_interval"] = cost["seconds"] / cost["eval_interval_s"]
        print(f"scoring {cost['items']} items: {cost['seconds']:.2f} s, {cost['share_of_interval']:.1%} of the "
              f"{cost['eval_interval_s']:.0f} s between two evaluations", flush=True)
    summary = {"run_dir": str(args.run_dir), "items": len(task.items), "curve": curve, "cost": cost}
    print_result(summary)
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
