"""Causal LM losses, pure functions of logits (B, T, V) and input ids (B, T).

Labels are the inputs shifted left by one: position t predicts token t+1.
"""
import logging

import torch
import torch.nn.functional as F

from .validate import ConfigError

log = logging.getLogger(__name__)

LOSSES = ("cross_entropy", "keytoken")


def _token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of the shifted sequence, (B, T-1)."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), input_ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(B, T - 1)


def cross_entropy_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return _token_ce(logits, input_ids).mean()


def keytoken_loss(logits: torch.Tensor, input_ids: torch.Tensor, keytoken_ids: torch.Tensor,
                  alpha: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """Seed 002's loss: each sample's mean CE weighted by alpha * (1 + key-token count).

    The count runs over the sample's inputs (not its labels), as in the seed.
    `normalize` divides by the mean weight, so the loss stays on the CE scale.
    """
    per_sample = _token_ce(logits, input_ids).mean(dim=1)  # (B,)
    counts = torch.isin(input_ids, keytoken_ids).sum(dim=1).float()  # (B,)
    weights = alpha * (1.0 + counts)
    loss = (per_sample * weights).mean()
    return loss / weights.mean() if normalize else loss


def keytoken_ids(tokenizer, keywords) -> tuple[list[int], list[str]]:
    """Ids of keywords that are one token, tried bare and with a leading space.

    Returns the ids and the keywords skipped because no form of them is one token.
    """
    ids, skipped = [], []
    for kw in keywords:
        found = False
        for form in (kw, " " + kw):
            enc = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.append(enc[0])
                found = True
        if not found:
            skipped.append(kw)
    return sorted(set(ids)), skipped


def make_loss_fn(loss_cfg, tokenizer, device):
    """A callable (logits, input_ids) -> scalar loss, checked before step 1."""
    if loss_cfg.name == "cross_entropy":
        return cross_entropy_loss
    if loss_cfg.name != "keytoken":
        raise ConfigError(f"loss.name={loss_cfg.name!r}: choose cross_entropy or keytoken")
    ids, skipped = keytoken_ids(tokenizer, loss_cfg.keywords)
    if skipped:
        log.warning("loss.keywords not a single token, skipped: %s", skipped)
    if not ids:
        raise ConfigError(f"loss=keytoken: none of loss.keywords={list(loss_cfg.keywords)} is a single "
                          "token of this tokenizer")
    kt = torch.tensor(ids, device=device)
    return lambda logits, input_ids: keytoken_loss(logits, input_ids, kt, loss_cfg.alpha, loss_cfg.normalize)
