"""Weight averaging: an exponential moving average of the trainable weights, evaluated beside
the raw weights and exported in their place (trainer.ema_decay).

The average after optimizer step t is  avg <- avg + (1 - d_t) (w - avg)  with
d_t = min(ema_decay, (1 + t) / (10 + t)): the warmup of the decay lets the first steps, far from
where training goes, fade fast. A rejected step (guards.py) leaves the average as it was, on the
device, with no host read. The average is fp32 (the weights are), on the weights' device, and
every checkpoint holds it (weight_average.safetensors, by parameter name), so a resume is exact.
"""
from contextlib import contextmanager

import torch


def decay_at(decay: float, t: int) -> float:
    return min(decay, (1 + t) / (10 + t))


class WeightAverage:
    def __init__(self, model, decay: float):
        """`model` unwrapped, so the average is kept by the model's own parameter names."""
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, t: int, reject: torch.Tensor | None) -> None:
        weight = 1.0 - decay_at(self.decay, t)
        if reject is not None:  # 0 where the step was rejected: the average stays
            weight = torch.where(reject, 0.0, weight).to(self.average[0].device, torch.float32)
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], weight)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model holds the average inside the block, its own weights again after it."""
        own = [p.detach().clone() for p in self.params]
        torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            torch._foreach_copy_([p.data for p in self.params], own)

    def state_dict(self) -> dict:
        """{parameter name: average}, on the CPU: what weight_average.safetensors holds."""
        return {n: a.detach().cpu().contiguous() for n, a in zip(self.names, self.average)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.names):
            raise ValueError(f"its weight average is of other parameters (missing "
                             f"{sorted(set(self.names) - set(state))[:3]}, unexpected {sorted(set(state) - set(self.names))[:3]})")
        torch._foreach_copy_(self.average, [state[n].to(a.device) for n, a in zip(self.names, self.average)])
