#!/usr/bin/env bash
# The GPU check, in one go on a bare CUDA machine, from the repository root:
#   bash bench/gpu_check.sh OUTDIR            # about 5 minutes; never over 7.5 (GPTLAB_GPU_BUDGET_S=450)
#   bash bench/gpu_check.sh --dry-run [OUTDIR] # on any machine: checks the wheels, the commands, the tests' collection
# It installs the pure-Python wheels of bench/gpu_wheels.txt from $GPTLAB_WHEELS (default
# .wheels/, made by bench/gpu_wheels.sh) into a private folder, never touching the machine's
# torch; runs `pytest -m gpu`; benches GPT-2 124M at T=1024 in bf16, eager and compiled, and
# the codeparrot shape in fp16; compares the fused loss with liger-kernel's; and prints a
# table. OUTDIR gets gpu_check.log (everything), gpu_check.json (every stage's numbers)
# and gpu_tests.xml (JUnit): three files, within what a device loan sends back.
set -uo pipefail
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
if [[ $# -ne 1 && ! ( $DRY == 1 && $# == 0 ) ]]; then
    echo "usage: bash bench/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WHEELS=${GPTLAB_WHEELS:-$ROOT/.wheels}
PY=${PYTHON:-python3}
SITE=${GPTLAB_SITE:-/tmp/gptlab_site}
cd "$ROOT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$SECONDS
mapfile -t PINS < <(grep -Ev '^\s*(#|$)' bench/gpu_wheels.txt)
WORK=$(mktemp -d)  # each stage's own JSON, merged into gpu_check.json at the end
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false GPTLAB_GPU_REPORT="$WORK/gpu_report.jsonl"
# cuBLAS's deterministic setting, for the tests' in-process and subprocess runs alike.
export CUBLAS_WORKSPACE_CONFIG=:4096:8

# The whole check stays under 8 minutes: each stage's limit is cut to what is left of BUDGET.
BUDGET=${GPTLAB_GPU_BUDGET_S:-450}

# Stage name, time limit in seconds, command: run it, log its time and status to stages.tsv.
stage() {
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START))); shift 2
    if [[ $DRY == 0 ]] && ((left < limit)); then limit=$left; fi
    if ((limit < 10)); then
        echo "=== $name: not run, the ${BUDGET}s budget is spent"
        printf '%s\t124\t0\n' "$name" >>"$WORK/stages.tsv"
        return 0
    fi
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s): $*"
    if [[ $DRY == 1 ]]; then return 0; fi
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$WORK/stages.tsv"
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
}

# 1. Wheels: exactly one pure-Python (py3-none-any) wheel per pin, nothing else.
wheels_ok=1
if [[ ! -d $WHEELS ]]; then
    wheels_ok=0
    echo "wheels: $WHEELS is missing (make it here with: bash bench/gpu_wheels.sh)"
else
    for pin in "${PINS[@]}"; do
        name=${pin%%==*} version=${pin#*==}
        file=$(echo "$name" | tr - _)-$version-py3-none-any.whl
        n=$(find "$WHEELS" -maxdepth 1 -iname "$(echo "$name" | tr - _)-*.whl" | wc -l)
        if [[ ! -f $WHEELS/$file || $n -ne 1 ]]; then
            echo "wheels: want exactly $file in $WHEELS, found $n wheel(s) of $name" >&2
            exit 1
        fi
    done
    extra=$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)
    if [[ $extra -ne ${#PINS[@]} ]]; then
        echo "wheels: $WHEELS holds $extra wheels, bench/gpu_wheels.txt pins ${#PINS[@]}" >&2
        exit 1
    fi
    echo "wheels: ${#PINS[@]} pure-Python wheels in $WHEELS"
fi
INSTALL=("$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir
         --upgrade --target "$SITE" "${PINS[@]}")

if [[ $DRY == 0 && $wheels_ok == 0 ]] && ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    echo "no wheels and no hydra-core here: nothing can run" >&2
    exit 1
fi
if [[ $DRY == 1 ]]; then
    if [[ $wheels_ok == 1 ]]; then  # pip resolves the pins from the folder alone, for Python 3.12
        "$PY" -m pip install -q --dry-run --no-index --find-links "$WHEELS" --no-deps --only-binary=:all: \
            --python-version 3.12 --target "$(mktemp -d)" "${PINS[@]}" || exit 1
        echo "wheels: pip resolves ${PINS[*]} from them for Python 3.12"
    fi
    bash -n bench/gpu_wheels.sh || exit 1
    for tool in timeout tee awk find; do
        command -v $tool >/dev/null || { echo "$tool is missing" >&2; exit 1; }
    done
    "$PY" bench/gpu.py --help >/dev/null && "$PY" bench/liger_loss.py --help >/dev/null || exit 1
    collected=$("$PY" -m pytest -m gpu tests/gpu --collect-only -q -p no:cacheprovider | grep -c '::')
    echo "gpu tests: $collected collected"
    [[ $collected -gt 0 ]] || exit 1
fi

# 2. Install the wheels into $SITE, on the path after the repo; the machine's own packages stay as they are.
[[ $wheels_ok == 0 ]] || stage install 60 "${INSTALL[@]}"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
stage environment 60 "$PY" -c "import torch, hydra, omegaconf, accelerate, transformers, sys
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'hydra', hydra.__version__,
      'accelerate', accelerate.__version__, 'transformers', transformers.__version__)
assert torch.cuda.is_available(), 'no CUDA device'
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
if [[ $DRY == 0 ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
fi

# 3. The tests, then the benches (each with its own time limit; later stages run whatever came before).
stage tests 240 "$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
# Each bench names its recipe: the default (Muon + AdamW, cross-entropy), and experiment=codeparrot's
# (AdamW at 5e-4, betas 0.9/0.999, weight decay 0.1, cosine; the keytoken loss; fp16; 32 x 8 x 128).
stage bf16_eager 60 "$PY" bench/gpu.py --optim muon --loss cross_entropy --no-compile \
    --json "$WORK/bench_bf16_eager.json"
stage bf16_compiled 120 "$PY" bench/gpu.py --optim muon --loss cross_entropy --json "$WORK/bench_bf16_compiled.json"
stage fp16_codeparrot 60 "$PY" bench/gpu.py --optim adamw --loss keytoken --precision fp16 --no-compile --block 128 \
    --batch 32 --steps 40 --warmup-steps 20 --override trainer.grad_accum=8 --override optim.lr=5e-4 \
    --override "optim.betas=[0.9,0.999]" --override optim.weight_decay=0.1 --override scheduler=cosine \
    --override "loss.keywords=[t1,t2,t3]" --json "$WORK/bench_fp16_codeparrot.json"
stage liger 60 "$PY" bench/liger_loss.py --json "$WORK/liger_loss.json"

# 4. The table, and gpu_check.json.
if [[ $DRY == 1 ]]; then
    echo "dry run: OK ($((SECONDS - START))s); the commands above run on a GPU"
    exit 0
fi
"$PY" - "$OUT" "$WORK" "$((SECONDS - START))" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, work, wall = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
summary = {"command": "bash bench/gpu_check.sh OUTDIR", "wall_s": wall, "stages": {}, "tests": None, "bench": {},
           "reports": [], "liger": None}
for line in (work / "stages.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    summary["stages"][name] = {"exit": int(rc), "seconds": int(secs)}
if (out / "gpu_tests.xml").is_file():
    suite = ET.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    n, f, e, s = (int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped"))
    summary["tests"] = {"passed": n - f - e - s, "failed": f + e, "skipped": s,
                        "failures": [c.get("name") for c in suite.iter("testcase")
                                     if c.find("failure") is not None or c.find("error") is not None]}
for name in ("bf16_eager", "bf16_compiled", "fp16_codeparrot"):
    f = work / f"bench_{name}.json"
    if f.is_file():
        summary["bench"][name] = json.loads(f.read_text())
if (work / "gpu_report.jsonl").is_file():
    summary["reports"] = [json.loads(l) for l in (work / "gpu_report.jsonl").read_text().splitlines()]
if (work / "liger_loss.json").is_file():
    summary["liger"] = json.loads((work / "liger_loss.json").read_text())["rows"]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))

print(f"\n==== gpu_check: {wall} s wall ====")
t = summary["tests"]
print("tests: " + (f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                   + (f" ({', '.join(t['failures'])})" if t["failures"] else "") if t else "no result"))
print(f"{'bench':16} {'recipe':22} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}")
for name in ("bf16_eager", "bf16_compiled", "fp16_codeparrot"):
    r = summary["bench"].get(name)
    if r:
        recipe = f"{r['optim']} + {r['loss']}"
        print(f"{name:16} {recipe:22} {r['tokens_per_s']:10.0f} {r['logged_mfu']:7.1%} {r['peak_mem_gib']:9.1f}")
    else:
        st = summary["stages"].get(name, {})
        why = ("not run (budget spent)" if st.get("seconds") == 0 else "timed out") if st.get("exit") == 124 \
            else f"failed: exit {st.get('exit')}"
        print(f"{name:16} {why:>28}")
for name, r in (summary["liger"] or {}).items():
    peak = f"{r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "-"
    print(f"loss {name:12} {r['ms']:8.2f} ms fwd+bwd, peak {peak}")
for r in summary["reports"]:
    if r["name"] in ("compile", "guard_step_time"):
        print(r["name"], {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k != "name"})
print(f"JSON: {out / 'gpu_check.json'}; log: {out / 'gpu_check.log'}")
PY
# Non-zero when any stage failed (a failed test fails the tests stage).
awk -F'\t' '$2 != 0 { bad = 1 } END { exit bad }' "$WORK/stages.tsv"
