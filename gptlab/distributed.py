"""The Accelerator and how the model is wrapped (DDP, DataParallel or FSDP2): decided here, and
checked after `prepare`."""
import logging
import os
import time

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from .errors import ConfigError

log = logging.getLogger(__name__)


def fast_cpu_precision(precision: str) -> bool:
    """Whether this CPU has native matmul for the dtype; otherwise torch emulates it."""
    if precision == "bf16":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if precision == "fp16":
        return torch.cpu._is_amx_fp16_supported()
    return False


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matmul is native on `device`: a GPU with bf16 tensor cores (compute capability
    8.0 and later; a V100 emulates it), a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return fast_cpu_precision("bf16")


def resolve_mixed_precision(requested, cuda: bool) -> str:
    """The run's precision. Unset: bf16 on a GPU with bf16 tensor cores (compute capability 8.0
    and later), fp16 with a GradScaler on 7.x (V100, T4), fp32 below and on a CPU.
    torch.cuda.is_bf16_supported() is no guide: it counts emulation, so it says yes on a V100."""
    if not cuda:
        # GPU settings (seed 002 asks for fp16) still run here: a CPU without native fp16/bf16
        # matmul emulates it, ~70x slower than fp32 on this project's AVX2 machine.
        if requested in ("fp16", "bf16") and not fast_cpu_precision(requested):
            log.warning("trainer.mixed_precision=%s: this CPU has no native %s matmul (emulated, ~70x slower); "
                        "training in fp32 here", requested, requested)
            return "no"
        return requested or "no"
    major, minor = torch.cuda.get_device_capability()
    if requested is None:
        return "bf16" if major >= 8 else "fp16" if major >= 7 else "no"
    if requested == "bf16" and major < 8:
        log.warning("trainer.mixed_precision=bf16 on %s (compute capability %d.%d), which has no bf16 tensor cores: "
                    "emulated, slower than fp32; trainer.mixed_precision=fp16 uses its fp16 tensor cores",
                    torch.cuda.get_device_name(), major, minor)
    return requested


def end_processes(accelerator: Accelerator) -> None:
    """accelerator.end_training(), once gloo has retired the run's last collective.

    gloo's worker thread frees a finished collective's work only after its caller has
    returned, and the free takes the GIL (the work holds tensors Python owns). The process
    group's destructor, run when the DDP wrapper is freed right after this, joins that
    thread while holding the GIL. A rank with little to do after its last collective (any
    rank but the one that exports) can get there within the GIL's 5 ms switch interval, and
    then hangs for good: 1 in 60 runs of a bare 2-process DDP script on this CPU, and a
    SLURM test's job. Sleeping hands the worker the GIL first.
    """
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        settle_gloo()
    accelerator.end_training()


def settle_gloo() -> None:
    """Hand gloo's worker thread the GIL to free the last collective's work (end_processes)."""
    time.sleep(0.3)


def make_accelerator(trainer_cfg) -> Accelerator:
    # cpu=True is what makes `accelerate launch --multi_gpu --num_processes N` run N
    # CPU processes over gloo when there is no GPU (accelerate 1.15).
    cuda = torch.cuda.is_available()
    fsdp = fsdp_plugin(trainer_cfg.parallel, cuda)
    accelerator = Accelerator(cpu=not cuda, fsdp_plugin=fsdp,
                              mixed_precision=resolve_mixed_precision(trainer_cfg.mixed_precision, cuda))
    check_parallel(trainer_cfg.parallel, accelerator.num_processes)
    if fsdp is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _shard_on_cpu(accelerator, fsdp)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(trainer_cfg.cpu_threads or cpu_threads_per_process())
    return accelerator


def cpu_threads_per_process() -> int:
    """The physical cores shared by the processes on this machine: more threads than cores
    only spin, and accelerate launch would leave a lone CPU process a single thread."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def fsdp_asked() -> bool:
    """Whether the launch asked for FSDP (`accelerate launch --config_file launch/accelerate/fsdp.yaml`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin(parallel: str, cuda: bool):
    """The launch's FSDP settings, checked before any work; None when it did not ask for FSDP."""
    if not fsdp_asked():
        return None
    if parallel == "dp":
        raise ConfigError("trainer.parallel=dp with an FSDP launch: FSDP shards over processes, DataParallel "
                          "runs one; use trainer.parallel=ddp (the default) with launch/accelerate/fsdp.yaml")
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
    if plugin.fsdp_version != 2 and not cuda:
        raise ConfigError(f"fsdp_version {plugin.fsdp_version} needs a GPU (FSDP1 crashes on a CPU); "
                          f"set fsdp_version: 2 as in launch/accelerate/fsdp.yaml")
    return plugin


def _shard_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Make accelerate's FSDP2 path run on CPU processes over gloo.

    Accelerator(cpu=True) keeps MULTI_CPU (plain DDP) without a word when the launch asks
    for FSDP (accelerate 1.15); fully_shard itself works over gloo, and so does accelerate's
    FSDP2 code once its state says FSDP. This is what lets CI test real sharding.
    """
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # Both shared states: each later AcceleratorState() copies PartialState's type over its own.
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def check_auto_wrap(accelerator: Accelerator, model) -> None:
    """Before prepare: every auto-wrap class the launch names is a module class of this model."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    if not accelerator.is_fsdp2:
        return
    names = accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap or []
    missing = [n for n in names if get_module_class_from_name(model, n) is None]
    if missing:
        raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap={','.join(missing)}: {type(model).__name__} has no "
                          f"such module; its blocks are {', '.join(getattr(model, '_no_split_modules', None) or [])}")


def prepare_model(accelerator: Accelerator, model, optimizer, parallel: str):
    """accelerator.prepare with the wrapping asked for, then asserted: accelerate can fall back silently."""
    check_auto_wrap(accelerator, model)
    model, optimizer = accelerator.prepare(wrap_parallel(model, parallel), optimizer)
    check_wrapped(accelerator, model)
    return model, optimizer


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def check_wrapped(accelerator: Accelerator, model) -> None:
    from torch.distributed.tensor import DTensor

    if not fsdp_asked():
        if accelerator.num_processes > 1 and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(f"{accelerator.num_processes} processes but the model is not wrapped in DDP "
                               f"({type(model).__name__}, {accelerator.distributed_type})")
        return
    # Right after prepare every parameter of an FSDP2 model is a sharded DTensor (a forward
    # without a backward, as in evaluation, leaves the root's gathered until the next one).
    params = list(model.parameters())
    if not (is_sharded(model) and all(isinstance(p, DTensor) for p in params)):
        raise RuntimeError(f"the launch asked for FSDP but the model is not sharded ({type(model).__name__}, "
                           f"{accelerator.distributed_type}); refusing to train it unsharded")
    log.info("FSDP2: %d of %d parameter values on this process, %d DTensors sharded over %d process(es)",
             sum(p.to_local().numel() for p in params), sum(p.numel() for p in params), len(params),
             accelerator.num_processes)


def check_parallel(parallel: str, num_processes: int) -> None:
    if parallel == "dp" and num_processes > 1:
        raise ConfigError(f"trainer.parallel=dp runs ONE process over all local GPUs, but this launch started "
                          f"{num_processes}; use `python train.py` or `accelerate launch --num_processes 1`, "
                          f"or trainer.parallel=ddp")


class DataParallelLM(torch.nn.DataParallel):
    """torch.nn.DataParallel for a Hugging Face causal LM.

    Asks the model for no KV cache: DataParallel gathers every output of every
    replica, and a cache object cannot be gathered (training has no use for it anyway).
    """

    def forward(self, *inputs, **kwargs):
        kwargs.setdefault("use_cache", False)
        return super().forward(*inputs, **kwargs)


def wrap_parallel(model, parallel: str):
    """trainer.parallel=dp: the legacy single-process DataParallel; ddp needs no wrapping here
    (accelerator.prepare does it when the launch has several processes)."""
    if parallel != "dp":
        return model
    gpus = torch.cuda.device_count()
    if gpus == 0:
        log.info("trainer.parallel=dp without a GPU: DataParallel passes each batch straight to the model")
    else:
        log.info("trainer.parallel=dp: DataParallel splits each micro batch over %d GPU(s) in one process "
                 "(legacy; DDP through `accelerate launch --multi_gpu` is faster)", gpus)
    return DataParallelLM(model)
