"""Seed 002's streamed keyword filter: peak memory and disk against the size of the unfiltered source.

    python bench/stream_filter.py                     # sources of 40 and 160 MB, streamed and not
    python bench/stream_filter.py --sizes 40,160,640

A local dataset repository shaped like transformersbook/codeparrot-train (json-lines shards
under data/, one `content` column, about 3% of the files using the data-science stack) is
read by experiment=codeparrot's data stage (gptlab.data.prepare: read, keyword filter, split,
tokenize with GPT-2's tokenizer, pack into 128-token chunks), once with data.streaming=true
and once without. Each run is its own process, so its peak RSS is its own; "cache MB" is what
the run wrote under its cache directory (the converted Arrow copy, when not streaming, and the
token cache). Raw results: bench/results/stream_filter.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_json_option, compose, write_json

SHARED = ROOT.parent / "shared" / "data"
SHARD_MB = 20


def write_repo(root: Path, megabytes: int) -> int:
    """data/train-*.jsonl shards of Python-like files; every 33rd imports pandas (the filter keeps it)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    bodies = [p.read_text(encoding="utf-8", errors="replace")[:6000] for p in sorted(stdlib.glob("*.py"))[:200]]
    (root / "data").mkdir(parents=True)
    written, i, shard = 0, 0, 0
    n_shards = max(1, megabytes // SHARD_MB)
    while shard < n_shards:
        with open(root / "data" / f"train-{shard:05d}-of-{n_shards:05d}.jsonl", "w") as f:
            while f.tell() < SHARD_MB * 2**20 * min(1, megabytes / SHARD_MB):
                head = "import pandas as pd\nimport matplotlib.pyplot as plt\n" if i % 33 == 0 else "import os\n"
                f.write(json.dumps({"content": head + bodies[i % len(bodies)], "repo_name": f"r{i}"}) + "\n")
                i += 1
            written += f.tell()
        shard += 1
    return written


def run_variant(repo: Path, valid: Path, streaming: bool, work: Path) -> dict:
    from gptlab.data.prepare import prepare

    cfg = compose(["experiment=codeparrot", f"data.builder={repo}", f"data.valid_builder={valid}",
                   f"data.streaming={str(streaming).lower()}", f"tokenizer.path={SHARED / 'tokenizers' / 'gpt2'}"])
    t0 = time.perf_counter()
    data = prepare(cfg, work / "cache", show_progress=False)
    seconds = time.perf_counter() - t0
    cache_bytes = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
    return {"streaming": streaming, "seconds": seconds, "kept": data.info["split"]["train"]["kept"],
            "documents": data.info["split"]["train"]["documents"], "train_chunks": len(data.train),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cache_mb": cache_bytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="40,160", help="source sizes in MB")
    add_json_option(ap, "stream_filter")
    ap.add_argument("--worker", nargs=4, metavar=("REPO", "VALID", "STREAMING", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        repo, valid, streaming, work = args.worker
        print("RESULT " + json.dumps(run_variant(Path(repo), Path(valid), streaming == "1", Path(work))))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        valid = tmp / "valid"
        (valid / "data").mkdir(parents=True)
        (valid / "data" / "validation-00000-of-00001.jsonl").write_text(
            "".join(json.dumps({"content": "import pandas as pd\n" + "x = 1\n" * 40}) + "\n" for _ in range(200)))
        for mb in [int(s) for s in args.sizes.split(",")]:
            repo = tmp / f"repo{mb}"
            source_mb = write_repo(repo, mb) / 2**20
            for streaming in (True, False):
                work = tmp / f"work{mb}{streaming}"
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                out = subprocess.run([sys.executable, __file__, "--worker", str(repo), str(valid),
                                      "1" if streaming else "0", str(work)], capture_output=True, text=True, env=env,
                                     cwd=ROOT / "bench")
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(out.stderr[-3000:])
                rows.append({"source_mb": source_mb, **json.loads(line[7:])})
                print(json.dumps(rows[-1]), flush=True)
    write_json(args.json, {"rows": rows})
    print("\n| source MB | streaming | kept / read documents | seconds | peak RSS MB | written to cache MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source_mb']:.0f} | {'yes' if r['streaming'] else 'no'} | {r['kept']} / {r['documents']} | "
              f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['cache_mb']:.1f} |")


if __name__ == "__main__":
    main()
