"""The Accelerator, the one run directory all ranks agree on, and rank-aware logging."""
import logging
import sys
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list


def resolve_mixed_precision(requested, cuda: bool) -> str:
    if requested == "fp16" and not cuda:  # a GPU setting (seed 002): CPUs emulate fp16 matmuls slowly
        logging.getLogger(__name__).warning("trainer.mixed_precision=fp16 needs a GPU; training in fp32 here")
        return "no"
    if requested is not None:
        return requested
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(trainer_cfg) -> Accelerator:
    # cpu=True is what makes `accelerate launch --multi_gpu --num_processes N` run N
    # CPU processes over gloo when there is no GPU (accelerate 1.15).
    cuda = torch.cuda.is_available()
    return Accelerator(cpu=not cuda, mixed_precision=resolve_mixed_precision(trainer_cfg.mixed_precision, cuda))


def _experiment_name() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get().runtime.choices.get("experiment") or "default"
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return "default"


def agree_run_dir(accelerator: Accelerator, run_dir) -> Path:
    """Rank 0 picks (and creates) the run directory; every rank gets the same path."""
    chosen = [None]
    if accelerator.is_main_process:
        if run_dir:
            path = Path(run_dir).expanduser().absolute()
        else:
            base = Path("outputs") / _experiment_name() / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            path, n = base.absolute(), 1
            while path.exists():  # two runs in the same second, e.g. a Hydra multirun
                path, n = base.absolute().with_name(f"{base.name}_{n}"), n + 1
        path.mkdir(parents=True, exist_ok=True)
        chosen = [str(path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Main process: INFO to the console and run_dir/train.log. Others: warnings only."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
