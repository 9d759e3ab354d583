"""Causal LM losses, pure functions of logits (B, T, V) and input ids (B, T).

Labels are the inputs shifted left by one: position t predicts token t+1.

Both losses are a weighted sum of token cross-entropies, Σ w·CE, with weights that
depend on the inputs only (`LMLoss.token_weights`). That lets training fuse the LM
head into the loss (`fused_linear_loss`), chunk by chunk, without ever holding the
(B, T, V) logits; the logits functions here stay the reference and the evaluation path.
"""
import logging

import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger(__name__)

LOSSES = ("cross_entropy", "keytoken")


def check_loss_config(lc) -> None:
    """Before step 1: the loss settings alone."""
    if lc.name not in LOSSES:
        raise ConfigError(f"loss.name={lc.name} must be one of {', '.join(LOSSES)}")
    if lc.alpha <= 0:
        raise ConfigError(f"loss.alpha={lc.alpha} must be > 0: it scales every sample's weight")
    if lc.name == "keytoken" and len(lc.keywords) == 0:
        raise ConfigError("loss=keytoken needs loss.keywords; the list is empty")


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


def keytoken_weights(input_ids: torch.Tensor, keytoken_ids: torch.Tensor, alpha: float = 1.0,
                     normalize: bool = False) -> torch.Tensor:
    """(B, T-1) weights w with Σ w·CE == keytoken_loss."""
    B, T = input_ids.shape
    weights = alpha * (1.0 + torch.isin(input_ids, keytoken_ids).sum(dim=1).float())  # (B,)
    if normalize:
        weights = weights / weights.mean()
    return (weights / (B * (T - 1)))[:, None].expand(B, T - 1)


class LMLoss:
    """A loss on logits, `(logits, input_ids) -> scalar`, that also knows its token weights."""

    def __init__(self, on_logits, token_weights):
        self.on_logits, self.token_weights = on_logits, token_weights

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.on_logits(logits, input_ids)


def _mean_weights(input_ids: torch.Tensor) -> torch.Tensor:
    B, T = input_ids.shape
    return torch.full((B, T - 1), 1.0 / (B * (T - 1)), device=input_ids.device)


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


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                      token_weights: torch.Tensor) -> torch.Tensor:
    """Σ w·CE of the shifted sequence from the final hidden states (B, T, C) and the LM head weight (V, C).

    Equal to `loss(hidden @ weight.T, input_ids)` for a loss whose token weights are given.
    """
    C, V = hidden.shape[-1], weight.shape[0]
    # About 4M logits per chunk: 16 MB of fp32 stays in a CPU's last-level cache; a GPU
    # wants large matmuls, and 2^27 logits (under 1 GB with the fp32 softmax) is still
    # far below the full (B, T, V) tensor of GPT-2 124M.
    chunk_rows = max(1, (2 ** 27 if hidden.device.type == "cuda" else 2 ** 22) // V)
    return _FusedLinearCE.apply(hidden[:, :-1].reshape(-1, C), weight, input_ids[:, 1:].reshape(-1),
                                token_weights.reshape(-1), chunk_rows)


def make_loss_fn(loss_cfg, tokenizer, device) -> LMLoss:
    """The configured loss, checked before step 1."""
    if loss_cfg.name == "cross_entropy":
        return LMLoss(cross_entropy_loss, _mean_weights)
    if loss_cfg.name != "keytoken":
        raise ConfigError(f"loss.name={loss_cfg.name!r}: choose cross_entropy or keytoken")
    ids, skipped = keytoken_ids(tokenizer, loss_cfg.keywords)
    if skipped:
        log.warning("loss.keywords not a single token, skipped: %s", skipped)
    if not ids:
        raise ConfigError(f"loss=keytoken: none of loss.keywords={list(loss_cfg.keywords)} is a single "
                          "token of this tokenizer")
    kt = torch.tensor(ids, device=device)
    return LMLoss(lambda logits, input_ids: keytoken_loss(logits, input_ids, kt, loss_cfg.alpha, loss_cfg.normalize),
                  lambda input_ids: keytoken_weights(input_ids, kt, loss_cfg.alpha, loss_cfg.normalize))
