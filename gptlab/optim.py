"""Weight-decay parameter groups, the optimizer, and the LR schedule as a function of the step."""
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DECAYED = (nn.Linear, Conv1D)


def _is_norm(module: nn.Module) -> bool:
    # By type, not by parameter name: GPT-2 calls its norms ln_1/ln_2/ln_f, and
    # other models bring their own RMSNorm classes.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay Linear/Conv1D weights; never biases, norms or embeddings.

    A weight tied to an embedding (GPT-2's LM head) is treated as the embedding.
    Weights of other module types decay if they are matrices.
    """
    no_decay, decay = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or _is_norm(module) or isinstance(module, nn.Embedding):
                no_decay.add(id(p))
            elif isinstance(module, DECAYED) or p.ndim >= 2:
                decay.add(id(p))
            else:
                no_decay.add(id(p))
    decay -= no_decay
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    return [
        {"params": [p for i, p in params.items() if i in decay], "weight_decay": weight_decay},
        {"params": [p for i, p in params.items() if i not in decay], "weight_decay": 0.0},
    ]


OPTIMIZERS = ("adamw", "adam", "adafactor")


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # fused: one kernel per parameter group for the whole update, on CPU and CUDA alike.
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # An absolute, externally scheduled LR: the loop sets every group's lr each step.
        return Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    raise ValueError(f"optim.name={cfg.name!r}: choose one of {', '.join(OPTIMIZERS)}")


def lr_at(step: int, lr: float, max_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
          name: str = "cosine") -> float:
    """LR for optimizer step `step` (1-based; the update logged as step t uses lr_at(t)).

    Linear warmup reaches `lr` at `warmup_steps`; the decay then reaches `min_lr`
    exactly at `max_steps`. Counted in optimizer steps, never in micro-batches.
    """
    if step < warmup_steps:
        return lr * step / warmup_steps
    if name == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if name == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    raise ValueError(f"scheduler.name={name!r}: choose cosine, linear or constant")
