"""Train a GPT-2-family model: `accelerate launch train.py [hydra overrides]` or `python train.py`."""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab.config import did_you_mean, register_configs

register_configs()
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from gptlab.console import record_failure
    from gptlab.errors import GptlabError
    from gptlab.run import run  # heavy imports after Hydra has validated the config

    try:
        run(cfg)
    except GptlabError as e:  # the user's to fix: one line, no traceback
        record_failure(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a bug: its traceback on the console, and in train.log
        record_failure(f"failed: {type(e).__name__}: {e}", sys.exc_info())
        raise


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        hint = did_you_mean(sys.argv[1:], CONFIG_DIR) if e.code else None  # a misspelt key: its fix
        if hint:
            print(hint, file=sys.stderr)
        raise
