"""What the GPU tests share: the marker, a skip without CUDA, a short config, and a report file.

gpu_check.sh sets GPTLAB_GPU_REPORT; each measurement a test makes (compile time, step
times) is appended there as one JSON line, so the check's table can show it.
"""
import json
import os

import pytest
import torch

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def smoke(run_dir, cache_dir, corpus, *extra):
    """debug=smoke on the stdlib corpus (the device machine has no shared data), logging every step."""
    return [f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{corpus}]",
            "data.valid_fraction=0.2", "tokenizer.vocab_size=384", "trainer.sample_max_new_tokens=4",
            "logger.tensorboard=false", *extra]


def report(name: str, **values) -> None:
    print(f"GPU_REPORT {name} {json.dumps(values)}")
    path = os.environ.get("GPTLAB_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": name, **values}) + "\n")


@pytest.fixture
def no_tf32():
    """fp32 comparisons need fp32 matmuls: a run with trainer.tf32=true leaves TF32 on process-wide."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
