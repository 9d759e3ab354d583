"""Adafactor as the HF Trainer runs it for `optim="adafactor"` (seed 004).

That is transformers' Adafactor with an external learning rate (relative_step,
scale_parameter and warmup_init off) and no first moment: a factored second moment for
matrices (a row and a column average), a full one for vectors, beta2 = 1 - t^-0.8, updates
clipped to RMS 1, decoupled weight decay. gptlab has its own copy so that the step count
is a device tensor and `step(reject=flag)` leaves weights and state untouched where a
device flag says so: transformers' counts steps in a Python int, which a rejected update
could only be kept from advancing by reading the flag back to the host.
"""
import torch

EPS_SQUARED = 1e-30  # added to g² (transformers' eps[0])
CLIP_THRESHOLD = 1.0
DECAY_RATE = -0.8


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None, reject: torch.Tensor | None = None):
        """One update; where the 0-d bool tensor `reject` is true, none (weights and state as they were)."""
        loss = closure() if closure is not None else None
        keep = None if reject is None else ~reject

        def commit(old: torch.Tensor, new: torch.Tensor) -> None:
            old.copy_(new if keep is None else torch.where(keep, new, old))

        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad.float(), self.state[p]
                factored = grad.ndim >= 2
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                step = state["step"] + 1
                beta2 = (1.0 - step.pow(DECAY_RATE)).float()
                squared = grad ** 2 + EPS_SQUARED
                if factored:
                    row = state["exp_avg_sq_row"] * beta2 + squared.mean(dim=-1) * (1 - beta2)
                    col = state["exp_avg_sq_col"] * beta2 + squared.mean(dim=-2) * (1 - beta2)
                    update = ((row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                              * col.unsqueeze(-2).rsqrt() * grad)
                    commit(state["exp_avg_sq_row"], row)
                    commit(state["exp_avg_sq_col"], col)
                else:
                    avg = state["exp_avg_sq"] * beta2 + squared * (1 - beta2)
                    update = avg.rsqrt() * grad
                    commit(state["exp_avg_sq"], avg)
                update = update / (_rms(update) / CLIP_THRESHOLD).clamp(min=1.0) * lr
                new_p = p.float()
                if wd:
                    new_p = new_p.add(new_p, alpha=-wd * lr)
                commit(p, (new_p - update).to(p.dtype))
                commit(state["step"], step)
        return loss
