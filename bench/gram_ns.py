"""Muon's fp32 Newton–Schulz: the Gram iteration for wide matrices against the textbook one.

In fp32 gptlab runs Newton–Schulz for a matrix at least twice as wide as tall (the MLP's) on
its Gram matrix (gptlab.muon._gram_newton_schulz): the same polynomial in 44% fewer FLOPs.
This script measures what that gives, in one process, one torch thread:
- Newton–Schulz alone on the time-to-quality model's matrices as the default gives them to
  Muon (4 layers × Q, K, V, attn c_proj, c_fc, mlp c_proj), 5 iterations, best of `--repeats`;
- the default recipe's tokens/s at that size (bench/time_to_quality.py's data and shape), the
  two iterations alternated over `--rounds` rounds (ABBA...), so drift hits both alike.
`--isa avx2` computes as an AVX2-only CPU would (see time_to_quality.py): fp32 is then what
Muon runs on such a CPU.

    python bench/gram_ns.py --isa avx2 --json bench/results/gram_ns_avx2.json
    python bench/gram_ns.py --tiny --steps 2 --rounds 1     # the CI-sized run
"""
import argparse
import statistics
from types import SimpleNamespace

import torch

from common import ISA_ENV, add_json_option, cap_isa, write_json
from ns_precision import default_tokens_per_s, newton_schulz_s
from time_to_quality import SHAPE, TINY, WAR_AND_PEACE, load_data

VARIANTS = ("gram", "textbook")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per run, after 4 untimed ones")
    p.add_argument("--rounds", type=int, default=3, help="runs of each iteration, alternated")
    p.add_argument("--repeats", type=int, default=5, help="Newton-Schulz alone: the best of this many")
    p.add_argument("--isa", choices=sorted(ISA_ENV), help="compute as a CPU with only this instruction set")
    p.add_argument("--text", default=str(WAR_AND_PEACE))
    p.add_argument("--cache-dir", default="~/.cache/gptlab")
    p.add_argument("--tiny", action="store_true", help="the 2-layer, 32-wide model (the CI-sized run)")
    add_json_option(p, "gram_ns")
    args = p.parse_args()
    cap_isa(args.isa)
    import gptlab.distributed
    import gptlab.muon

    gptlab.distributed.fast_cpu_precision = lambda precision: False  # Newton-Schulz in fp32 on any CPU
    torch.set_num_threads(1)
    shape = TINY if args.tiny else SHAPE
    gram = gptlab.muon._gram_newton_schulz

    def use(variant: str) -> None:
        gptlab.muon._gram_newton_schulz = gram if variant == "gram" else gptlab.muon._newton_schulz

    ns_s = {}
    for variant in VARIANTS:
        use(variant)
        ns_s[variant] = newton_schulz_s(shape, torch.float32, args.repeats, qkv_pieces=3)
    data = load_data(SimpleNamespace(tiny=args.tiny, text=args.text, cache_dir=args.cache_dir, worker=False))
    rates = {variant: [] for variant in VARIANTS}
    for i in range(args.rounds):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            use(variant)
            rates[variant].append(default_tokens_per_s(data, shape, args.steps, 4))
    median = {variant: statistics.median(r) for variant, r in rates.items()}
    write_json(args.json, {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "steps": args.steps,
                           "newton_schulz_s": ns_s, "tokens_per_s": rates, "median_tokens_per_s": median})
    print(f"{torch.backends.cpu.get_cpu_capability()} kernels, one thread, fp32 Newton-Schulz")
    print(f"{'iteration':10s} {'NS alone, s':>11s} {'default tok/s (median)':>23s}   runs")
    for variant in VARIANTS:
        print(f"{variant:10s} {ns_s[variant]:11.3f} {median[variant]:23.0f}   "
              + " ".join(f"{r:.0f}" for r in rates[variant]))
    print(f"gram / textbook: Newton-Schulz {ns_s['gram'] / ns_s['textbook']:.2f}x the time, "
          f"the step {median['gram'] / median['textbook']:.3f}x the tokens/s")


if __name__ == "__main__":
    main()
