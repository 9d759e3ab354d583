"""A finished run's model, for the CLIs (generate, evaluate, export): from an HF export, a run
directory, a training checkpoint (full, FSDP-sharded or LoRA) or a Hub id."""
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from .checkpoint_format import find_checkpoint, load_adapters, load_weights, part_dir, read_trainer_state, strip_wrappers
from .errors import CheckpointError
from .hub import is_hub_id, resolve
from .lora import apply_lora, load_base, merged_copy
from .model import never_padded
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def load_checkpoint_model(ckpt, merge: bool = True):
    """(model, tokenizer, checkpoint dir) of a checkpoint, or of a run's latest complete one.

    A LoRA checkpoint gives its base with the adapters merged in, or with `merge=False`
    the peft model itself.
    """
    ckpt = find_checkpoint(ckpt)
    state = read_trainer_state(ckpt)
    if state.get("layout") == "sharded":
        weights = _read_sharded(ckpt / "pytorch_model_fsdp_0")
    else:
        weights = load_file(str(ckpt / "model.safetensors"))
    weights = {strip_wrappers(k): v for k, v in weights.items()}
    if state.get("lora"):
        model = _load_lora(ckpt, state["lora"], weights)
        return (merged_copy(model) if merge else model), load_tokenizer(part_dir(ckpt, "tokenizer")), ckpt
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(part_dir(ckpt, "hf_config"))))
    load_weights(model, weights, ckpt)
    return model, load_tokenizer(part_dir(ckpt, "tokenizer")), ckpt


def _load_lora(ckpt, lora: dict, adapters: dict):
    """The checkpoint's base (by path, checked against its hash) with its trained adapters."""
    model_cfg = OmegaConf.load(ckpt / "config.yaml").model
    try:
        base = load_base(lora, model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    model = apply_lora(base, model_cfg.lora)
    load_adapters(model, adapters, ckpt)
    return model


def _read_sharded(path) -> dict:
    """Full tensors from an FSDP checkpoint's per-process shards, read in this one process."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    weights = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    with warnings.catch_warnings():  # that no_dist means one process is the point here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(weights, checkpoint_id=str(path), no_dist=True)  # stitches the shards together
    return {k.removeprefix("model."): v for k, v in weights.items()}  # accelerate saves {"model": state_dict}


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _is_export(d: Path) -> bool:
    return (d / "config.json").is_file() and any((d / w).is_file() for w in WEIGHTS)


def run_config(path: Path):
    """The resolved config of the run `path` belongs to (a run dir, its final/ or a checkpoint), if any."""
    # a checkpoint's own (trainer_state.json beside it), not a foreign export's config.yaml
    candidates = [path / "config.yaml"] if (path / "trainer_state.json").is_file() or not _is_export(path) else []
    candidates += [d / ".hydra" / "config.yaml" for d in (path, path.parent, path.parent.parent)]
    return next((OmegaConf.load(f) for f in candidates if f.is_file()), None)


@dataclass
class Trained:
    model: object
    tokenizer: object
    tokenizer_dir: Path
    source: Path  # the export or checkpoint directory the weights came from
    run_cfg: object  # the resolved config of the run that made it, or None


def load_trained(path, device: str = "cpu", revision: str | None = None) -> Trained:
    """The model and tokenizer of an HF export, a run dir, a checkpoint dir or a Hub id.

    A run dir means its final/ export, or its latest complete checkpoint if the run did not
    finish; a checkpoint's model is built from its config and loaded with its weights. A Hub
    id is read through the HF cache (offline too, once cached), at `revision` if given.
    """
    if is_hub_id(path):
        path = resolve(str(path), revision, key="path").path
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected an HF export, a run dir, a checkpoint or a "
                                f"Hub id)")
    if not _is_export(path) and _is_export(path / "final"):
        path = path / "final"
    if _is_export(path):
        model, tokenizer = AutoModelForCausalLM.from_pretrained(str(path)), load_tokenizer(path)
    else:  # a training checkpoint, or the latest complete one of a run that did not finish
        try:
            model, tokenizer, path = load_checkpoint_model(path)
        except CheckpointError as e:
            raise FileNotFoundError(f"no model here: no HF export (config.json with weights), no final/, "
                                    f"and {e}") from None
    log.info("loaded %s from %s", type(model).__name__, path)
    return Trained(never_padded(model).eval().to(device), tokenizer, part_dir(path, "tokenizer"), path,
                   run_config(path))
