"""Metrics to TensorBoard, metrics.jsonl and any of Accelerate's trackers (W&B, MLflow, Trackio,
Aim), under the same names. Main process only."""
import importlib.util
import json
import math
import os
import time
from pathlib import Path

from .errors import ConfigError

def check_trackers(names) -> None:
    """Before step 1: each tracker's package (its module has the tracker's name) is installed."""
    for name in map(str, names):
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"logger.trackers: {name} needs the {name} package: pip install 'gptlab[{name}]'")


def start_tracker(name: str, run_dir: Path, project: str):
    """An Accelerate tracker for this run, started: the run is named after the run directory."""
    from accelerate import tracking

    if name == "wandb":
        tracker = tracking.WandBTracker(project, name=run_dir.name, dir=str(run_dir))
    elif name == "mlflow":
        tracker = tracking.MLflowTracker(experiment_name=project, run_name=run_dir.name)
    elif name == "trackio":
        tracker = tracking.TrackioTracker(project, name=run_dir.name)
    else:
        tracker = tracking.AimTracker(run_dir.name, logging_dir=str(run_dir))
    tracker.start()
    return tracker


class Tracker:
    def __init__(self, run_dir: Path, tensorboard: bool = True, jsonl: bool = True, enabled: bool = True,
                 resume_step=None, trackers=(), project: str = "gptlab", config: dict | None = None):
        """resume_step: a resumed run continues the logs; what they hold after that step is superseded.
        trackers: Accelerate's, by name, each given the flattened `config` as its run's parameters
        (a resumed run is a new run there)."""
        self.writer = None
        self.jsonl = None
        self.extra = {}
        if not enabled:
            return
        run_dir = Path(run_dir)
        for name in trackers:
            self.extra[name] = start_tracker(str(name), run_dir, project)
            self.extra[name].store_init_configuration(flat_hparams(config or {}))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            purge_step = None
            if resume_step is not None:
                _wait_for_a_later_event_file_name(run_dir / "tb")
                purge_step = resume_step + 1  # TensorBoard hides events at this step and later from earlier files
            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)
        if jsonl:
            if resume_step is not None:
                supersede_jsonl(run_dir / "metrics.jsonl", resume_step)
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if self.jsonl:
            row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
            self.jsonl.write(json.dumps(row) + "\n")
        for tracker in self.extra.values():
            tracker.log(metrics, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, tag: text}) + "\n")
        if "wandb" in self.extra:
            self.extra["wandb"].log_table(tag, columns=["step", "text"], data=[[step, text]], step=step)
        if "mlflow" in self.extra:
            import mlflow

            mlflow.log_text(text, f"{tag}/step_{step:07d}.txt")

    def hparams(self, config: dict, metrics: dict) -> None:
        """The resolved config and the run's final metrics, for TensorBoard's HParams tab
        (the Lightning convention): each run's own event file says which settings gave
        which final eval/loss, so several runs compare in one table. The metric values
        are the scalars of the same names that the run already logged."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(flat_hparams(config), dict(metrics)):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def close(self) -> None:
        for tracker in self.extra.values():
            tracker.finish()
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; HParams takes numbers, strings and bools."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix + key] = value
        else:  # None and lists, as they read in the config
            flat[prefix + key] = json.dumps(value, ensure_ascii=False)
    return flat


def supersede_jsonl(path: Path, step: int) -> None:
    """Keep the rows up to `step`; drop later ones and a line cut short by a kill. Atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _wait_for_a_later_event_file_name(tb_dir: Path) -> None:
    """TensorBoard reads event files in name order, and names start with whole seconds:
    a run resumed within the second its predecessor started must not sort before it."""
    stamps = [int(p.name.split(".")[3]) for p in tb_dir.glob("events.out.tfevents.*")
              if p.name.split(".")[3].isdigit()]
    if stamps and time.time() < max(stamps) + 1:
        time.sleep(max(stamps) + 1 - time.time())
