"""Muon, for the matrices inside the transformer blocks (optim.MuonAdamW puts it beside AdamW).

Muon's update is the momentum orthogonalised by a Newton–Schulz iteration, as
torch.optim.Muon computes it (Keller Jordan's quintic coefficients, in bf16), scaled by
0.2·sqrt(max(rows, cols)) so that its RMS matches AdamW's ("match_rms_adamw"). gptlab has
its own copy for one thing torch's lacks: `step(reject=flag)` leaves the weights and the
momentum as they were where a device flag says so, without reading the flag back to the
host (see optim.step_unless).
"""
import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def orthogonalise(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton–Schulz: about U·Vᵀ of g = U·S·Vᵀ, its singular values pushed towards 1, in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised, for 2-D parameters; decoupled weight decay."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, ns_steps: int):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "ns_steps": ns_steps})
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D parameters only")

    @torch.no_grad()
    def step(self, closure=None, reject: torch.Tensor | None = None):
        """One update; where the 0-d bool tensor `reject` is true, none (weights and momentum as they were)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                new_buf = buf.lerp(p.grad, 1 - momentum)
                update = orthogonalise(p.grad.lerp(new_buf, momentum), group["ns_steps"])
                scale = lr * (0.2 * math.sqrt(max(p.shape)))  # match_rms_adamw, whichever way round the matrix is stored
                new_p = p.mul(1 - lr * group["weight_decay"]).add_(update, alpha=-scale)
                if reject is None:
                    buf.copy_(new_buf)
                    p.copy_(new_p)
                else:
                    buf.copy_(torch.where(reject, buf, new_buf))
                    p.copy_(torch.where(reject, p, new_p))
        return loss
