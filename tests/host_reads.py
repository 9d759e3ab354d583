"""Count, on a CPU, the host reads a training run would make on a GPU: each one a stream sync there.

A read is `.item()`, `.tolist()`, `bool()`, `float()`, `int()`, `.cpu()` or `.numpy()` of a
tensor that would live on the GPU, or a collective the host must wait for (one on a tensor
that lives on the host, such as a flag, over gloo). On a CPU every tensor is a host tensor,
so the device is told apart by where a tensor comes from: the model's parameters, buffers
and gradients, anything made with an explicit `device=` or moved with `.to(device)`, and
everything computed from those, live on the device; data made on the host (numpy, Python
lists) stays there until it is moved. Implicit reads count too: an op whose output
size depends on the values (nonzero, masked_select, unique), and indexing by a device tensor
that is 0-d (read as a Python int) or boolean (a mask, through nonzero). A TorchFunctionMode sees every torch call and
Tensor method, so a read inside a library (transformers' mask builder, GradScaler) counts
like one in gptlab.
"""
import traceback
import weakref
from collections import Counter

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
# Reads by shape: the result's size depends on the values, so the host waits to learn it.
DATA_DEPENDENT = {torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
                  torch.unique, torch.Tensor.unique}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier",
               "all_gather_object", "broadcast_object_list")


class HostReads(TorchFunctionMode):
    """with HostReads(model) as reads: ... ; reads.count, reads.where (a Counter of call sites)."""

    def __init__(self, *modules):
        super().__init__()
        self._device = {}  # id -> weakref of the tensors that live on the device
        self.count, self.where, self.active = 0, Counter(), True
        self.track(*modules)
        self._real = {name: getattr(dist, name) for name in COLLECTIVES}

    def track(self, *modules) -> None:
        """The modules' parameters, buffers and (as they are made) gradients live on the device."""
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                self._mark(t)
                if t.requires_grad:
                    t.register_post_accumulate_grad_hook(lambda p: self._mark(p.grad))

    def _mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._device[id(t)] = weakref.ref(t, lambda _, i=id(t): self._device.pop(i, None))

    def on_device(self, t) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def _record(self) -> None:
        if self.active:
            self.count += 1
            frames = [f for f in traceback.extract_stack()[:-3] if "host_reads.py" not in f.filename]
            self.where[" < ".join(f"{f.filename.split('site-packages/')[-1].split('main/')[-1]}:{f.lineno}"
                                  for f in reversed(frames[-3:]))] += 1

    def __enter__(self):
        for name, real in self._real.items():
            setattr(dist, name, self._collective(real))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._real.items():
            setattr(dist, name, real)
        return super().__exit__(*exc)

    def _collective(self, real):
        def call(*args, **kwargs):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if not kwargs.get("async_op") and not any(self.on_device(t) for t in tensors):
                self._record()  # the host waits for every process: a flag, an object, a barrier
            return real(*args, **kwargs)
        return call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in READS | DATA_DEPENDENT and inputs and self.on_device(inputs[0]):
            self._record()
        elif func in INDEXING and any(self.on_device(t) and (t.ndim == 0 or t.dtype == torch.bool)
                                      for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)):
            self._record()
        out = func(*args, **kwargs)
        moved = func in MOVES and any(isinstance(a, (torch.device, str)) or getattr(a, "is_cuda", False)
                                      for a in [*args[1:], *kwargs.values()])
        if "device" in kwargs or moved or any(self.on_device(t) for t in inputs):
            for t in tree_flatten(out)[0]:
                self._mark(t)
        return out


def cpu_fp16_scaler():
    """Make the next runs take fp16's GradScaler path on this CPU (accelerate makes a scaler only on a
    GPU, and gptlab falls back to fp32 on a CPU without native fp16); returns the undo."""
    import gptlab.distributed
    import gptlab.run

    real_make, real_fast = gptlab.run.make_accelerator, gptlab.distributed.fast_cpu_precision

    def make_accelerator(tc):
        acc = real_make(tc)
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), True
        return acc

    gptlab.run.make_accelerator, gptlab.distributed.fast_cpu_precision = make_accelerator, lambda precision: True

    def undo():
        gptlab.run.make_accelerator, gptlab.distributed.fast_cpu_precision = real_make, real_fast
    return undo


def reads_per_step(run, overrides) -> dict:
    """{optimizer step: (host reads while it ran, where)}, for `run(overrides)` (conftest's run_training).

    A step runs from the start of its first micro-batch to the start of the next step's:
    forward, backward, clip, update, and whatever the loop does after it (log, eval, save).
    """
    import gptlab.run
    from gptlab.data.blocks import TrainOrder

    probe, marks = HostReads(), {}
    real_prepare, real_micro = gptlab.run.prepare_model, TrainOrder.micro_batches

    def prepare_model(accelerator, model, optimizer, parallel):
        model, optimizer = real_prepare(accelerator, model, optimizer, parallel)
        probe.track(model)  # the parameters as the run holds them (FSDP2 makes new ones)
        return model, optimizer

    def micro_batches(self, step):
        marks[step + 1] = (probe.count, Counter(probe.where))
        return real_micro(self, step)

    gptlab.run.prepare_model, TrainOrder.micro_batches = prepare_model, micro_batches
    try:
        with probe:
            run(overrides)
    finally:
        gptlab.run.prepare_model, TrainOrder.micro_batches = real_prepare, real_micro
    marks[max(marks) + 1] = (probe.count, Counter(probe.where))
    steps = sorted(marks)
    return {t: (marks[u][0] - marks[t][0], dict(marks[u][1] - marks[t][1])) for t, u in zip(steps, steps[1:])}


if __name__ == "__main__":  # python tests/host_reads.py OUT [overrides], e.g. under accelerate launch
    import json
    import os
    import sys
    from pathlib import Path

    from conftest import run_training

    counts = reads_per_step(run_training, sys.argv[2:])
    Path(f"{sys.argv[1]}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(counts))
