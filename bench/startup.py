"""Start-up time: from the command to the first optimizer step, with the data already cached.

    python bench/startup.py                          # python train.py and accelerate launch train.py
    python bench/startup.py --override debug=smoke   # any Hydra overrides for the measured runs

A first run builds the tokenizer and token cache (not timed). Each timed run is then
started as a fresh process; step 1 is the moment its metrics.jsonl gets the row of
step 1 (log_every=1), and the process is stopped there. The stages are the times at
which the run's own log lines appear on stderr. The CPU time (user + system, of every
process of the run) is reported too: on a shared machine, wall time mostly measures
the neighbours.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, add_json_option, write_json
# A log line that starts with this text marks the end of the stage named after it.
STAGES = {"run directory": "imports, Hydra, Accelerator", "data:": "data (cached)",
          "GPT-2 with": "model built", "global batch": "accelerator.prepare", "MFU:": "peak FLOP/s measured"}


def session_cpu_s(sid: int) -> float:
    """User + system CPU seconds of the live processes in session `sid` (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == sid:  # fields from the state on: state ppid pgrp session ...
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def timed_run(cmd: list, run_dir: Path, timeout_s: float) -> dict:
    """Seconds from the command's start to each stage and to step 1's metrics row."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    marks, tail = {}, []

    def read_stderr():
        for line in proc.stderr:
            tail.append(line)
            for prefix, stage in STAGES.items():
                if f"] {prefix}" in line and stage not in marks:
                    marks[stage] = time.perf_counter() - t0

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    metrics = run_dir / "metrics.jsonl"
    try:
        while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
            if proc.poll() is not None:
                sys.exit(f"{' '.join(cmd)} exited with {proc.returncode} before step 1:\n{''.join(tail[-30:])}")
            if time.perf_counter() - t0 > timeout_s:
                sys.exit(f"no step 1 within {timeout_s:.0f} s: {' '.join(cmd)}")
            time.sleep(0.02)
        marks["first optimizer step"] = time.perf_counter() - t0
        # CPU time is what other processes on a shared machine cannot inflate much.
        marks["CPU time to step 1"] = session_cpu_s(proc.pid)
    finally:
        # The run itself is not what is measured. Its own process group: accelerate
        # launch's child goes too.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        reader.join(timeout=5)
    return marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default="~/.cache/gptlab")
    p.add_argument("--override", action="append", default=[], help="Hydra override for every run")
    p.add_argument("--launchers", default="python,accelerate", help="comma-separated: python, accelerate")
    p.add_argument("--timeout", type=float, default=600)
    add_json_option(p, "startup")
    args = p.parse_args()

    bin_dir = Path(sys.executable).parent
    launchers = {"python": [sys.executable, "train.py"],
                 "accelerate": [str(bin_dir / "accelerate"), "launch", "--num_processes", "1", "train.py"]}
    base = [f"cache_dir={Path(args.cache_dir).expanduser()}", "trainer.log_every=1", *args.override]
    with tempfile.TemporaryDirectory() as tmp:
        # Builds (or finds) the tokenizer and the token cache; the timed runs find them ready.
        timed_run(launchers["python"] + base + [f"run_dir={tmp}/warm"], Path(tmp) / "warm", args.timeout)
        results = {}
        for r in range(args.repeats):
            for name in args.launchers.split(","):
                run_dir = Path(tmp) / f"{name}{r}"
                marks = timed_run(launchers[name] + base + [f"run_dir={run_dir}"], run_dir, args.timeout)
                results.setdefault(name, []).append(marks)
                print(f"{name:10s} " + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()), flush=True)
    load = os.getloadavg()[0]
    summary = {"load_average_1min": load, "runs": results, "median_s": {}}
    print(f"\nmedian seconds from the command (load average {load:.1f} on {os.cpu_count()} CPUs):")
    for name, runs in results.items():
        med = {k: statistics.median(m[k] for m in runs if k in m) for k in runs[0]}
        summary["median_s"][name] = med
        print(f"  {name:10s} " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    write_json(args.json, summary)


if __name__ == "__main__":
    main()
