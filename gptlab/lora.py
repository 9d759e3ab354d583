"""LoRA through peft: adapters on a frozen model, the base they belong to, merging for export.

peft is imported here only, and only once `model.lora.r > 0` asks for it (DESIGN §6): the
other helpers recognise a peft model without importing peft, so the default path and its
start-up time do not change.

The frozen base is never copied into checkpoints. It is referenced by path and by a
SHA-256 of its weights as loaded: `model.pretrained_path`'s directory when the model is
used as stored there (for a Hub id, its snapshot in the HF cache, with the id and the
pinned commit, so that another machine's cache finds it too), otherwise (a model built from
scratch, or embeddings resized to the tokenizer) a one-off `save_pretrained` copy in
`run_dir/lora_base/`.
"""
import copy
import hashlib
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .hub import is_hub_id, resolve

log = logging.getLogger(__name__)

BASE_DIR = "lora_base"


def check_lora_config(lc) -> None:
    """The model.lora.* values alone, before any work (no peft import)."""
    if lc.r < 0:
        raise ConfigError(f"model.lora.r={lc.r} must be >= 0 (0 turns LoRA off)")
    if lc.r == 0:
        return
    if not lc.alpha > 0:
        raise ConfigError(f"model.lora.alpha={lc.alpha} must be > 0: it scales the adapters' output by alpha/r")
    if not 0 <= lc.dropout < 1:
        raise ConfigError(f"model.lora.dropout={lc.dropout} must be in [0, 1)")
    if not lc.target_modules:
        raise ConfigError("model.lora.target_modules=[] names no module to adapt")


def is_peft(model) -> bool:
    peft = sys.modules.get("peft")  # not imported: then it cannot be a peft model
    return peft is not None and isinstance(model, peft.PeftModel)


def base_of(model):
    """The Hugging Face model inside a peft wrapper (its adapter layers still in place); else the model."""
    return model.get_base_model() if is_peft(model) else model


def apply_lora(model, lc):
    """Freeze `model` and wrap it in a peft model with LoRA adapters on `lc.target_modules`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(f"model.lora.r={lc.r} needs peft: pip install peft==0.21.2 (or 'gptlab[lora]')") from None
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    adapted = []
    for name in lc.target_modules:
        hits = [m for path, m in modules.items() if path == name or path.endswith("." + name)]
        if not hits:
            linear = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if isinstance(m, (nn.Linear, Conv1D))})
            raise ConfigError(f"model.lora.target_modules: {type(model).__name__} has no module named {name!r}; "
                              f"its linear layers are named {', '.join(linear)}")
        adapted += hits
    # GPT-2's Conv1D keeps its weight as (in, out), the transpose of nn.Linear's: peft
    # needs fan_in_fan_out to build, merge and save the adapters the right way round.
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in adapted)
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                        fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 still asks transformers 5 for the deprecated is_gradient_checkpointing.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def weights_sha256(model) -> str:
    """A hash of every tensor of the model's state (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _stored_as_is(model, stored, trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(stored), trust_remote_code=trust_remote_code)
    return config.vocab_size == model.get_input_embeddings().num_embeddings


def base_reference(model, model_cfg, stored, run_dir, is_main: bool) -> dict:
    """Where the frozen base of this run lives and its hash; call before apply_lora.

    `stored` is model.pretrained_path's directory (a Hub id's snapshot), or None. A base that
    is not stored anywhere as it is (built from scratch, or resized) is saved once to
    run_dir/lora_base/ by the main process.
    """
    ref = {"r": model_cfg.lora.r, "base_sha256": weights_sha256(model)}
    if stored is not None and _stored_as_is(model, stored, model_cfg.trust_remote_code):
        ref["base_path"] = str(Path(stored).absolute())
        if is_hub_id(model_cfg.pretrained_path):
            ref.update(base_id=model_cfg.pretrained_path, base_revision=model_cfg.revision)
        return ref
    path = Path(run_dir).absolute() / BASE_DIR
    if is_main and not (path / "config.json").is_file():
        model.save_pretrained(str(path))
        log.info("LoRA: the frozen base is not stored anywhere as it is; saved it once to %s", path)
    return {**ref, "base_path": str(path)}


def load_base(ref: dict, trust_remote_code: bool = False):
    """The frozen base a checkpoint's `lora` entry references, checked against its hash."""
    from transformers import AutoModelForCausalLM

    path = Path(ref["base_path"])
    if not (path / "config.json").is_file() and ref.get("base_id"):  # another machine's HF cache: by id
        path = resolve(ref["base_id"], ref.get("base_revision"), key="the LoRA base").path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the LoRA base model {path} is gone: the checkpoint holds only the adapters")
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if weights_sha256(model) != ref["base_sha256"]:
        raise ValueError(f"the LoRA base model {path} has changed since training (its weights' sha256 differs "
                         "from the checkpoint's): these adapters belong to other weights")
    return model


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def only_trainable(models, weights, _output_dir) -> None:
    """accelerate save_state pre-hook: keep only what trains (the adapters) in model.safetensors."""
    for model, state in zip(models, weights):
        keep = set(trainable_names(model))
        for key in [k for k in state if k not in keep]:
            del state[key]


def merged_copy(model):
    """A plain Hugging Face model with the adapters merged into its weights; `model` is left as it is."""
    return copy.deepcopy(model).merge_and_unload()
