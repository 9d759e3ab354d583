"""Token-weighted validation loss and perplexity, exact for any number of processes."""
import math

import torch

from .data.blocks import eval_batches
from .loss import _token_ce


@torch.no_grad()
def evaluate(model, blocks, batch_size: int, accelerator) -> dict:
    """Mean next-token CE over every position of every validation block.

    Each rank scores a disjoint strided share; float64 sums are added across ranks,
    so no block counts twice and none is padded in.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (loss sum, tokens)
    for ids in eval_batches(len(blocks), batch_size, accelerator.num_processes, accelerator.process_index):
        x = blocks.batch(ids).to(accelerator.device, non_blocking=True)
        ce = _token_ce(model(input_ids=x).logits, x)
        total[0] += ce.double().sum()
        total[1] += ce.numel()
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    return {"eval/loss": loss, "eval/perplexity": perplexity(loss), "eval/tokens": int(total[1].item())}


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
