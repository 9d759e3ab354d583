"""Causal LM losses: a weighted sum of token cross-entropies, Σ w·CE, over the optimizer step.

Labels are the batch itself, shifted left by one: position t predicts token t+1.
IGNORE_INDEX marks padding (per-sample mode), which has weight 0.

A loss gives each target a weight from the labels alone (`token_weights`) and says how
much each batch adds to the step's denominator (`denominator`, on the host, from the data).
The loop sums the denominators of every micro-batch of every process before the step, so
k micro-batches of b equal one batch of k·b and W processes equal one, whatever the loss
normalises by (targets, samples or key-token weights). Weights from the inputs only also
let training fuse the LM head into the loss (`fused_linear_loss`), chunk by chunk, without
ever holding the (B, T, V) logits; `cross_entropy_loss` and `keytoken_loss` stay the
one-batch references the tests check both paths against.
"""
import logging

import numpy as np
import torch
import torch.nn.functional as F

from .data.blocks import IGNORE_INDEX
from .errors import ConfigError

log = logging.getLogger(__name__)


def check_loss_config(lc) -> None:
    """Before step 1: the loss settings alone."""
    if lc.alpha <= 0:
        raise ConfigError(f"loss.alpha={lc.alpha} must be > 0: it scales every sample's weight")
    if lc.name == "keytoken" and len(lc.keywords) == 0:
        raise ConfigError("loss=keytoken needs loss.keywords; the list is empty")


def _token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of the shifted sequence, (B, T-1); 0 where the label is padding."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX)
    return ce.view(B, T - 1)


def _targets(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, 1:] != IGNORE_INDEX  # (B, T-1)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over every target of the batch (the reference for one batch)."""
    return _token_ce(logits, labels).sum() / _targets(labels).sum()


def keytoken_loss(logits: torch.Tensor, labels: torch.Tensor, keytoken_ids: torch.Tensor,
                  alpha: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """Seed 002's loss: each sample's mean CE weighted by alpha * (1 + key-token count).

    The count runs over the sample's inputs (not its labels), as in the seed.
    `normalize` divides by the mean weight, so the loss stays on the CE scale.
    """
    per_sample = _token_ce(logits, labels).sum(dim=1) / _targets(labels).sum(dim=1)  # (B,)
    counts = torch.isin(labels, keytoken_ids).sum(dim=1).float()  # (B,)
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


class TokenWeightedLoss:
    """Σ w·CE, with w from `token_weights(labels, z)`; z is this process's share of the step's
    denominator (None: the batch is the whole step)."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, z=None) -> torch.Tensor:
        return (_token_ce(logits, labels) * self.token_weights(labels, z)).sum()

    def denominator(self, blocks, ids) -> float:
        raise NotImplementedError

    def token_weights(self, labels: torch.Tensor, z=None) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(TokenWeightedLoss):
    """The mean token cross-entropy over every target of the step."""

    def denominator(self, blocks, ids) -> float:
        return float(blocks.targets(ids).sum())

    def token_weights(self, labels, z=None):
        mask = _targets(labels).float()
        return mask / (mask.sum() if z is None else z)


class KeytokenLoss(TokenWeightedLoss):
    """Seed 002's weighting: each sample's mean CE times alpha * (1 + its key tokens), averaged
    over the step's samples, or (normalize) divided by the step's total weight instead."""

    def __init__(self, ids: list[int], alpha: float, normalize: bool):
        self.ids, self.alpha, self.normalize = ids, alpha, normalize
        self._on = {}  # device -> the ids as a tensor there, copied once

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.device not in self._on:
            self._on[labels.device] = torch.tensor(self.ids, device=labels.device)
        return self.alpha * (1.0 + torch.isin(labels, self._on[labels.device]).sum(dim=1).float())  # (B,)

    def denominator(self, blocks, ids) -> float:
        has = blocks.targets(ids) > 0
        if not self.normalize:
            return float(has.sum())
        counts = np.isin(blocks.batch(ids).numpy(), self.ids).sum(axis=1)  # on the host, from the data
        return float((self.alpha * (1.0 + counts))[has].sum())

    def token_weights(self, labels, z=None):
        mask = _targets(labels)
        n = mask.sum(dim=1)  # (B,) targets per sample
        s = self.sample_weights(labels)
        if z is None:
            z = (s * (n > 0)).sum() if self.normalize else (n > 0).sum()
        return (s / (n.clamp_min(1) * z))[:, None] * mask


class _FusedLinearCE(torch.autograd.Function):
    """Σ w·CE(h @ Wᵀ, y) with both gradients worked out in the forward pass, a chunk of rows at a time.

    Only one (chunk, V) block of logits exists at a time, reused from chunk to chunk, so
    the logits neither leave the cache (CPU) nor take N·V memory (GPU), and the usual
    slice, log-softmax, NLL and their backward passes over the whole (N, V) tensor are
    gone. The backward pass only scales the saved gradients by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, chunk_rows: int):
        # h (N, C), weight (V, C), targets (N,), token_weights (N,)
        dev, (N, C), V = h.device, h.shape, weight.shape[0]
        # Under autocast the matmuls run in the low-precision dtype, the softmax in fp32.
        cd = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else h.dtype
        f32 = torch.float32
        with torch.autocast(dev.type, enabled=False):
            hc, w = h.detach().to(cd), weight.detach().to(cd)
            grad_h = torch.empty(N, C, dtype=f32, device=dev)
            # A frozen head (LoRA) needs no (V, C) gradient: neither its memory nor its matmuls.
            need_w = ctx.needs_input_grad[1]
            grad_w = torch.zeros(V, C, dtype=f32, device=dev) if need_w else None
            n = min(chunk_rows, N)
            logits = torch.empty(n, V, dtype=cd, device=dev)
            probs = torch.empty(n, V, dtype=f32, device=dev)  # log-probs, then the logits' gradient
            minus_one = torch.full((n, 1), -1.0, dtype=f32, device=dev)
            w_max = token_weights.max().to(f32).clamp_min(torch.finfo(f32).tiny)
            loss = torch.zeros((), dtype=f32, device=dev)
            for s in range(0, N, n):
                e = min(s + n, N)
                L, P, y, tw = logits[:e - s], probs[:e - s], targets[s:e, None], token_weights[s:e, None].to(f32)
                torch.mm(hc[s:e], w.t(), out=L)
                torch.log_softmax(L, 1, dtype=f32, out=P)
                loss -= (P.gather(1, y) * tw).sum()
                P.exp_().scatter_add_(1, y, minus_one[:e - s])  # d CE / d logits = softmax - onehot
                if cd == f32:
                    P.mul_(tw)
                    torch.mm(P, w, out=grad_h[s:e])
                    if need_w:
                        grad_w.addmm_(P.t(), hc[s:e])
                else:
                    # Rows scaled to at most 1 before the cast, so that fp16 does not flush
                    # w·(softmax - onehot), with w ~ 1/tokens, to zero.
                    G = P.mul_(tw / w_max).to(cd)
                    grad_h[s:e] = torch.mm(G, w).float().mul_(w_max)
                    if need_w:
                        grad_w += (G.t() @ hc[s:e]).float().mul_(w_max)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.dtypes[1])
        return (grad_h * grad_out).to(ctx.dtypes[0]), dw, None, None, None


def _chunk_rows(V: int, device: torch.device) -> int:
    # About 4M logits per chunk: 16 MB of fp32 stays in a CPU's last-level cache; a GPU
    # wants large matmuls, and 2^27 logits (under 1 GB with the fp32 softmax) is still
    # far below the full (B, T, V) tensor of GPT-2 124M.
    return max(1, (2 ** 27 if device.type == "cuda" else 2 ** 22) // V)


@torch.no_grad()
def chunked_token_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) token cross-entropies from the final hidden states (B, T, C) and the LM head (V, C),
    a chunk of rows at a time, so the (B, T, V) logits never exist (evaluation); 0 at padding."""
    B, T, C = hidden.shape
    h, y = hidden[:, :-1].reshape(-1, C), labels[:, 1:].reshape(-1)
    out = torch.empty(len(y), dtype=torch.float32, device=hidden.device)
    n = _chunk_rows(weight.shape[0], hidden.device)
    for s in range(0, len(y), n):
        out[s:s + n] = F.cross_entropy((h[s:s + n] @ weight.t()).float(), y[s:s + n], reduction="none",
                                       ignore_index=IGNORE_INDEX)
    return out.view(B, T - 1)


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      token_weights: torch.Tensor) -> torch.Tensor:
    """Σ w·CE of the shifted sequence from the final hidden states (B, T, C) and the LM head weight (V, C).

    Equal to `loss(hidden @ weight.T, labels)` for a loss whose token weights are given; a
    padding label has weight 0 and is read as token 0.
    """
    C, V = hidden.shape[-1], weight.shape[0]
    chunk_rows = _chunk_rows(V, hidden.device)
    return _FusedLinearCE.apply(hidden[:, :-1].reshape(-1, C), weight, labels[:, 1:].clamp_min(0).reshape(-1),
                                token_weights.reshape(-1), chunk_rows)


def make_loss_fn(loss_cfg, tokenizer) -> TokenWeightedLoss:
    """The configured loss (config.Loss names it), checked before step 1."""
    return LOSSES[loss_cfg.name](loss_cfg, tokenizer)


def _keytoken(loss_cfg, tokenizer) -> KeytokenLoss:
    ids, skipped = keytoken_ids(tokenizer, loss_cfg.keywords)
    if skipped:
        log.warning("loss.keywords not a single token, skipped: %s", skipped)
    if not ids:
        raise ConfigError(f"loss=keytoken: none of loss.keywords={list(loss_cfg.keywords)} is a single "
                          "token of this tokenizer")
    return KeytokenLoss(ids, loss_cfg.alpha, loss_cfg.normalize)


LOSSES = {  # config.Loss -> builder(loss config, tokenizer)
    "cross_entropy": lambda loss_cfg, tokenizer: CrossEntropy(),
    "keytoken": _keytoken,
}
