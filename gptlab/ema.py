"""Weight averaging: an exponential moving average of the trainable weights, evaluated beside
the raw weights and exported in their place (trainer.ema_decay).

The average after optimizer step t is  avg <- avg + (1 - d_t) (w - avg)  with
d_t = min(ema_decay, (1 + t) / (10 + t)): the warmup of the decay lets the first steps, far from
where training goes, fade fast. A rejected step (guards.py) leaves the average as it was, on the
device, with no host read. The average is fp32 (the weights are), on the weights' device, and
saved in every checkpoint through Accelerate's registered state, so a resume is exact.
"""
from contextlib import contextmanager

import torch


def decay_at(decay: float, t: int) -> float:
    return min(decay, (1 + t) / (10 + t))


class WeightAverage:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
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
        return {"decay": self.decay, "average": [a.cpu() for a in self.average]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(f"the checkpoint's weight average has {len(state['average'])} tensors, this model "
                             f"{len(self.average)}")
        torch._foreach_copy_(self.average, [a.to(b.device) for a, b in zip(state["average"], self.average)])
