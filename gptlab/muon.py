"""Muon, for the matrices inside the transformer blocks (optim.MuonAdamW puts it beside AdamW).

Muon's update is the momentum orthogonalised by a Newton–Schulz iteration, as
torch.optim.Muon computes it (Keller Jordan's quintic coefficients, in bf16), scaled by
0.2·sqrt(max(rows, cols)) so that its RMS matches AdamW's ("match_rms_adamw"). gptlab has
its own copy for two things torch's lacks:
- `step(reject=flag)` leaves the weights and the momentum as they were where a device flag
  says so, without reading the flag back to the host (see optim.step_unless);
- FSDP2. Newton–Schulz needs each matrix whole, and FSDP2 shards it by rows over the
  processes. Each sharded matrix has an owner (the i-th, process i mod N): the owner gathers
  the update's rows from every process, orthogonalises the matrix, and scatters each process
  its rows back. The momentum stays sharded, so the optimizer state per process stays 1/N,
  and each process runs Newton–Schulz on 1/N of the matrices instead of all of them. Every
  gather is started before the first Newton–Schulz, every scatter before the first update,
  so the transfers overlap the work.
"""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _RowSharded:
    """A row-sharded matrix's update on its way to its owner, orthogonalised there, and back."""

    def __init__(self, param: DTensor, update: torch.Tensor, index: int, steps: int):
        if param.device_mesh.ndim != 1 or param.placements != (Shard(0),):
            raise ValueError(f"Muon takes FSDP2's row shards (Shard(0) on one mesh dimension), not "
                             f"{param.placements} on a {param.device_mesh.ndim}-D mesh")
        self.group, self.steps = param.device_mesh.get_group(), steps
        size = dist.get_world_size(self.group)
        self.owner, self.mine = index % size, dist.get_rank(self.group) == index % size
        self.rows, self.chunk = param.shape[0], math.ceil(param.shape[0] / size)  # Shard(0) cuts as torch.chunk
        self.local_rows = update.shape[0]
        padded = update.new_zeros(self.chunk, update.shape[1])
        padded[:self.local_rows] = update
        self.pieces = [torch.empty_like(padded) for _ in range(size)] if self.mine else None
        self.work = dist.gather(padded, self.pieces, group=self.group, group_dst=self.owner, async_op=True)
        self.out = torch.empty(self.chunk, update.shape[1], dtype=torch.bfloat16, device=update.device)

    def orthogonalise_and_send(self) -> None:
        self.work.wait()
        if self.mine:
            full = orthogonalise(torch.cat(self.pieces)[:self.rows], self.steps)
            spare = len(self.pieces) * self.chunk - self.rows
            self.pieces = list(torch.cat([full, full.new_zeros(spare, full.shape[1])]).chunk(len(self.pieces)))
        self.work = dist.scatter(self.out, self.pieces, group=self.group, group_src=self.owner, async_op=True)

    def received(self) -> torch.Tensor:
        self.work.wait()
        return self.out[:self.local_rows]


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised, for 2-D parameters (plain or FSDP2-sharded); decoupled weight decay."""

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
        todo, sharded = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf, grad = _local(state["momentum_buffer"]), _local(p.grad)
                new_buf = buf.lerp(grad, 1 - group["momentum"])
                update = grad.lerp(new_buf, group["momentum"])  # Nesterov
                if isinstance(p, DTensor):
                    update = _RowSharded(p, update, sharded, group["ns_steps"])
                    sharded += 1
                todo.append((p, group, buf, new_buf, update))
        for *_, update in todo:
            if isinstance(update, _RowSharded):
                update.orthogonalise_and_send()
        for p, group, buf, new_buf, update in todo:
            o = update.received() if isinstance(update, _RowSharded) else orthogonalise(update, group["ns_steps"])
            lr, weight = group["lr"], _local(p)
            scale = lr * (0.2 * math.sqrt(max(p.shape)))  # match_rms_adamw, whichever way round the matrix is stored
            new_p = weight.mul(1 - lr * group["weight_decay"]).add_(o, alpha=-scale)
            if reject is None:
                buf.copy_(new_buf)
                weight.copy_(new_p)
            else:
                buf.copy_(torch.where(reject, buf, new_buf))
                weight.copy_(torch.where(reject, weight, new_p))
        return loss
