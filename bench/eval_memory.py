"""Peak memory of one evaluation batch against one training step, GPT-2 124M at T=1024, B=8.

    python bench/eval_memory.py            # raw results: bench/results/eval_memory.json

Each arm runs in its own process; its figure is the peak RSS (CPU) or max_memory_allocated
(GPU) above what the model, its gradients' absence and the batch already take:
  train        forward, backward and a fused AdamW step of gptlab's training step (the LM head
               fused into the loss, chunk by chunk)
  eval         gptlab.evaluate's batch: the final hidden states, then the token losses from the
               LM head a chunk of rows at a time, no KV cache
  eval_logits  the evaluation as it was: model(input_ids).logits, (B, T, V) in fp32, then the
               cross-entropy over them (and a KV cache, as an HF forward builds by default)
The goal: evaluation never peaks above a training step.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

from common import add_json_option, write_json
ARMS = ("train", "eval", "eval_logits")


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_arm(arm: str, batch: int, block: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab.loss import CrossEntropy, _token_ce
    from gptlab.model import CAUSAL_SDPA, forward_loss, token_losses

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = GPT2Config(n_positions=block)
    config._attn_implementation = CAUSAL_SDPA
    model = GPT2LMHeadModel(config).to(device)
    x = torch.randint(0, config.vocab_size, (batch, block), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base, t0 = peak_mb(device), time.perf_counter()
    if arm == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        forward_loss(model.train(), x, CrossEntropy()).backward()
        opt.step()
        value = None
    else:
        model.eval()
        with torch.no_grad():
            ce = token_losses(model, x) if arm == "eval" else _token_ce(model(input_ids=x).logits, x)
        value = ce.double().mean().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"arm": arm, "device": str(device), "seconds": time.perf_counter() - t0, "base_mb": base,
            "peak_mb": peak_mb(device), "above_base_mb": peak_mb(device) - base, "eval_loss": value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=1024)
    add_json_option(ap, "eval_memory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_arm(args.worker, args.batch, args.block)))
        return
    rows = []
    for arm in ARMS:
        proc = subprocess.run([sys.executable, __file__, "--worker", arm, "--batch", str(args.batch), "--block",
                               str(args.block)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{arm}: {proc.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.json, {"rows": rows})
    train = rows[0]["above_base_mb"]
    print(f"\n| arm (GPT-2 124M, B={args.batch}, T={args.block}, {rows[0]['device']}) | peak above the model MB | "
          f"x the training step | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['above_base_mb']:.0f} | {r['above_base_mb'] / train:.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
