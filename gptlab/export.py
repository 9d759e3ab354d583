"""Export a checkpoint in Hugging Face format: `python -m gptlab.export <checkpoint> <dir>`.

<checkpoint> is a checkpoint directory (`run/checkpoints/step_0000100`, `run/checkpoints/best`)
or a run directory, which means its latest complete checkpoint. Full and sharded (FSDP)
checkpoints alike; a sharded one is stitched together in this one process, without a launch.
A LoRA checkpoint is exported with its adapters merged into the base; `--adapter` also writes
the unmerged peft adapter directory to <dir>/adapter (load it with peft's PeftModel.from_pretrained).
"""
import argparse
import logging
import warnings
from pathlib import Path

from .checkpoint_format import (CheckpointError, check_export_destination, export_hf, find_checkpoint, load_adapters,
                            load_weights, part_dir, read_trainer_state, strip_wrappers)
from .lora import is_peft, merged_copy

log = logging.getLogger(__name__)


def load_checkpoint_model(ckpt, merge: bool = True):
    """(model, tokenizer, checkpoint dir) of a checkpoint, or of a run's latest complete one.

    A LoRA checkpoint gives its base with the adapters merged in, or with `merge=False`
    the peft model itself.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .tokenizer import load_tokenizer

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
    from omegaconf import OmegaConf

    from .lora import apply_lora, load_base

    model_cfg = OmegaConf.load(ckpt / "config.yaml").model
    try:
        base = load_base(lora, model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    model = apply_lora(base, model_cfg.lora)
    load_adapters(model, adapters, ckpt)
    return model


def export_checkpoint(ckpt, out_dir, adapter: bool = False) -> Path:
    """Any checkpoint (or a run's latest) as a Hugging Face model directory.

    `adapter`: a LoRA checkpoint's unmerged peft adapter directory too, in out_dir/adapter.
    """
    check_export_destination(out_dir)  # before any work
    model, tokenizer, ckpt = load_checkpoint_model(ckpt, merge=False)
    if adapter and not is_peft(model):
        raise CheckpointError(f"--adapter: {ckpt} is not a LoRA checkpoint (model.lora.r was 0)")
    out = export_hf(model, tokenizer, out_dir)
    if adapter:
        model.save_pretrained(str(out / "adapter"))
        log.info("wrote the unmerged LoRA adapter to %s", out / "adapter")
    log.info("exported %s (step %d) to %s", ckpt, read_trainer_state(ckpt)["step"], out)
    return out


def _read_sharded(path) -> dict:
    """Full tensors from an FSDP checkpoint's per-process shards, read in this one process."""
    import torch
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    weights = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    with warnings.catch_warnings():  # that no_dist means one process is the point here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(weights, checkpoint_id=str(path), no_dist=True)  # stitches the shards together
    return {k.removeprefix("model."): v for k, v in weights.items()}  # accelerate saves {"model": state_dict}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptlab.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("out_dir", help="where to write the Hugging Face model: a new or empty directory, or an "
                                        "earlier gptlab export (which it replaces); never anything else")
    parser.add_argument("--adapter", action="store_true",
                        help="LoRA checkpoints: also write the unmerged peft adapter directory to OUT_DIR/adapter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(name)s] %(message)s")
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.adapter)
    except CheckpointError as e:
        parser.exit(1, f"error: {e}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
