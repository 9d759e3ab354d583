"""Fixed-length blocks over a memmapped token stream, and who reads which block when.

The training order is a pure function of (seed, global micro-batch index): the
stream of micro-batches runs through epoch after epoch, each a fresh permutation of
the blocks, and rank r of W takes every W-th micro-batch. So a run with W processes
and grad_accum A sees exactly the blocks of a 1-process run with grad_accum A*W, and
resuming at optimizer step s needs nothing but s.
"""
from pathlib import Path

import numpy as np
import torch


class TokenBlocks:
    def __init__(self, path: Path, dtype: str, block_size: int):
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.block_size = block_size
        self.n_blocks = len(self.tokens) // block_size

    def __len__(self) -> int:
        return self.n_blocks

    def batch(self, block_ids: np.ndarray) -> torch.Tensor:
        """(B, T) int64 input ids; labels are the same ids, shifted inside the loss."""
        starts = np.asarray(block_ids, dtype=np.int64)[:, None] * self.block_size
        rows = self.tokens[starts + np.arange(self.block_size)]
        return torch.from_numpy(rows.astype(np.int64))


class TrainOrder:
    def __init__(self, n_blocks: int, micro_batch_size: int, grad_accum: int,
                 world_size: int, rank: int, seed: int):
        self.n_blocks, self.b, self.a = n_blocks, micro_batch_size, grad_accum
        self.w, self.rank, self.seed = world_size, rank, seed
        self.micro_per_epoch = n_blocks // micro_batch_size
        if self.micro_per_epoch < 1:
            raise ValueError(f"the training set has {n_blocks} blocks, fewer than one micro batch "
                             f"of {micro_batch_size}")
        self._epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_per_epoch / (self.a * self.w)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._perm

    def micro_batches(self, step: int):
        """This rank's grad_accum block-id arrays for 0-based optimizer step `step`."""
        out = []
        for a in range(self.a):
            g = (step * self.a + a) * self.w + self.rank
            epoch, i = divmod(g, self.micro_per_epoch)
            out.append(self._permutation(epoch)[i * self.b:(i + 1) * self.b])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.a * self.w / self.micro_per_epoch


def eval_batches(n_blocks: int, batch_size: int, world_size: int, rank: int):
    """Disjoint strided shares of the whole validation set: no block twice, none left out."""
    mine = np.arange(rank, n_blocks, world_size)
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
