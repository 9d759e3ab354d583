"""The default run (`python train.py`: the Python corpus, 300 steps), once per arm, side by side
in parallel processes on one thread each: its held-out loss, the second condition for changing
a default (docs/recipes-and-speed.md).

    python bench/default_run.py --arm new= --arm "old=model.tie_embeddings=true,optim.momentum_warmup_steps=0"
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_json_option, split_overrides, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", action="append", required=True, help="NAME=override,override,... (NAME= alone: the "
                   "default as it is)")
    add_json_option(p, "default_run")
    args = p.parse_args()
    arms = {name: split_overrides(extra) for name, _, extra in (a.partition("=") for a in args.arm)}
    with tempfile.TemporaryDirectory() as tmp:
        procs, started = {}, time.perf_counter()
        for name, overrides in arms.items():
            cmd = [sys.executable, str(ROOT / "train.py"), f"run_dir={tmp}/{name}", "trainer.cpu_threads=1", *overrides]
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        results = {}
        for name, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode:
                sys.exit(f"arm {name} failed:\n{err[-3000:]}")
            rows = [json.loads(line) for line in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
            saved = (Path(tmp) / name / ".hydra" / "config.yaml").read_text()
            results[name] = {
                "overrides": arms[name],
                "eval_loss": {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r},
                "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r),
                "wall_s": time.perf_counter() - started, "config": saved}
    write_json(args.json, {"arms": results})
    for name, r in results.items():
        print(f"{name:8s} eval/loss " + " ".join(f"{s}: {v:.4f}" for s, v in r["eval_loss"].items()) +
              f"  {r['tokens_per_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
