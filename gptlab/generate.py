"""Text generation: what the trainer samples with, and `python -m gptlab.generate`.

    python -m gptlab.generate outputs/tolstoy_scratch/<timestamp> --prompt "Пьер закашлялся и"
"""
import argparse
import json
import logging
import sys
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path

import torch

from .config import GenerateConfig
from .model import never_padded
from .trained import load_trained

log = logging.getLogger(__name__)


def sampling_kwargs(gen_cfg) -> dict:
    """HF `generate` keyword arguments from a GenerateConfig (dataclass or DictConfig)."""
    kw = {f.name: gen_cfg[f.name] if hasattr(gen_cfg, "keys") else getattr(gen_cfg, f.name)
          for f in fields(GenerateConfig)}
    if kw["max_length"] is None:
        kw.pop("max_length")
    if not kw["do_sample"]:  # these only shape sampling; HF warns when they come with greedy/beam search
        for k in ("temperature", "top_k", "top_p"):
            kw.pop(k)
    return kw


def _sharded(model) -> bool:
    # An FSDP2 model gathers each block's weights from every rank at every forward: all
    # ranks generate together, and one that hits EOS first keeps stepping until all are done.
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule) and torch.distributed.get_world_size() > 1


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 48, seed: int = 0, **sampling) -> list[str]:
    """Prompt plus continuation, one string per returned sequence.

    The tokenizer's own decoder turns byte-level BPE back into UTF-8, so Cyrillic comes
    out as text, not as `Ð`-bytes. The global RNG is restored afterwards: sampling in
    the middle of training must not change what the training run draws next.
    """
    never_padded(model)  # the prompt's mask says it is not padded; transformers drops an all-ones mask
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    if enc["input_ids"].shape[1] == 0:  # an empty prompt starts from the document separator
        enc["input_ids"] = torch.tensor([[tokenizer.eos_token_id]], device=device)
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        length = {} if "max_length" in sampling else {"max_new_tokens": max_new_tokens}  # max_length wins
        out = model.generate(**enc, **length, pad_token_id=pad, synced_gpus=_sharded(model),
                             **({"do_sample": True, "top_k": 50} | sampling))
    model.train(was_training)
    # The prompt as given, then the continuation (as HF's text-generation pipeline does): a
    # tokenizer that does not decode back to its input (seeds 000/001's whitespace BPE joins
    # tokens with spaces) still shows the prompt the user wrote.
    decode = partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    shown = len(decode(enc["input_ids"][0]))
    return [prompt + decode(seq)[shown:] for seq in out]


def log_samples(model, tokenizer, prompts, step: int, tracker, max_new_tokens: int, seed: int, gen_cfg) -> list:
    """Generate for each prompt and log it as text `sample/<i>` (TensorBoard and metrics.jsonl)."""
    texts = []
    for i, prompt in enumerate(prompts):
        text = "\n---\n".join(generate(model, tokenizer, prompt, max_new_tokens, seed, **sampling_kwargs(gen_cfg)))
        tracker.text(f"sample/{i}", text, step)
        log.info("sample for %r at step %d:\n%s", prompt, step, text)
        texts.append(text)
    return texts


def read_prompts(path: str) -> list[str]:
    """A .json file holds a list of strings (prompts with newlines); any other file one prompt per line."""
    p = Path(path)
    if p.suffix == ".json":
        prompts = json.loads(p.read_text(encoding="utf-8"))
        if not (isinstance(prompts, list) and all(isinstance(x, str) for x in prompts)):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return prompts
    return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gptlab.generate", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("path", help="a run dir (its final/ or latest checkpoint), a checkpoint dir, an HF export "
                                 "or a Hub id (through the HF cache)")
    ap.add_argument("--revision", help="of a Hub id: a branch, tag or commit")
    ap.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    ap.add_argument("--prompts_file", help="a .json list of prompts, or a text file with one prompt per line")
    ap.add_argument("--max_new_tokens", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print a JSON list of {prompt, samples}")
    # Sampling options default to the run's `generate:` config, else to GenerateConfig.
    ap.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top_k", type=int)
    ap.add_argument("--top_p", type=float)
    ap.add_argument("--num_beams", type=int)
    ap.add_argument("--num_return_sequences", type=int)
    ap.add_argument("--repetition_penalty", type=float)
    ap.add_argument("--max_length", type=int, help="tokens in all, prompt included; replaces --max_new_tokens")
    return ap


def main(argv=None) -> list:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    trained = load_trained(args.path, args.device, args.revision)
    model, tokenizer, run_cfg = trained.model, trained.tokenizer, trained.run_cfg
    gen = asdict(GenerateConfig())
    if run_cfg is not None and "generate" in run_cfg:
        gen.update({k: run_cfg.generate[k] for k in gen if k in run_cfg.generate})
    gen.update({k: getattr(args, k) for k in gen if getattr(args, k) is not None})
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts and run_cfg is not None:
        prompts = list(run_cfg.trainer.get("sample_prompts", []))
    if not prompts:
        sys.exit("give --prompt TEXT or --prompts_file FILE")
    if gen["num_return_sequences"] > 1 and not gen["do_sample"] and gen["num_return_sequences"] > gen["num_beams"]:
        sys.exit(f"--num_return_sequences={gen['num_return_sequences']} needs --do_sample or at least as many "
                 "--num_beams")
    results = [{"prompt": p, "samples": generate(model, tokenizer, p, args.max_new_tokens, args.seed,
                                                 **sampling_kwargs(gen))} for p in prompts]
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    else:
        for i, r in enumerate(results):
            for j, text in enumerate(r["samples"]):
                print(f"=== prompt {i + 1}, sample {j + 1} ===\n{text}\n")
    return results


if __name__ == "__main__":
    main()
