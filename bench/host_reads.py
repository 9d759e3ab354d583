"""Host reads per optimizer step, each a stream sync on a GPU, counted on the CPU for every optimizer.

    python bench/host_reads.py                  # every row; raw results in bench/results/host_reads.json
    python bench/host_reads.py --rows adamw,muon --label after

tests/host_reads.py counts them (see its docstring): `.item()`, `.tolist()`, `bool()`,
`float()`, `.cpu()` of a device tensor, and host-blocking collectives. A debug=smoke run of 8
steps logs every 4 steps; the table gives the reads of each step that does not log (steps 1-3
and 5-7: none is the goal) and of each that does, with where the reads come from. The
2-process row runs under `accelerate launch` over gloo, rank 0's counts.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "bench" / "results" / "host_reads.json"
from common import free_port  # noqa: E402
COMMON = ["debug=smoke", "trainer.max_steps=8", "trainer.log_every=4", "trainer.eval_every=8",
          "trainer.save_every=0", "trainer.sample_prompts=[]"]
ROWS = {
    "adamw": ["optim=adamw"],
    "adam": ["optim=adam"],
    "adafactor": ["optim=adafactor"],
    "muon (default)": ["optim=muon", "scheduler=wsd"],
    "adamw + fp16 scaler": ["optim=adamw", "trainer.mixed_precision=fp16"],
    "muon + fp16 scaler": ["optim=muon", "trainer.mixed_precision=fp16"],
    "muon on 2 processes": ["optim=muon", "trainer.micro_batch_size=2"],
}


def summarise(per_step: dict, log_every: int = 4) -> dict:
    quiet = [n for t, (n, _) in per_step.items() if t % log_every]
    logged = [n for t, (n, _) in per_step.items() if not t % log_every]
    sites = {}
    for t, (_, where) in per_step.items():
        if t % log_every:
            for site, n in where.items():
                sites[site] = sites.get(site, 0) + n
    return {"per_step": {t: n for t, (n, _) in per_step.items()}, "quiet_median": statistics.median(quiet),
            "logged_median": statistics.median(logged), "quiet_sites": sites}


def run_row(name: str, cache: Path) -> dict:
    overrides = [*COMMON, *ROWS[name], f"cache_dir={cache}"]
    if "fp16" in name:  # accelerate makes no GradScaler on a CPU: one is put in, as on a GPU
        from host_reads import cpu_fp16_scaler
        cpu_fp16_scaler()
    if "2 processes" in name:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "reads.json"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_port", str(free_port()), str(ROOT / "tests" / "host_reads.py"), str(out),
                   f"run_dir={tmp}/run", *overrides]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            per_step = {int(t): tuple(v) for t, v in json.loads(Path(f"{out}.rank0").read_text()).items()}
        return summarise(per_step)
    from conftest import run_training
    from host_reads import reads_per_step

    with tempfile.TemporaryDirectory() as tmp:
        return summarise(reads_per_step(run_training, [*overrides, f"run_dir={tmp}/run"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--label", default="after", help="the key these results go under in the JSON (before/after)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as cache:
            print("RESULT " + json.dumps(run_row(args.worker, Path(cache))))
        return
    results = {}
    for name in args.rows.split(","):
        proc = subprocess.run([sys.executable, __file__, "--worker", name], cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name}: {proc.stderr[-3000:]}")
        results[name] = json.loads(line[7:])
        print(name, json.dumps(results[name]), flush=True)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved["command"] = "python bench/host_reads.py --rows ROWS --label LABEL"
    saved.setdefault(args.label, {}).update(results)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"\n| run ({args.label}) | reads per step without a log | reads per logging step | where (steps without a log) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        where = "; ".join(f"{n}x {s}" for s, n in sorted(r["quiet_sites"].items(), key=lambda x: -x[1])[:3]) or "-"
        print(f"| {name} | {r['quiet_median']:g} | {r['logged_median']:g} | {where} |")


if __name__ == "__main__":
    main()
