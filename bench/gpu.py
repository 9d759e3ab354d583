"""GPT-2 124M at T=1024 in bf16 through gptlab's real run(): tokens/s and MFU.

    python bench/gpu.py                       # on a CUDA GPU: the default recipe (Muon), bf16, compiled blocks
    python bench/gpu.py --batch 32 --no-compile --optim adamw
    python bench/gpu.py --tiny                # the same path on a CPU, a toy model (a test runs this)

The tokens are uniform random ids over GPT-2's 50,257 (a throughput bench needs no
text, and the GPU machine has no data); the vocab is padded to 50,304 as for any
from-scratch model. MFU is the loop's own train/mfu: 6N + 12·L·H·Q·T FLOPs per token
over the data-sheet peak (H100: 989 TFLOP/s bf16 dense), or trainer.peak_flops.
"""
import argparse
import json
import tempfile
from pathlib import Path

from common import add_json_option, as_overrides, print_result, run_gptlab, write_json

GPT2_VOCAB = 50257


def model_shape(tiny: bool) -> dict:
    """GPT-2 124M, or the 2-layer, 64-wide model of CPU tests (GPT2Config's names)."""
    return {"n_layer": 2, "n_head": 2, "n_embd": 64} if tiny else {"n_layer": 12, "n_head": 12, "n_embd": 768}


def word_level_tokenizer(vocab_size: int):
    """A tokenizer of `vocab_size` ids with an eos, built in memory: run() saves and samples with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)


def random_tokens(out_dir: Path, vocab_size: int, n_tokens: int, block_size: int, batch: int):
    import numpy as np
    from gptlab.data.blocks import TokenBlocks
    from gptlab.data.prepare import Prepared

    rng = np.random.default_rng(0)
    blocks = {}
    for split, n in (("train", n_tokens), ("valid", block_size * batch)):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(out_dir / f"{split}.bin")
        blocks[split] = TokenBlocks(out_dir / f"{split}.bin", "uint16", block_size)
    return Prepared(word_level_tokenizer(vocab_size), blocks["train"], blocks["valid"], {"cache_dir": str(out_dir)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16, help="micro batch (sequences of --block tokens)")
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=20, help="steps not timed (compilation); also the log interval")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--optim", default="muon", help="the optimizer group (optim=NAME); muon is the default recipe")
    p.add_argument("--loss", default="cross_entropy", help="the loss group (loss=NAME)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model with a 512 vocab, for CPU tests")
    p.add_argument("--override", action="append", default=[], help="any further Hydra override")
    add_json_option(p, "gpu")
    args = p.parse_args()
    if args.steps % args.warmup_steps or args.steps <= args.warmup_steps:
        p.error("--steps must be a larger multiple of --warmup-steps")

    import torch

    vocab = 512 if args.tiny else GPT2_VOCAB
    model = {f"model.{k}": v for k, v in model_shape(args.tiny).items()}
    settings = {**model, "model.n_positions": args.block, "data.block_size": args.block,
                "trainer.micro_batch_size": args.batch, "trainer.mixed_precision": args.precision,
                "trainer.compile": not args.no_compile, "scheduler.warmup_steps": args.warmup_steps}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{device}, torch {torch.__version__}: {json.dumps(settings)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        n_tokens = (args.steps + 1) * args.batch * args.block
        data = random_tokens(Path(tmp), vocab, n_tokens, args.block, args.batch)
        groups = [f"optim={args.optim}", f"loss={args.loss}"]  # named, so a change of default changes no row
        result = run_gptlab(data, [*groups, *as_overrides(settings), *args.override], args.steps, args.warmup_steps)
    # Peak over the whole run (model, optimizer state, activations, the fused loss's chunks).
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    result.update(device=device, settings=settings, optim=args.optim, loss=args.loss, peak_mem_gib=peak)
    print(f"{result['tokens_per_s']:.0f} tokens/s, MFU {result['logged_mfu']:.1%} "
          f"(median of the loop's train/mfu after {args.warmup_steps} steps)"
          + (f", peak memory {peak:.1f} GiB" if peak is not None else ""), flush=True)
    print_result(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
