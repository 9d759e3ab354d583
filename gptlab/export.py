"""Export a checkpoint in Hugging Face format: `python -m gptlab.export <checkpoint> <dir>`.

<checkpoint> is a checkpoint directory (`run/checkpoints/step_0000100`, `run/checkpoints/best`)
or a run directory, which means its latest complete checkpoint. Full and sharded (FSDP)
checkpoints alike; a sharded one is stitched together in this one process, without a launch.
A LoRA checkpoint is exported with its adapters merged into the base; `--adapter` also writes
the unmerged peft adapter directory to <dir>/adapter (load it with peft's PeftModel.from_pretrained).
"""
import argparse
import logging
from pathlib import Path

from .checkpoint_format import CheckpointError, check_export_destination, export_hf, read_trainer_state
from .distributed import is_sharded
from .lora import is_peft
from .trained import load_checkpoint_model

log = logging.getLogger(__name__)


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


def export_final(model, tokenizer, final_checkpoint, out_dir) -> Path:
    """A finished run's (unwrapped) model as a Hugging Face directory. Sharded by FSDP2, it is
    stitched from the final checkpoint's shards, so no process gathers the whole model;
    otherwise written from memory."""
    if is_sharded(model):
        return export_checkpoint(final_checkpoint, out_dir)
    return export_hf(model, tokenizer, out_dir)


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
