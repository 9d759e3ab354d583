"""The LM head and its loss on GPT-2 124M's shape, three ways: the logits path (the (N, V)
logits, then cross-entropy), gptlab's fused loss, and liger-kernel's fused linear
cross-entropy (Triton) where it imports. Forward plus backward time and peak memory.

    python bench/liger_loss.py                   # on a GPU: 16 x 1024 tokens, C=768, V=50,304, bf16
    python bench/liger_loss.py --tokens 512 --dim 64 --vocab 4096 --dtype fp32   # a CPU (a test runs this)

gptlab trains with its own fused loss on every device; liger is only measured here.
"""
import argparse
import time

from common import add_json_option, print_result, write_json

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def liger_loss():
    """liger's loss module, or None where it does not import (no liger_kernel, no triton, no CUDA)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # ImportError, or triton failing to find a GPU backend
        return None
    return LigerFusedLinearCrossEntropyLoss()


def measure(fn, device, repeats: int) -> dict:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: Triton autotuning, cuBLAS heuristics
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    start = time.perf_counter()
    for _ in range(repeats):
        loss = fn()
    sync()
    ms = (time.perf_counter() - start) / repeats * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda" else None
    return {"ms": ms, "peak_mib": peak, "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16 * 1024, help="rows: batch x sequence")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=10)
    add_json_option(p, "liger_loss")
    args = p.parse_args()

    import torch

    from gptlab.loss import CrossEntropy, cross_entropy_loss, fused_linear_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    g = torch.Generator(device=device).manual_seed(0)
    T = 1024 if args.tokens % 1024 == 0 else args.tokens
    B = args.tokens // T
    h = torch.randn(B, T, args.dim, device=device, generator=g).requires_grad_()  # the final LayerNorm's output
    w = (torch.randn(args.vocab, args.dim, device=device, generator=g) * 0.02).requires_grad_()
    ids = torch.randint(0, args.vocab, (B, T), device=device, generator=g)
    weights = CrossEntropy().token_weights(ids)
    liger = liger_loss() if device.type == "cuda" else None

    def step(loss_of):
        def fn():
            h.grad = w.grad = None
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_of()
            loss.backward()
            return loss.item()
        return fn

    paths = {"logits": step(lambda: cross_entropy_loss(h @ w.t(), ids)),
             "gptlab_fused": step(lambda: fused_linear_loss(h, w, ids, weights))}
    if liger is not None:
        C = args.dim
        paths["liger_fused"] = step(lambda: liger(w, h[:, :-1].reshape(-1, C), ids[:, 1:].reshape(-1)))
    print(f"{device.type} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"{args.tokens} tokens x {args.dim} -> {args.vocab}, {args.dtype}; liger: "
          f"{'measured' if liger is not None else 'not importable here'}", flush=True)
    rows = {name: measure(fn, device, args.repeats) for name, fn in paths.items()}
    base = rows["gptlab_fused"]
    print(f"{'path':14} {'ms fwd+bwd':>11} {'x gptlab':>9} {'peak MiB':>9} {'loss':>9}")
    for name, r in rows.items():
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{name:14} {r['ms']:11.2f} {r['ms'] / base['ms']:9.2f} {peak:>9} {r['loss']:9.5f}")
    result = {"device": device.type, "dtype": args.dtype, "tokens": args.tokens, "dim": args.dim,
              "vocab": args.vocab, "rows": rows, "liger": liger is not None}
    print_result(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
