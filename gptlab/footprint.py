"""What the training state occupies on this process: parameters, gradients, optimizer state.

Counted from the tensors themselves, after the first update (when the optimizer's moments
exist), so a sharded model shows its shard (a DTensor's local part) and a frozen parameter
shows no gradient or moments.
"""
import logging

import torch

log = logging.getLogger(__name__)


def _local_bytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor holds only its shard here
    return t.numel() * t.element_size()


def state_bytes(model, optimizer) -> dict:
    """Bytes of this process's parameters, gradients and optimizer state (tied weights once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "parameters": sum(_local_bytes(p) for p in params),
        # What backward gives each trainable parameter (its own shape and dtype), so the count holds
        # after zero_grad too.
        "gradients": sum(_local_bytes(p) for p in params if p.requires_grad),
        "optimizer_state": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()),
    }


def log_state_bytes(model, optimizer, num_processes: int) -> dict:
    sizes = state_bytes(model, optimizer)
    log.info("training state per process (of %d): parameters %.1f MiB, gradients %.1f MiB, optimizer state "
             "%.1f MiB; %.1f MiB in all", num_processes, *(v / 2**20 for v in sizes.values()),
             sum(sizes.values()) / 2**20)
    return sizes
