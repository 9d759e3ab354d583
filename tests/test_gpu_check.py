"""bench/gpu_check.sh --dry-run on the CPU: the wheels folder, the commands, the GPU tests' collection."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PINS = [line for line in (ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")]


def dry_run(tmp_path, wheels):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env={**os.environ, "GPTLAB_WHEELS": str(wheels), "PYTHONPATH": str(ROOT),
                               "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_dry_run_without_wheels_checks_the_rest_and_says_so(tmp_path):
    """CI has no wheels folder (it is git-ignored, made by bench/gpu_wheels.sh): the dry run
    still checks the commands and the tests, names the missing wheels, and passes."""
    proc, out = dry_run(tmp_path, tmp_path / "no_wheels")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wheels: {tmp_path / 'no_wheels'} is missing" in proc.stdout
    collected = re.search(r"gpu tests: (\d+) collected", proc.stdout)
    assert collected and int(collected.group(1)) >= 20  # tests/gpu/ holds 20
    # every bench names its optimizer and loss; codeparrot's is its preset's AdamW and keytoken loss
    for cmd in ("pytest -m gpu tests/gpu", "bench/gpu.py --optim muon --loss cross_entropy --no-compile",
                "bench/gpu.py --optim muon --loss cross_entropy --json",
                "bench/gpu.py --optim adamw --loss keytoken --precision fp16", "bench/liger_loss.py"):
        assert cmd in proc.stdout, cmd
    assert "dry run: OK" in proc.stdout and "dry run: OK" in (out / "gpu_check.log").read_text()


def test_dry_run_refuses_a_wrong_wheels_folder(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for pin in PINS:  # the right names, plus a second hydra-core: pip would stop on two versions
        name, version = pin.split("==")
        (wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    (wheels / "hydra_core-1.3.7-py3-none-any.whl").write_bytes(b"")
    proc, _ = dry_run(tmp_path, wheels)
    assert proc.returncode == 1
    assert "wheels: want exactly hydra_core-1.3.8-py3-none-any.whl" in proc.stderr + proc.stdout


@pytest.mark.skipif(not (ROOT / ".wheels").is_dir(), reason="no .wheels/ here (bash bench/gpu_wheels.sh makes it)")
def test_dry_run_with_the_downloaded_wheels_resolves_them_for_python_312(tmp_path):
    proc, _ = dry_run(tmp_path, ROOT / ".wheels")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wheels: pip resolves {' '.join(PINS)} from them for Python 3.12" in proc.stdout


def test_liger_bench_runs_on_cpu_with_gptlab_paths_only(tmp_path):
    import json

    out = tmp_path / "liger.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "liger_loss.py"), "--tokens", "256", "--dim", "32",
                           "--vocab", "512", "--dtype", "fp32", "--repeats", "1", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["liger"] and sorted(result["rows"]) == ["gptlab_fused", "logits"]  # liger needs CUDA
    rows = result["rows"]
    assert abs(rows["gptlab_fused"]["loss"] - rows["logits"]["loss"]) < 1e-5  # the same loss, two ways
