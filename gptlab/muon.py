"""Muon, for the matrices inside the transformer blocks (optim.MuonAdamW puts it beside AdamW).

Muon's update is the momentum orthogonalised by a Newton–Schulz iteration, as
torch.optim.Muon computes it (Keller Jordan's quintic coefficients, in bf16), scaled by
0.2·sqrt(max(rows, cols)) so that its RMS matches AdamW's ("match_rms_adamw"). gptlab has
its own copy for four things torch's lacks:
- a matrix made of several side by side (GPT-2's fused Q, K and V) orthogonalised piece by
  piece, each scaled as a matrix of its own (optim.muon_split_qkv);
- Newton–Schulz in fp32 where bf16 matmul is emulated (a CPU without AVX512-BF16 or AMX, a
  V100): there bf16 Newton–Schulz measured 33-37x slower than fp32 and the default recipe ~7x
  slower (bench/ns_precision.py). In fp32 a matrix at least twice as wide as tall (the MLP's)
  iterates on its Gram matrix instead: the same polynomial, in 44% fewer FLOPs at 4:1;
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
import logging
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from .distributed import native_bf16_matmul

log = logging.getLogger(__name__)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def orthogonalise(g: torch.Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Newton–Schulz: about U·Vᵀ of g = U·S·Vᵀ, its singular values pushed towards 1, in `dtype`.

    `g` is one matrix or a stack (n, rows, cols) of same-shaped ones, each orthogonalised on its own.
    """
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)  # spectral norm at most 1
    wide = x.size(-1) >= 2 * x.size(-2)
    x = _gram_newton_schulz(x, steps) if wide and dtype == torch.float32 else _newton_schulz(x, steps)
    return x.mT if tall else x


def _newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x ← a·x + (b·G + c·G²)·x with G = x·xᵀ: 4·m²·n + 2·m³ FLOPs a step for x (m, n)."""
    a, b, c = NS_COEFFICIENTS
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _gram_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iteration on the (m, m) Gram matrix alone, for x (m, n) with n ≥ 2·m.

    Each step multiplies x on the left by Q = a + b·G + c·G², a polynomial in G = x·xᵀ, so
    x_k = P·x_0 with P the product of the Qs, and the next G is Q·G·Q. Only P and G are
    iterated, and x_0 is multiplied once at the end: 4·m²·n + (8·steps - 6)·m³ FLOPs against
    steps·(4·m²·n + 2·m³), 44% fewer for an MLP matrix (n = 4·m) over 5 steps. fp32 only: it
    amplifies rounding in the small singular values, which in bf16 reached a relative error
    of 6 on a low-rank matrix, against 0.3 for the iteration above (1.5e-4 and 2e-5 in fp32).
    """
    a, b, c = NS_COEFFICIENTS
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm
    gram = x @ x.mT
    a_eye = torch.eye(x.size(-2), dtype=x.dtype, device=x.device) * a
    p = None
    for step in range(steps):
        q = mm(torch.add(a_eye, gram, alpha=b), gram, gram, alpha=c)
        p = q if p is None else q @ p
        if step < steps - 1:
            gram = q @ (q @ gram)
    return p @ x


def orthogonalise_pieces(g: torch.Tensor, pieces: int, steps: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """orthogonalise, each of g's `pieces` equal column blocks on its own: GPT-2's c_attn (in, 3·out)
    holds Q, K and V side by side, which modded-nanogpt orthogonalises as three matrices."""
    if pieces == 1:
        return orthogonalise(g, steps, dtype)
    *lead, rows, cols = g.shape
    blocks = g.unflatten(-1, (pieces, cols // pieces)).movedim(-2, -3)  # (..., pieces, rows, cols / pieces)
    o = orthogonalise(blocks.reshape(-1, rows, cols // pieces), steps, dtype)
    return o.reshape(*lead, pieces, rows, cols // pieces).movedim(-3, -2).flatten(-2)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _RowSharded:
    """A row-sharded matrix's update on its way to its owner, orthogonalised there, and back."""

    def __init__(self, param: DTensor, update: torch.Tensor, index: int, pieces: int, steps: int, dtype: torch.dtype):
        if param.device_mesh.ndim != 1 or param.placements != (Shard(0),):
            raise ValueError(f"Muon takes FSDP2's row shards (Shard(0) on one mesh dimension), not "
                             f"{param.placements} on a {param.device_mesh.ndim}-D mesh")
        self.group, self.pieces, self.steps, self.dtype = param.device_mesh.get_group(), pieces, steps, dtype
        size = dist.get_world_size(self.group)
        self.owner, self.mine = index % size, dist.get_rank(self.group) == index % size
        self.rows, self.chunk = param.shape[0], math.ceil(param.shape[0] / size)  # Shard(0) cuts as torch.chunk
        self.local_rows = update.shape[0]
        padded = update.new_zeros(self.chunk, update.shape[1])
        padded[:self.local_rows] = update
        self.rows_from = [torch.empty_like(padded) for _ in range(size)] if self.mine else None
        self.work = dist.gather(padded, self.rows_from, group=self.group, group_dst=self.owner, async_op=True)
        self.out = torch.empty(self.chunk, update.shape[1], dtype=dtype, device=update.device)

    def orthogonalise_and_send(self) -> None:
        self.work.wait()
        if self.mine:
            full = orthogonalise_pieces(torch.cat(self.rows_from)[:self.rows], self.pieces, self.steps, self.dtype)
            spare = len(self.rows_from) * self.chunk - self.rows
            self.rows_from = list(torch.cat([full, full.new_zeros(spare, full.shape[1])]).chunk(len(self.rows_from)))
        self.work = dist.scatter(self.out, self.rows_from, group=self.group, group_src=self.owner, async_op=True)

    def received(self) -> torch.Tensor:
        self.work.wait()
        return self.out[:self.local_rows]


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised, for 2-D parameters (plain or FSDP2-sharded); decoupled weight decay."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, ns_steps: int,
                 ns_dtype: torch.dtype | None = None, pieces: dict[int, int] | None = None):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "ns_steps": ns_steps})
        # {i: k}: the i-th parameter (in param_groups order) is k matrices side by side, each
        # orthogonalised on its own. By position, not by tensor: Accelerate swaps in FSDP2's
        # sharded parameters in place, and a checkpoint does not carry it.
        self.pieces = pieces or {}
        # None: bf16 (torch's choice) where bf16 matmul is native on the weights' device, fp32 where it is
        # emulated. Not in the param groups: a checkpoint would carry it to a machine with other hardware.
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D parameters only")

    @torch.no_grad()
    def step(self, closure=None, reject: torch.Tensor | None = None):
        """One update; where the 0-d bool tensor `reject` is true, none (weights and momentum as they were).

        The plain (unsharded) matrices of a group go through it stacked by shape (a fused
        matrix's pieces in a stack of their own), a few dozen kernel launches for all of them
        instead of a few dozen per matrix: on a GPU, launching the per-matrix Newton–Schulz took
        longer than running it. Each matrix's arithmetic is the same as alone (the same bits on
        a CPU).
        """
        loss = closure() if closure is not None else None
        sharded, buckets = [], {}
        for i, (p, group) in enumerate((p, g) for g in self.param_groups for p in g["params"]):
            if p.grad is None:
                continue
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            pieces = self.pieces.get(i, 1)
            if isinstance(p, DTensor):
                sharded.append((p, group, pieces))
            else:
                buckets.setdefault((id(group), p.shape, p.dtype, pieces), (group, pieces, []))[2].append(p)
        self._step_sharded(sharded, reject)
        for group, pieces, params in buckets.values():
            self._step_stacked(group, pieces, params, reject)
        return loss

    def _step_stacked(self, group: dict, pieces: int, params: list, reject) -> None:
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        buf, grad, weight = torch.stack(bufs), torch.stack([p.grad for p in params]), torch.stack(params)
        new_buf = buf.lerp(grad, 1 - group["momentum"])
        update = grad.lerp(new_buf, group["momentum"])  # Nesterov
        o = orthogonalise_pieces(update, pieces, group["ns_steps"], self._ns_dtype(weight.device))
        new_p = self._updated(weight, o, group, params[0].shape, pieces)
        if reject is not None:
            new_buf, new_p = torch.where(reject, buf, new_buf), torch.where(reject, weight, new_p)
        torch._foreach_copy_(bufs, list(new_buf.unbind()))
        torch._foreach_copy_(params, list(new_p.unbind()))

    def _step_sharded(self, params: list, reject) -> None:
        todo = []
        for index, (p, group, pieces) in enumerate(params):
            buf, grad = _local(self.state[p]["momentum_buffer"]), _local(p.grad)
            new_buf = buf.lerp(grad, 1 - group["momentum"])
            update = grad.lerp(new_buf, group["momentum"])  # Nesterov
            sent = _RowSharded(p, update, index, pieces, group["ns_steps"], self._ns_dtype(buf.device))
            todo.append((p, group, pieces, buf, new_buf, sent))
        for *_, update in todo:
            update.orthogonalise_and_send()
        for p, group, pieces, buf, new_buf, update in todo:
            weight = _local(p)
            new_p = self._updated(weight, update.received(), group, p.shape, pieces)
            if reject is None:
                buf.copy_(new_buf)
                weight.copy_(new_p)
            else:
                buf.copy_(torch.where(reject, buf, new_buf))
                weight.copy_(torch.where(reject, weight, new_p))

    def _ns_dtype(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is None:
            self.ns_dtype = torch.bfloat16 if native_bf16_matmul(device) else torch.float32
            if self.ns_dtype == torch.float32:
                log.info("Muon: Newton-Schulz in fp32, not bf16: this %s emulates bf16 matmul (a CPU without "
                         "AVX512-BF16/AMX, a GPU before compute capability 8.0), where bf16 ran ~35x slower",
                         device.type)
        return self.ns_dtype

    @staticmethod
    def _updated(weight: torch.Tensor, o: torch.Tensor, group: dict, shape, pieces: int) -> torch.Tensor:
        lr = group["lr"]
        # match_rms_adamw, whichever way round the matrix (or each of its pieces) is stored
        scale = lr * (0.2 * math.sqrt(max(shape[0], shape[1] // pieces)))
        return weight.mul(1 - lr * group["weight_decay"]).add_(o, alpha=-scale)
