"""Train a GPT-2-family model: `accelerate launch train.py [hydra overrides]` or `python train.py`."""
import sys

import hydra
from omegaconf import DictConfig

from gptlab.config import register_configs

register_configs()


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
    main()
