"""Multiple-choice accuracy, HellaSwag-style: a context and N endings; the model scores each ending
by the log-probabilities of its tokens given the context, and an item is right where the right
ending scores best: by their sum (`acc`) and by their mean per token (`acc_norm`).

A task is a JSON-lines file in HellaSwag's layout (`{"ctx": ..., "endings": [...], "label": i}`),
a Hub dataset with those fields (`hf:ORG/NAME` or `hf:ORG/NAME:SPLIT`, default split validation,
through the HF cache as any Hub id), or `next_line`: built from the run's own validation split,
which any corpus has. Its items are a
line of a validation document after the lines before it (at most 8), against three lines of
other validation documents: on the embedded Python corpus, which line of code comes next. Chance
is 1/4; a model that learned the corpus's syntax and names beats it.

Every process scores a disjoint strided share of the items and the counts are summed, so each
item counts once on any number of processes.
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule

from .data.blocks import IGNORE_INDEX
from .errors import ConfigError
from .model import token_losses

log = logging.getLogger(__name__)

NEXT_LINE = "next_line"
HUB_PREFIX = "hf:"
CONTEXT_LINES, ENDINGS, MIN_LINE_CHARS = 4, 4, 8


@dataclass
class Item:
    ctx: str
    endings: list
    label: int


@dataclass
class Task:
    name: str
    items: list


def next_line_items(texts: list, n: int, seed: int) -> list:
    """Up to `n` items from documents' lines: the real next line against ENDINGS - 1 other lines,
    drawn from anywhere in the documents but the context's neighbourhood."""
    docs = [t.split("\n") for t in texts]
    places = [(d, i) for d, lines in enumerate(docs) for i, line in enumerate(lines) if len(line.strip()) >= MIN_LINE_CHARS]
    if len({docs[d][i] for d, i in places}) < 2 * ENDINGS:
        return []
    rng = np.random.default_rng(seed)
    items = []
    for k in sorted(rng.choice(len(places), size=min(n, len(places)), replace=False)):
        d, i = places[k]
        if i == 0:
            continue  # no context
        right, wrong = docs[d][i], []
        while len(wrong) < ENDINGS - 1:
            od, oi = places[int(rng.integers(len(places)))]
            line = docs[od][oi]
            if (od != d or abs(oi - i) > CONTEXT_LINES) and line != right and line not in wrong:
                wrong.append(line)
        label = int(rng.integers(ENDINGS))
        items.append(Item("\n".join(docs[d][max(0, i - CONTEXT_LINES):i]) + "\n",
                          [*wrong[:label], right, *wrong[label:]], label))
    return items


def documents(blocks, tokenizer, max_tokens: int = 2_000_000) -> list:
    """A split's documents as text, from its first `max_tokens` tokens: its samples (pack=sample),
    or the stream cut at each EOS (a chunked stream has none: one document)."""
    ids = np.asarray(blocks.tokens[:max_tokens])
    offsets = getattr(blocks, "offsets", None)
    cuts = offsets[1:][offsets[1:] <= len(ids)] if offsets is not None else np.flatnonzero(ids == tokenizer.eos_token_id)
    starts = [0, *(cuts if offsets is not None else cuts + 1)]
    return [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(starts, [*cuts, len(ids)]) if b > a]


def _item(row: dict, where: str) -> Item:
    try:
        # As HellaSwag is scored (lm-eval, build-nanogpt): an ending follows its context after a space.
        space = "" if row["ctx"][-1:].isspace() else " "
        item = Item(row["ctx"], [e if e[:1].isspace() else space + e for e in row["endings"]], int(row["label"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"tasks.names: {where} is not a HellaSwag-layout item "
                          f"({{\"ctx\", \"endings\", \"label\"}}): {e}") from None
    if not 0 <= item.label < len(item.endings):
        raise ConfigError(f"tasks.names: {where}: label {item.label} is not one of its {len(item.endings)} endings")
    return item


def _json(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None  # _item names the line


def read_jsonl_items(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [_item(_json(line), f"{path} line {n}") for n, line in enumerate(f, 1) if line.strip()]


def read_hub_items(spec: str) -> list:
    """hf:ORG/NAME[:SPLIT]: a Hub dataset's rows, from the HF cache (downloaded first where online)."""
    import datasets

    from .hub import resolve

    repo, _, split = spec[len(HUB_PREFIX):].partition(":")
    snapshot = resolve(repo, None, key="tasks.names", repo_type="dataset")
    rows = datasets.load_dataset(str(snapshot.path), split=split or "validation")
    return [_item(row, f"{spec} row {n}") for n, row in enumerate(rows)]


def check_task_names(names) -> None:
    """Before step 1: each task is next_line, hf:ORG/NAME[:SPLIT] or a JSON-lines file that exists."""
    for name in names:
        if name != NEXT_LINE and not name.startswith(HUB_PREFIX) and not Path(name).expanduser().is_file():
            raise ConfigError(f"tasks.names: {name!r} is neither {NEXT_LINE}, hf:ORG/NAME nor a JSON-lines file")


def load_tasks(names, limit: int | None, valid_texts, seed: int) -> list:
    """The configured tasks, each cut to its first `limit` items (next_line: `limit` drawn by `seed`)."""
    tasks = []
    for name in names:
        if name == NEXT_LINE:
            items, task_name = next_line_items(list(valid_texts()), limit or 1000, seed), NEXT_LINE
        elif name.startswith(HUB_PREFIX):  # named as its dataset: hf:Rowan/hellaswag -> hellaswag
            items, task_name = read_hub_items(name)[:limit], name[len(HUB_PREFIX):].split(":")[0].split("/")[-1]
        else:
            items, task_name = read_jsonl_items(Path(name).expanduser())[:limit], Path(name).stem
        if items:
            tasks.append(Task(task_name, items))
        else:
            log.warning("tasks.names: %s has no items here (next_line needs %d distinct lines of %d+ characters "
                        "in the validation split); not scored", name, 2 * ENDINGS, MIN_LINE_CHARS)
    return tasks


def _rows(tokenizer, items, max_len: int):
    """(item, ending, ids, ending start) for every ending; contexts cut from the left to fit max_len."""
    rows = []
    for k, item in enumerate(items):
        ctx = tokenizer(item.ctx, add_special_tokens=False)["input_ids"]
        for e, ending in enumerate(item.endings):
            end = tokenizer(ending, add_special_tokens=False)["input_ids"][:max_len - 1]
            keep = ctx[max(0, len(ctx) - (max_len - len(end))):] or [tokenizer.eos_token_id]
            rows.append((k, e, keep + end, len(keep)))
    return rows


@torch.no_grad()
def ending_scores(model, tokenizer, items, batch_size: int, accelerator, max_len: int) -> list:
    """Per item, per ending: (sum, mean) of the ending tokens' log-probabilities given the context,
    one row per ending, `batch_size` rows a forward."""
    rows = _rows(tokenizer, items, max_len)
    scores = [[None] * len(item.endings) for item in items]
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        labels = torch.full((len(batch), max(len(r[2]) for r in batch)), IGNORE_INDEX, dtype=torch.long)
        for j, (_, _, ids, _) in enumerate(batch):
            labels[j, :len(ids)] = torch.tensor(ids)
        with accelerator.autocast():
            ce = token_losses(model, labels.to(accelerator.device)).double().tolist()  # ce[j][p]: token p + 1
        for j, (k, e, ids, start) in enumerate(batch):
            logp = [-c for c in ce[j][start - 1:len(ids) - 1]]
            scores[k][e] = (sum(logp), sum(logp) / len(logp))
    return scores


def accuracy(model, tokenizer, task: Task, batch_size: int, accelerator, max_len: int) -> dict:
    """eval/<task>/acc and acc_norm over every item, each scored on one process."""
    was_training = model.training
    model.eval()
    world = accelerator.num_processes
    mine = task.items[accelerator.process_index::world]
    scores = ending_scores(model, tokenizer, mine, batch_size, accelerator, max_len)
    if isinstance(model, FSDPModule):  # every forward gathers weights from all ranks: as many on each
        def forwards(items):  # ending_scores' batches: one row per ending
            return -(-sum(len(item.endings) for item in items) // batch_size)

        idle = torch.full((1, 2), tokenizer.eos_token_id, device=accelerator.device)
        for _ in range(max(forwards(task.items[r::world]) for r in range(world)) - forwards(mine)):
            token_losses(model, idle)  # one uncounted forward, as the busiest rank's batch
        model.reshard()
    by_sum = sum(max(range(len(s)), key=lambda e: s[e][0]) == item.label for item, s in zip(mine, scores))
    by_mean = sum(max(range(len(s)), key=lambda e: s[e][1]) == item.label for item, s in zip(mine, scores))
    right = torch.tensor([by_sum, by_mean, len(mine)], dtype=torch.float64, device=accelerator.device)
    right = accelerator.reduce(right, reduction="sum").tolist()
    model.train(was_training)
    return {f"eval/{task.name}/acc": right[0] / right[2], f"eval/{task.name}/acc_norm": right[1] / right[2]}
