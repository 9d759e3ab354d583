"""The training state's bytes per process (gptlab.footprint) and bench/memory.py, CI-sized."""
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT


def test_state_bytes_count_parameters_gradients_and_adam_moments_once():
    from transformers import GPT2Config, GPT2LMHeadModel
    from gptlab.footprint import state_bytes
    from gptlab.optim import build_optimizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    model.transformer.ln_f.weight.requires_grad_(False)  # frozen: no gradient, no moments
    optimizer = build_optimizer(model, OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1,
                                                         "betas": [0.9, 0.95], "eps": 1e-8}))
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()

    params = {id(p): p for p in model.parameters()}.values()  # the LM head is the embedding
    trained = [p for p in params if p.requires_grad]
    numel, trained_numel = sum(p.numel() for p in params), sum(p.numel() for p in trained)
    assert numel < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert state_bytes(model, optimizer) == {
        "parameters": 4 * numel,
        "gradients": 4 * trained_numel,
        # exp_avg and exp_avg_sq in fp32, and a one-element fp32 step count per parameter
        "optimizer_state": 8 * trained_numel + 4 * len(trained),
    }


@pytest.mark.slow
def test_memory_bench_runs(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--tiny", "--block", "32",
                           "--steps", "2", "--configs", "DDP,DDP+AC,FSDP2", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["DDP", "DDP+AC", "FSDP2"]
    for r in results.values():
        assert len(r["peak_bytes"]) == 2 and min(r["peak_bytes"]) > 0 and r["tokens_per_s"] > 0
        assert r["state"][0] == r["state"][1]  # DDP: every process holds the whole state; FSDP2: equal halves
        assert r["state"][0]["optimizer_state"] > 2 * r["state"][0]["parameters"] > 0
    whole, shard = results["DDP"]["state"][0], results["FSDP2"]["state"][0]
    for k in whole:  # dim-0 shards of odd-sized tensors round up: within 1% of half
        assert whole[k] / 2 <= shard[k] <= whole[k] / 2 * 1.01, (k, whole[k], shard[k])
    assert results["DDP"]["peak_ratio"] == 1.0 and results["DDP+AC"]["speed_ratio"] > 0
