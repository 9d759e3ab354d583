"""Data preparation speed and memory: gptlab's prepare vs the seed's `datasets` way vs a
bare `encode_batch` pass, side by side, each variant in its own process so that its
peak RSS is its own.

    python bench/prep.py                                  # War and Peace, ruGPT-3 tokenizer
    python bench/prep.py --fractions 0.25,1 --repeat 3    # does memory grow with the corpus?
    python bench/prep.py --file my.txt --tokenizer DIR --max-bytes 100000

Variants (the same file and tokenizer; tokenizer loading is outside the timing except
for gptlab, whose prepare() loads it itself):
  encode         the file's lines through the Rust tokenizer's encode_batch, 1000 at a time;
                 ids counted and dropped: the tokenizer's own speed
  seed           datasets.load_dataset("text") + map(tokenize) + map(group_texts) (block 128),
                 with a fresh datasets cache: the seeds' way
  gptlab         gptlab.data.prepare on data=text (paragraphs, 1% validation), fresh cache
  gptlab_cached  the same prepare() again on the cache the previous variant built
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_json_option, write_json

SHARED = ROOT.parent / "shared" / "data"
VARIANTS = ("encode", "seed", "gptlab", "gptlab_cached")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def run_variant(variant: str, path: Path, tokenizer_dir: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from gptlab.tokenizer import load_tokenizer

    if variant == "encode":
        backend = load_tokenizer(tokenizer_dir).backend_tokenizer
        base, t0 = _rss_mb(), time.perf_counter()
        tokens = 0
        with open(path, encoding="utf-8") as f:
            lines = []
            for line in f:
                lines.append(line)
                if len(lines) == 1000:
                    tokens += sum(len(e.ids) for e in backend.encode_batch(lines, add_special_tokens=False))
                    lines = []
            tokens += sum(len(e.ids) for e in backend.encode_batch(lines, add_special_tokens=False))
    elif variant == "seed":
        import datasets
        datasets.disable_progress_bars()
        tok = load_tokenizer(tokenizer_dir)
        block = 128

        def group_texts(examples):  # transformers' run_clm.py
            concat = {k: sum(examples[k], []) for k in examples}
            total = len(concat["input_ids"]) // block * block
            return {k: [v[i:i + block] for i in range(0, total, block)] for k, v in concat.items()}

        base, t0 = _rss_mb(), time.perf_counter()
        ds = datasets.load_dataset("text", data_files=str(path), split="train", cache_dir=str(work / "hf"))
        ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
        ds = ds.map(group_texts, batched=True)
        tokens = len(ds) * block
    else:
        from hydra import compose, initialize_config_dir
        from gptlab.config import register_configs
        from gptlab.data.prepare import prepare

        register_configs()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", ["data=text", f"data.files=[{path}]", "data.valid_fraction=0.01",
                                     f"tokenizer.path={tokenizer_dir}", "data.block_size=128"])
        base, t0 = _rss_mb(), time.perf_counter()
        data = prepare(cfg, work / "cache", show_progress=False)
        tokens = data.info["train"]["tokens"] + data.info["valid"]["tokens"]
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    return {"variant": variant, "bytes": size, "seconds": seconds, "mb_per_s": size / 1e6 / seconds,
            "tokens": tokens, "base_rss_mb": base, "peak_rss_mb": _peak_rss_mb()}


def slice_file(src: Path, max_bytes: int, out: Path) -> Path:
    """The first max_bytes of src, cut at a line end so no character is split."""
    data = src.read_bytes()
    if max_bytes and len(data) > max_bytes:
        data = data[:data.rfind(b"\n", 0, max_bytes) + 1]
    out.write_bytes(data)
    return out


def measure(variant, path, tokenizer_dir, work) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--file", str(path),
                           "--tokenizer", str(tokenizer_dir), "--work", str(work)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, default=SHARED / "tolstoy" / "war_and_peace.txt")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "rugpt3")
    ap.add_argument("--max-bytes", type=int, default=0, help="use only the first N bytes (0: all)")
    ap.add_argument("--fractions", default="1", help="corpus sizes as fractions of the file, e.g. 0.25,1")
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant; the fastest is reported")
    add_json_option(ap, "prep")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.file, args.tokenizer, args.work)))
        return

    with tempfile.TemporaryDirectory(prefix="gptlab_bench_") as tmp:
        tmp = Path(tmp)
        full = slice_file(args.file, args.max_bytes, tmp / "full.txt").stat().st_size
        rows = []
        for fraction in (float(f) for f in args.fractions.split(",")):
            path = slice_file(tmp / "full.txt", int(full * fraction) if fraction < 1 else 0, tmp / f"{fraction}.txt")
            best = {}
            for r in range(args.repeat):  # interleaved, so load changes hit every variant alike
                work = tmp / f"work{fraction}_{r}"
                for variant in VARIANTS:
                    res = measure(variant, path, args.tokenizer, work)
                    if variant not in best or res["seconds"] < best[variant]["seconds"]:
                        best[variant] = res
                shutil.rmtree(work, ignore_errors=True)
            for variant in VARIANTS:
                rows.append({"fraction": fraction, **best[variant]})
    write_json(args.json, {"file": args.file.name, "tokenizer": args.tokenizer.name, "repeat": args.repeat,
                           "rows": rows})
    enc = {r["fraction"]: r["mb_per_s"] for r in rows if r["variant"] == "encode"}
    print(f"file: {args.file.name} ({full / 1e6:.2f} MB), tokenizer: {args.tokenizer.name}, "
          f"best of {args.repeat}, {os.cpu_count()} CPUs")
    print("| corpus MB | variant | seconds | MB/s | x encode | tokens | peak RSS MB | RSS growth MB | process s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bytes'] / 1e6:.2f} | {r['variant']} | {r['seconds']:.3f} | {r['mb_per_s']:.2f} | "
              f"{r['mb_per_s'] / enc[r['fraction']]:.2f} | {r['tokens']} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] - r['base_rss_mb']:.0f} | {r['process_s']:.1f} |")


if __name__ == "__main__":
    main()
