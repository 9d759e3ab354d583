"""What the benches share: gptlab's real config and its real run(), timed from its own metrics."""
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

RESULT = "BENCH_RESULT "
# In a child process's environment: bf16 matmul emulated as on an AVX2-only CPU (oneDNN's kernels
# capped), and ATen's own kernels capped too.
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
# --isa: the whole of an AVX2-only CPU, MKL's fp32 GEMMs capped as well
ISA_ENV = {"avx2": {**AVX2, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def free_port() -> int:
    """A TCP port free right now, for a launch's --main_process_port (tests use this one too)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_json_option(parser, name: str) -> None:
    """--json, by default bench/results/NAME.json: the raw results a RESULTS.md table is read from."""
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / f"{name}.json",
                        help=f"where the raw results go (default: bench/results/{name}.json, committed "
                        "beside the table in bench/RESULTS.md)")


def write_json(path, summary: dict) -> None:
    """The raw results with what re-derives them: the exact command, the machine, the versions."""
    import torch

    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    header = {"command": shlex.join(["python", script, *sys.argv[1:]]),
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**header, **summary}, indent=2, default=str) + "\n")


def cap_isa(isa) -> None:
    """This process computes as a CPU with only `isa` would (None: as this one does). The caps are
    read when torch's libraries load, so without them in its environment the process starts
    again with them. The CPU's flags still say AVX512-BF16 while the capped oneDNN emulates bf16
    (~35x slower than fp32), so gptlab's precision choices are made to see the capped CPU:
    Newton-Schulz in fp32, as on a real one."""
    if not isa:
        return
    if any(os.environ.get(k) != v for k, v in ISA_ENV[isa].items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_ENV[isa]})
    import torch

    import gptlab.distributed

    if torch.backends.cpu.get_cpu_capability() != isa.upper():
        sys.exit(f"--isa {isa}: torch runs {torch.backends.cpu.get_cpu_capability()} kernels")
    gptlab.distributed.fast_cpu_precision = lambda precision: False


def compose(overrides=()):
    """gptlab's config, composed through Hydra as train.py composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from gptlab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def split_overrides(text: str) -> list:
    """"a=1,b=[0.8,0.95]" -> ["a=1", "b=[0.8,0.95]"]: an --arm's overrides, a list value's commas kept."""
    return [o for o in re.split(r",(?![^\[]*\])", text) if o]


def as_overrides(values: dict) -> list:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


class StepClock:
    """Wall and CPU time at step boundaries.

    CPU time (user + system of this process, all threads) is what neighbours on a
    shared machine barely inflate: tokens per CPU-second and matmul FLOPs per
    CPU-second give an MFU that holds under load; wall time gives tokens/s.
    """

    def __init__(self):
        self.marks, self.threads = {}, set()

    def stamp(self, step: int) -> None:
        import torch

        self.marks[step] = (time.perf_counter(), time.process_time())
        self.threads.add(torch.get_num_threads())  # what the timed steps really ran on

    def rates(self, tokens_per_step: int, first: int, last: int) -> dict:
        (w0, c0), (w1, c1) = self.marks[first], self.marks[last]
        tokens = tokens_per_step * (last - first)
        return {"tokens_per_s": tokens / (w1 - w0), "tokens_per_cpu_s": tokens / (c1 - c0),
                "threads": sorted(self.threads)}


def matmul_peak(n: int = 1024, seconds: float = 1.0) -> dict:
    """fp32 n×n matmul: the best FLOP/s seen in about `seconds`, in wall time and in CPU time.

    The best, because neighbours only ever slow a matmul down.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    wall, cpu, start = float("inf"), float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        w, c = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    flops = 2.0 * n ** 3
    return {"flops": flops / wall, "flops_per_cpu_s": flops / max(cpu, 1e-9)}


def gptlab_run(data, overrides: list, on_log=None):
    """gptlab.run.run() as is, its data stage pointed at `data` (a gptlab.data.prepare.Prepared).

    on_log(metrics, step) sees every tracker call, and (None, 0) just before the loop
    starts; returns the config the run saved (optim=auto decided, grad_accum derived) and
    metrics.jsonl's rows.
    """
    from omegaconf import OmegaConf

    import gptlab.run as gptlab_run

    on_log = on_log or (lambda metrics, step: None)

    class HookedTracker(gptlab_run.Tracker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            on_log(None, 0)  # run() makes the tracker right before the loop

        def log(self, metrics, step):
            on_log(metrics, step)
            super().log(metrics, step)

    gptlab_run.prepare = lambda cfg, *a, **k: data
    gptlab_run.Tracker = HookedTracker
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose([*overrides, f"run_dir={run_dir}", "trainer.sample_max_new_tokens=1", "logger.tensorboard=false"])
        gptlab_run.run(cfg)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        ran = OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml")  # with what the launch decided
    return ran, rows


def run_gptlab(data, overrides: list, steps: int, warmup_steps: int) -> dict:
    """Throughput of gptlab_run: the steps after `warmup_steps` (the log interval), timed
    where the loop logs, right after its host sync.
    """
    clock = StepClock()

    def on_log(metrics, step):
        if metrics and "train/tokens_per_s" in metrics:
            clock.stamp(step)

    # The steady step: the from-scratch default's sequence warmup (shorter rows first) is off unless
    # an override asks for it (the last value of a key wins).
    cfg, rows = gptlab_run(data, ["trainer.seq_warmup_steps=0", *overrides, f"trainer.max_steps={steps}",
                                  f"trainer.log_every={warmup_steps}",
                                  f"trainer.eval_every={10 ** 9}"], on_log)
    rows = [r for r in rows if "train/mfu" in r and r["step"] > warmup_steps]
    tokens_per_step = cfg.trainer.micro_batch_size * cfg.data.block_size * cfg.trainer.grad_accum
    return {**clock.rates(tokens_per_step, warmup_steps, steps),
            "logged_mfu": statistics.median(r["train/mfu"] for r in rows),
            "final_loss": rows[-1]["train/loss"]}


def print_result(result: dict) -> None:
    print(RESULT + json.dumps(result, default=str), flush=True)
