"""Validation loss, perplexity and bits per byte, exact for any number of processes.

    python -m gptlab.evaluate outputs/tolstoy_scratch/<timestamp>/final [data overrides]
"""
import argparse
import json
import logging
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

import torch
from torch.distributed.fsdp import FSDPModule

from .data.blocks import IGNORE_INDEX, eval_batches, to_device
from .model import token_losses


@torch.no_grad()
def evaluate(model, blocks, batch_size: int, accelerator, max_blocks: int | None = None) -> dict:
    """Mean next-token CE over every target of every validation block (or sample), or of the
    first `max_blocks` of them.

    Each rank scores a disjoint strided share; float64 sums are added across ranks,
    so no block counts twice and none is padded in. `eval/sample_loss` is the mean of
    each sample's (block's) own mean loss, as seed 003 reports its test loss.
    `eval/bpb`, where the blocks know their tokens' bytes: the loss in bits per UTF-8 byte of
    the text the targets stand for (special tokens, which stand for none, left out of both
    sums, as nanochat counts it), comparable across tokenizers.
    """
    was_training = model.training
    model.eval()
    # (loss sum, targets, sum of per-sample means, samples, loss sum over text targets, their bytes)
    total = torch.zeros(6, dtype=torch.float64, device=accelerator.device)
    nbytes_of = getattr(blocks, "token_bytes", None)  # duck-typed blocks may not know their bytes
    token_bytes = None if nbytes_of is None else torch.as_tensor(nbytes_of, device=accelerator.device)
    n_blocks = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    batches = eval_batches(n_blocks, batch_size, accelerator.num_processes, accelerator.process_index)
    for ids in batches:
        x = to_device(blocks.batch(ids), accelerator.device)
        with accelerator.autocast():  # as in training: the same precision, and the LM head chunked
            ce = token_losses(model, x).double()  # (B, T-1), 0 at padding
        n = (x[:, 1:] != IGNORE_INDEX).sum(dim=1)
        total[0] += ce.sum()
        total[1] += n.sum()
        total[2] += (ce.sum(dim=1) / n.clamp_min(1)).sum()
        total[3] += (n > 0).sum()
        if token_bytes is not None:
            nbytes = token_bytes[x[:, 1:].clamp_min(0)] * (x[:, 1:] != IGNORE_INDEX)
            total[4] += (ce * (nbytes > 0)).sum()
            total[5] += nbytes.sum()
    if isinstance(model, FSDPModule):
        # Every forward of a sharded model gathers weights from all ranks: a rank with fewer
        # batches joins the others' last ones with uncounted forwards.
        most = len(eval_batches(n_blocks, batch_size, accelerator.num_processes, 0))
        for _ in range(most - len(batches)):
            token_losses(model, blocks.batch(eval_batches(n_blocks, batch_size, 1, 0)[0]).to(accelerator.device))
        model.reshard()  # a forward without a backward leaves the root's weights gathered
    total = accelerator.reduce(total, reduction="sum").tolist()
    model.train(was_training)
    loss = total[0] / total[1]
    metrics = {"eval/loss": loss, "eval/perplexity": perplexity(loss), "eval/tokens": int(total[1]),
               "eval/sample_loss": total[2] / total[3]}
    if token_bytes is not None and total[5] > 0:
        metrics.update({"eval/bpb": total[4] / math.log(2) / total[5], "eval/bytes": int(total[5])})
    return metrics


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ---- python -m gptlab.evaluate ------------------------------------------------------

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from .config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def eval_config(run_cfg, overrides: list[str], tokenizer_dir, n_positions: int | None = None):
    """The defaults plus `overrides`, except that a model from a gptlab run starts from that
    run's data config and cache dir (so no overrides means its own validation split).

    What must match the model comes from the model unless an override says otherwise,
    even when `data=GROUP` swaps in a group's defaults: the tokenizer always, and
    `data.block_size` (the run's, or a foreign model's positions).
    """
    cfg = compose_config(overrides)
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    if run_cfg is not None:
        if "data" not in given:  # no other data group chosen: the run's data, then any data.KEY=VALUE
            dotted = OmegaConf.from_dotlist([o for o in overrides if o.startswith("data.")])
            cfg.data = OmegaConf.merge(cfg.data, run_cfg.data, dotted.get("data", {}))
        if "cache_dir" not in given:
            cfg.cache_dir = run_cfg.cache_dir
    if "data.block_size" not in given:
        block_size = run_cfg.data.block_size if run_cfg is not None else n_positions
        if block_size is not None:
            cfg.data.block_size = block_size
    cfg.tokenizer.path = str(tokenizer_dir)
    return cfg


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m gptlab.evaluate",
        description="Token-weighted loss and perplexity of a trained model on a corpus. The corpus is "
                    "the data config of the run the model came from, changed by Hydra overrides "
                    "(data=... data.KEY=...); the model's own tokenizer is always used.")
    ap.add_argument("path", help="an HF export, a run dir, a checkpoint dir or a Hub id (through the HF cache)")
    ap.add_argument("--revision", help="of a Hub id: a branch, tag or commit")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the data, e.g. data.block_size=128")
    ap.add_argument("--split", choices=("valid", "train"), default="valid")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_blocks", type=int, help="score only the split's first N blocks (or samples): a quick "
                    "estimate of a large split (default: all of them)")
    ap.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                    help="multiple-choice tasks to score too: next_line (from the split) or HellaSwag-layout "
                         "JSON-lines files; prints acc and acc_norm for each")
    ap.add_argument("--tasks_limit", type=int, help="score only each task's first N items (next_line: N drawn; "
                    "default: tasks.limit, as the run scored them)")
    ap.add_argument("--output", help="also write the JSON result to this file")
    args = ap.parse_args(argv)
    if args.max_blocks is not None and args.max_blocks < 1:
        ap.error(f"--max_blocks={args.max_blocks}: score at least 1 block")
    from .choices import accuracy, check_task_names, documents, load_tasks
    from .errors import GptlabError

    try:
        check_task_names(args.tasks)
    except GptlabError as e:
        ap.error(str(e))

    from .data.prepare import prepare
    from .distributed import make_accelerator
    from .model import max_positions
    from .trained import load_trained

    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(name)s] %(message)s")
    trained = load_trained(args.path, revision=args.revision)
    n_pos = max_positions(trained.model.config)
    cfg = eval_config(trained.run_cfg, list(args.overrides), trained.tokenizer_dir, n_pos)
    if n_pos is not None and cfg.data.block_size > n_pos:
        sys.exit(f"data.block_size={cfg.data.block_size} exceeds the model's {n_pos} positions")

    accelerator = make_accelerator(cfg.trainer)
    data = prepare(cfg, Path(cfg.cache_dir).expanduser(), is_builder=accelerator.is_local_main_process,
                   show_progress=accelerator.is_main_process)
    blocks = data.valid if args.split == "valid" else data.train
    model = trained.model.to(accelerator.device)
    metrics = evaluate(model, blocks, args.batch_size, accelerator, args.max_blocks)
    limit = args.tasks_limit or cfg.tasks.limit
    for task in load_tasks(args.tasks, limit, lambda: documents(blocks, data.tokenizer), cfg.seed):
        metrics.update(accuracy(model, data.tokenizer, task, args.batch_size, accelerator, cfg.data.block_size))
    accuracies = {k[len("eval/"):]: v for k, v in metrics.items() if k.endswith(("/acc", "/acc_norm"))}
    scored = len(blocks) if args.max_blocks is None else min(args.max_blocks, len(blocks))
    result = {"model": str(trained.source), "split": args.split, "loss": metrics["eval/loss"],
              "perplexity": metrics["eval/perplexity"], "bpb": metrics.get("eval/bpb"), "tokens": metrics["eval/tokens"],
              "bytes": metrics.get("eval/bytes"),
              "blocks": scored, "of_blocks": len(blocks), "block_size": cfg.data.block_size,
              **accuracies,
              "data": OmegaConf.to_container(cfg.data)}
    if accelerator.is_main_process:
        print(f"{args.split}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
              f"{result['bpb']:.4f} bits per byte over {result['tokens']} tokens of {scored}/{len(blocks)} blocks "
              f"({result['model']})" + "".join(f"; {k} {v:.3f}" for k, v in accuracies.items()),
              file=sys.stderr)
        text = json.dumps(result, ensure_ascii=False)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
