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
    from gptlab.run import run  # heavy imports after Hydra has validated the config
    from gptlab.errors import GptlabError

    try:
        run(cfg)
    except GptlabError as e:  # the user's to fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        hint = did_you_mean(sys.argv[1:], CONFIG_DIR) if e.code else None  # a misspelt key: its fix
        if hint:
            print(hint, file=sys.stderr)
        raise
