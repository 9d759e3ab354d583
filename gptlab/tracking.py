"""Metrics to TensorBoard and metrics.jsonl, under the same names. Main process only."""
import json
import math
from pathlib import Path


class Tracker:
    def __init__(self, run_dir: Path, tensorboard: bool = True, jsonl: bool = True, enabled: bool = True):
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        if jsonl:
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)

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

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
