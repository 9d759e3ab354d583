"""Metrics to TensorBoard and metrics.jsonl, under the same names. Main process only."""
import json
import math
import os
import time
from pathlib import Path


class Tracker:
    def __init__(self, run_dir: Path, tensorboard: bool = True, jsonl: bool = True, enabled: bool = True,
                 resume_step=None):
        """resume_step: a resumed run continues the logs; what they hold after that step is superseded."""
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
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

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, tag: text}) + "\n")

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
