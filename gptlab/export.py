"""Export a checkpoint in Hugging Face format: `python -m gptlab.export <checkpoint> <dir>`.

<checkpoint> is a checkpoint directory (`run/checkpoints/step_0000100`, `run/checkpoints/best`)
or a run directory, which means its latest complete checkpoint. Full and sharded (FSDP)
checkpoints alike; a sharded one is stitched together in this one process, without a launch.
"""
import argparse
import logging
import warnings
from pathlib import Path

from .checkpoint import CheckpointError, export_hf, find_checkpoint, read_trainer_state

log = logging.getLogger(__name__)


def load_checkpoint_model(ckpt):
    """(model, tokenizer, checkpoint dir) of a checkpoint, or of a run's latest complete one."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .tokenizer import load_tokenizer

    ckpt = find_checkpoint(ckpt)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(ckpt / "hf_config")))
    if read_trainer_state(ckpt).get("layout") == "sharded":
        weights = _read_sharded(ckpt / "pytorch_model_fsdp_0")
    else:
        weights = load_file(str(ckpt / "model.safetensors"))
    weights = {_strip_wrappers(k): v for k, v in weights.items()}
    params = model.state_dict()
    unexpected = sorted(set(weights) - set(params))
    loaded = {params[k].data_ptr() for k in weights if k in params}
    # Tied weights (GPT-2's LM head is the token embedding) are stored once.
    missing = sorted(k for k in set(params) - set(weights) if params[k].data_ptr() not in loaded)
    if unexpected or missing:
        raise CheckpointError(f"{ckpt}: the weights do not match hf_config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict(weights, strict=False)
    return model, load_tokenizer(ckpt / "tokenizer"), ckpt


def export_checkpoint(ckpt, out_dir) -> Path:
    """Any checkpoint (or a run's latest) as a Hugging Face model directory."""
    model, tokenizer, ckpt = load_checkpoint_model(ckpt)
    out = export_hf(model, tokenizer, out_dir)
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


def _strip_wrappers(key: str) -> str:
    # Accelerate saves the prepared model: DDP adds "module.", torch.compile "_orig_mod.".
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptlab.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("out_dir", help="where to write the Hugging Face model (replaced if it exists)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(name)s] %(message)s")
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except CheckpointError as e:
        parser.exit(1, f"error: {e}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
