"""Fixed-length blocks (or whole samples) over a memmapped token stream, and who reads which when.

A batch is one (B, T) int64 tensor that serves as the labels: the inputs are the same ids,
shifted inside the loss. Padding (per-sample mode only) is IGNORE_INDEX, which the loss
skips and the model reads as token 0: it sits after each sample's end, where causal
attention hides it from every real token.

The training order is a pure function of (seed, global micro-batch index): the
stream of micro-batches runs through epoch after epoch, each a fresh permutation of
the blocks, and rank r of W takes every W-th micro-batch. So a run with W processes
and grad_accum A sees exactly the blocks of a 1-process run with grad_accum A*W, and
resuming at optimizer step s needs nothing but s.
"""
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError


def plan_grad_accum(micro_batch_size: int, num_processes: int, global_batch_size=None, grad_accum=None) -> int:
    """The one place that decides the batch: grad_accum from trainer.global_batch_size and the launch.

    global batch = micro_batch_size x grad_accum x num_processes (sequences per optimizer step).
    With global_batch_size set, grad_accum follows from it, so one recipe trains the same on
    1 or 8 processes; an explicit grad_accum must then agree. Without it, grad_accum (default 1)
    decides and the global batch grows with the process count.
    """
    if global_batch_size is None:
        return grad_accum or 1
    unit = micro_batch_size * num_processes
    per_step = f"trainer.micro_batch_size={micro_batch_size} x {num_processes} process(es) = {unit}"
    if global_batch_size % unit:
        below, above = global_batch_size // unit * unit, (global_batch_size // unit + 1) * unit
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ConfigError(f"trainer.global_batch_size={global_batch_size} is not divisible by {per_step}; "
                          f"nearest valid global_batch_size: {nearest} (or change micro_batch_size)")
    derived = global_batch_size // unit
    if grad_accum is not None and grad_accum != derived:
        raise ConfigError(f"trainer.grad_accum={grad_accum} disagrees with trainer.global_batch_size="
                          f"{global_batch_size}: {per_step} needs grad_accum={derived}; drop trainer.grad_accum "
                          f"(it is derived) or set global_batch_size={unit * grad_accum}")
    return derived


@dataclass(frozen=True)
class BatchPlan:
    """What one optimizer step takes, derived once per launch: micro-batches of `micro` sequences
    of `block` tokens, `accum` of them per process, on `processes` processes."""
    micro: int
    accum: int
    processes: int
    block: int

    @classmethod
    def derive(cls, trainer_cfg, processes: int, block: int) -> "BatchPlan":
        tc = trainer_cfg
        return cls(tc.micro_batch_size, plan_grad_accum(tc.micro_batch_size, processes, tc.global_batch_size,
                                                        tc.grad_accum), processes, block)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over every process."""
        return self.micro * self.accum * self.processes

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block


IGNORE_INDEX = -100  # a label the loss skips (PyTorch's and Hugging Face's convention)


class TokenBlocks:
    """Packed modes (concat, chunk): the stream cut into blocks of block_size tokens."""

    token_bytes = None  # UTF-8 bytes per token id (tokenizer.token_byte_lengths), set by prepare: eval/bpb

    def __init__(self, path: Path, dtype: str, block_size: int):
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.block_size = block_size
        self.length = block_size  # tokens a row holds: less only in prefix() and rows()
        self.per_block = 1  # rows each block is read as: more only in rows()
        self.n_blocks = len(self.tokens) // block_size
        self.what = f"blocks of data.block_size={block_size}"

    def __len__(self) -> int:
        return self.n_blocks

    def prefix(self, length: int) -> "TokenBlocks":
        """The same blocks, each cut to its first `length` tokens (trainer.seq_warmup_len)."""
        short = copy.copy(self)
        short.length = length
        return short

    def rows(self, length: int) -> "TokenBlocks":
        """The same blocks, each read whole as block_size / length rows of `length` tokens
        (trainer.seq_warmup_split)."""
        split = self.prefix(length)
        split.per_block = self.block_size // length
        return split

    def batch(self, block_ids: np.ndarray) -> torch.Tensor:
        """(B x per_block, length) int64 ids."""
        starts = np.asarray(block_ids, dtype=np.int64)[:, None] * self.block_size
        rows = self.tokens[starts + np.arange(self.length * self.per_block)]
        return torch.from_numpy(rows.astype(np.int64).reshape(-1, self.length))

    def targets(self, block_ids: np.ndarray) -> np.ndarray:
        """Each row's count of predicted tokens, without reading the tokens."""
        return np.full(len(block_ids) * self.per_block, self.length - 1)

    def n_tokens(self, block_ids: np.ndarray) -> int:
        return len(block_ids) * self.per_block * self.length


class TokenSamples:
    """Per-sample mode (pack=sample): one document per row, padded to the longest in its batch.

    `path` holds the documents' ids back to back; `<path>.idx` their start offsets (uint64,
    one more than there are documents). block_size is the longest a sample was kept.
    """

    token_bytes = None  # as TokenBlocks'

    def __init__(self, path: Path, dtype: str, block_size: int):
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.offsets = np.fromfile(f"{path}.idx", dtype=np.uint64).astype(np.int64)
        self.lengths = np.diff(self.offsets)
        self.block_size = block_size
        self.what = "samples (data.pack=sample: one document per row)"

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, sample_ids: np.ndarray) -> torch.Tensor:
        """(B, L) int64 ids, L the longest sample here, IGNORE_INDEX after each sample's end."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        rows = np.full((len(ids), int(self.lengths[ids].max())), IGNORE_INDEX, dtype=np.int64)
        for row, i in zip(rows, ids):
            row[:self.lengths[i]] = self.tokens[self.offsets[i]:self.offsets[i + 1]]
        return torch.from_numpy(rows)

    def targets(self, sample_ids: np.ndarray) -> np.ndarray:
        return np.maximum(self.lengths[np.asarray(sample_ids, dtype=np.int64)] - 1, 0)

    def n_tokens(self, sample_ids: np.ndarray) -> int:
        return int(self.lengths[np.asarray(sample_ids, dtype=np.int64)].sum())


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`; to a GPU from pinned memory, so the copy runs behind the GPU's work."""
    return (batch.pin_memory() if device.type == "cuda" else batch).to(device, non_blocking=True)


class TrainOrder:
    """Which blocks (samples) each optimizer step reads: a pure function of (seed, step).

    Batch warmup: steps before `warmup_steps` read only the first `warmup_micro` sequences of
    each micro batch (the rest of those micro batches are not read this epoch), so the
    first steps cost a fraction of a full one.
    """

    def __init__(self, n_blocks: int, micro_batch_size: int, grad_accum: int,
                 world_size: int, rank: int, seed: int, shuffle: bool = True,
                 warmup_steps: int = 0, warmup_micro: int | None = None):
        self.n_blocks, self.b, self.a = n_blocks, micro_batch_size, grad_accum
        self.w, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.warmup_steps, self.warmup_micro = warmup_steps, warmup_micro
        self.micro_per_epoch = n_blocks // micro_batch_size
        if self.micro_per_epoch < 1:
            raise ValueError(f"the training set has {n_blocks} blocks, fewer than one micro batch "
                             f"of {micro_batch_size}")
        self._perms = {}  # epoch -> permutation; the two latest, as a step may straddle two epochs

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_per_epoch / (self.a * self.w)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
                                  if self.shuffle else np.arange(self.n_blocks))
        return self._perms[epoch]

    def _micro_batch(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, self.micro_per_epoch)
        return self._permutation(epoch)[i * self.b:(i + 1) * self.b]

    def _taken(self, step: int, ids: np.ndarray) -> np.ndarray:
        return ids[:self.warmup_micro] if step < self.warmup_steps else ids

    def micro_batches(self, step: int):
        """This rank's grad_accum block-id arrays for 0-based optimizer step `step`."""
        return [self._taken(step, self._micro_batch((step * self.a + a) * self.w + self.rank)) for a in range(self.a)]

    def step_batches(self, step: int):
        """Every rank's micro-batches of the step: what the loss normalises over, known to each
        rank without a collective."""
        return [self._taken(step, self._micro_batch(step * self.a * self.w + g)) for g in range(self.a * self.w)]

    def epoch_at(self, step: int) -> float:
        return step * self.a * self.w / self.micro_per_epoch


def eval_batches(n_blocks: int, batch_size: int, world_size: int, rank: int):
    """Disjoint strided shares of the whole validation set: no block twice, none left out."""
    mine = np.arange(rank, n_blocks, world_size)
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
