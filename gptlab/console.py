"""Logging for a run: INFO lines on the main process's console (above the progress bar) and in
run_dir/train.log, warnings only on the others, and what was logged before the run directory
existed replayed into it."""
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm


class EarlyLogs(logging.Handler):
    """What a run logs before its run directory exists (the optimizer chosen, a warning about the
    config): held, then replayed into train.log by setup_logging, or printed if the run fails first."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []
        root = logging.getLogger()
        self.level_before = root.level
        root.addHandler(self)
        root.setLevel(min(root.level, logging.INFO) or logging.INFO)

    def emit(self, record) -> None:
        self.records.append(record)

    def release(self) -> None:
        """The run failed before its log existed: show the warnings it held, as lines of their own."""
        root = logging.getLogger()
        if self in root.handlers:
            root.removeHandler(self)
            root.setLevel(self.level_before)
            for r in self.records:
                if r.levelno >= logging.WARNING:
                    print(f"warning: {r.getMessage()}", file=sys.stderr)


class ConsoleHandler(logging.StreamHandler):
    """Console lines printed above tqdm's progress bar (cleared, then redrawn), never into it."""

    def emit(self, record) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: Path, is_main: bool, early: EarlyLogs | None = None) -> None:
    """Main process: INFO to the console and run_dir/train.log. Others: warnings only. What the run
    logged before (`early`) comes first."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()  # a multirun's next job must not keep writing the previous job's train.log
    fmt = logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
    handlers = [ConsoleHandler(sys.stderr)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for record in early.records if early is not None else ():
        if record.levelno >= root.level:
            root.handle(record)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def record_failure(message: str, exc_info=None) -> None:
    """Why the run ended, into train.log as well (the console has it already, as train.py prints it):
    nothing of a failure is lost with the terminal."""
    record = logging.LogRecord("gptlab", logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
