"""The one run directory every rank agrees on: given, a Hydra multirun job's, or a new
outputs/<experiment>/<timestamp>; claimed by rank 0 with its lock (lock.py)."""
from datetime import datetime
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .errors import ConfigError, RunDirBusyError
from .lock import lock_run_dir


def _hydra_config():
    """Hydra's runtime config under @hydra.main; None when composed by hand (tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hc) -> bool:
    from hydra.types import RunMode
    return hc is not None and hc.mode == RunMode.MULTIRUN


def _claim_new_dir(base: Path) -> Path:
    """Create base, or base_1, base_2, ...: mkdir is the atomic claim, so two launches
    started in the same second (a sweep script, a Hydra multirun) never share a directory."""
    path, n = base, 1
    base.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            path, n = base.with_name(f"{base.name}_{n}"), n + 1


def agree_run_dir(accelerator: Accelerator, run_dir) -> Path:
    """Rank 0 picks (and creates) the run directory; every rank gets the same path.

    Order: `run_dir` if set; in a Hydra multirun, the job's directory under the sweep
    (outputs/multirun/<timestamp>/<job number>); otherwise outputs/<experiment>/<timestamp>.
    """
    hc = _hydra_config()
    multirun = _is_multirun(hc)
    if multirun and accelerator.num_processes > 1:
        raise ConfigError("Hydra multirun (-m) inside a multi-process launch would run the whole sweep on every "
                          "rank; start one `accelerate launch` per job instead (docs/launch.md)")
    chosen = [None]
    if accelerator.is_main_process:
        if run_dir:
            path = Path(run_dir).expanduser().absolute()
            path.mkdir(parents=True, exist_ok=True)
        elif multirun:
            path = Path(hc.runtime.output_dir).absolute()
            path.mkdir(parents=True, exist_ok=True)
        else:
            experiment = (hc.runtime.choices.get("experiment") if hc else None) or "default"
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            path = _claim_new_dir((Path("outputs") / experiment / stamp).absolute())
        try:  # only rank 0 owns the directory; the others learn whether it could
            lock_run_dir(path)
            chosen = [str(path)]
        except RunDirBusyError as e:
            chosen = [e]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    if isinstance(chosen[0], RunDirBusyError):
        raise chosen[0]
    return Path(chosen[0])
