import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repo; a git worktree one level deeper (wt/<name>) finds it one more up.
SHARED = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if p.is_dir()),
              ROOT.parent / "shared" / "data")
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402,F401  (one helper for the benches and the tests)


def compose(overrides=()):
    """The real config, composed through Hydra the way train.py composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from gptlab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_training(overrides=(), cfg=None):
    """Compose (or take `cfg`) and run in this process; the Accelerator singleton is reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState
    from gptlab.run import run

    try:
        return run(compose(overrides) if cfg is None else cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def run_stopped_at(step: int, overrides=()):
    """run_training, SIGTERMed inside optimizer step `step`: the run saves a checkpoint and returns."""
    from fault_harness import install

    undo = install(f"sigterm_in_step:{step}")
    try:
        result = run_training(overrides)
    finally:
        undo()
    assert result["stopped"] == "SIGTERM"
    return result


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: bit-exact comparisons need every run, here and in subprocesses,
    to use the same count, and one thread is far faster than spin-waiting OpenMP on
    shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/token cache for the whole session: runs after the first reuse it."""
    return tmp_path_factory.mktemp("gptlab_cache")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A few small Python files, copied from the stdlib, for overfitting quickly."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("tiny_corpus")
    for name in ("bisect.py", "colorsys.py", "keyword.py", "this.py", "glob.py", "fnmatch.py"):
        (out / name).write_text((src / name).read_text(encoding="utf-8"), encoding="utf-8")
    return out


def disk_full_at_step(monkeypatch, step: int) -> None:
    """Accelerate's save raises ENOSPC while checkpoint `step` is being written, as on a full disk."""
    import errno

    import accelerate.checkpointing as ac

    original = ac.save

    def save(obj, f, *args, **kwargs):
        if f".tmp-step_{step:07d}" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(ac, "save", save)


def read_metrics(run_dir):
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(model_dir):
    """An HF export's tensors, by name, for exact comparisons between runs."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def final_weights(run_dir):
    return weights(Path(run_dir) / "final")


def series(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir, tiny_corpus):
    """A smoke GPT-2 trained 40 steps on the tiny corpus, sampling two prompts at each evaluation.

    Generation, evaluation, plotting and fine-tuning tests start from it.
    """
    run_dir = tmp_path_factory.mktemp("trained")
    result = run_training([f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke",
                           f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2", "tokenizer.vocab_size=384",
                           "model.n_embd=64", "trainer.micro_batch_size=8", "trainer.max_steps=40",
                           "trainer.eval_every=20", "trainer.log_every=5", "optim.lr=3e-3",
                           "scheduler.warmup_steps=5", "trainer.sample_prompts=[\"def \",\"import \"]"])
    return run_dir, result


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in a temporary HF_HOME; cache_repo fills it, in the layout
    that `snapshot_download` and `from_pretrained` read offline."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home / "hub"


def cache_repo(hub, repo_id, files: dict, repo_type="model", commit=None) -> str:
    """Put {path in repo: bytes} into the hub cache as one snapshot; return its commit hash."""
    folder = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return commit


def cache_tiny_gpt2(hub, repo_id, tokenizer_only=False) -> str:
    """The shared tiny random GPT-2 (or only its GPT-2 tokenizer files) in the hub cache as `repo_id`."""
    files = sorted((SHARED / "models" / "tiny-random-gpt2").iterdir())
    if tokenizer_only:
        files = [p for p in files if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens"))]
    return cache_repo(hub, repo_id, {p.name: p.read_bytes() for p in files})
