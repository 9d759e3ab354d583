"""LoRA through peft: only the adapters train, checkpoints hold them and reference the base,
final/ is a plain merged HF model, resume is exact, and bad input fails in one line.

The base model is the gptlab export of the `trained_run` fixture (2 layers, 64 wide).
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import (ROOT, SHARED, compose, free_port, read_metrics, requires_shared, run_stopped_at, run_training,
                      series)

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tolstoy_slice(tmp_path, novel, n_chars):
    path = tmp_path / f"{novel}.txt"
    path.write_text((SHARED / "tolstoy" / f"{novel}.txt").read_text(encoding="utf-8")[:n_chars], encoding="utf-8")
    return path


def text_data(files):
    return ["data.source=text", "data.encoding=utf-8", "data.text_unit=paragraph", "data.urls=[]",
            "data.valid_fraction=0.05", "data.block_size=64", f"data.files=[{','.join(map(str, files))}]"]


@pytest.fixture(scope="module")
def lora_run(trained_run, tmp_path_factory, cache_dir):
    """The documented variant `experiment=tolstoy_finetune model.lora.r=16` (with a smoke-sized lr and
    run) on the trained_run export, over another text: the opening of Отрочество."""
    tmp = tmp_path_factory.mktemp("lora")
    novel = tolstoy_slice(tmp, "otrochestvo", 60_000)
    run_dir = tmp / "run"
    result = run_training([f"run_dir={run_dir}", f"cache_dir={cache_dir}", "experiment=tolstoy_finetune", "debug=smoke",
                           *text_data([novel]), f"model.pretrained_path={trained_run[0] / 'final'}",
                           "model.lora.r=16", "optim.lr=1e-2", "trainer.max_steps=30", "trainer.eval_every=15",
                           "trainer.save_every=15", "trainer.log_every=5", "scheduler.warmup_steps=3",
                           "trainer.micro_batch_size=8"])
    return run_dir, novel, result


@requires_shared
def test_lora_finetune_lowers_held_out_perplexity(trained_run, lora_run, cache_dir, capsys):
    from gptlab.evaluate import main as evaluate

    run_dir, novel, _ = lora_run
    on_novel = ["data=text", *text_data([novel]), f"cache_dir={cache_dir}"]
    before = evaluate([str(trained_run[0] / "final"), *on_novel])
    after = evaluate([str(run_dir / "final"), *on_novel])
    with capsys.disabled():
        print(f"\nLoRA r=16: perplexity on Отрочество's validation split ({after['tokens']} tokens): "
              f"{before['perplexity']:.2f} before, {after['perplexity']:.2f} after")
    assert before["tokens"] == after["tokens"] > 0
    # the merged export evaluates exactly as the adapter model did in training
    assert after["loss"] == pytest.approx(series(read_metrics(run_dir), "eval/loss")[-1][1], abs=1e-5)
    assert after["perplexity"] < 0.9 * before["perplexity"]
    samples = [r["sample/0"] for r in read_metrics(run_dir) if "sample/0" in r]
    assert len(samples) == 3 and samples[-1].startswith("Мне нравится, что вы ")  # steps 0 (eval_on_start), 2, 4
    log = (run_dir / "train.log").read_text()
    assert re.search(r"parameters: [\d,]+ trainable of [\d,]+ \(\d", log) and "optimizer state" in log


@requires_shared
def test_checkpoints_hold_only_the_adapters_and_reference_the_base(trained_run, lora_run):
    from safetensors import safe_open

    from gptlab.lora import load_base

    run_dir, _, _ = lora_run
    ckpt = run_dir / "checkpoints" / "step_0000030"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    base = trained_run[0] / "final"
    assert state["lora"]["r"] == 16 and state["lora"]["base_path"] == str(base)
    load_base(state["lora"])  # the hash is the base's
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # rank 16 A and B for the 4 adapted projections of each of the 2 layers, nothing else
    assert len(keys) == 2 * 4 * 2 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    full = (base / "model.safetensors").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size < 0.5 * full
    assert (ckpt / "optimizer.bin").stat().st_size < full  # a full AdamW state would be twice the weights


@requires_shared
def test_only_adapters_change_and_merged_export_equals_adapter_model(trained_run, lora_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gptlab.export import main as export
    from gptlab.trained import load_trained

    run_dir, _, _ = lora_run
    base_dir = trained_run[0] / "final"
    export([str(run_dir / "checkpoints" / "step_0000030"), str(tmp_path / "exp"), "--adapter"])
    assert not (run_dir / "final" / "adapter_config.json").exists()
    for a, b in zip(*(load_file(str(d / "model.safetensors")).items() for d in (run_dir / "final", tmp_path / "exp"))):
        assert a[0] == b[0] and torch.equal(a[1], b[1])  # the same merge from the checkpoint as at the end of training

    before = load_file(str(base_dir / "model.safetensors"))
    after = load_file(str(run_dir / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    adapted = {k for k in before if k.endswith(".weight") and any(f".{t}." in k for t in TARGETS)}
    assert len(adapted) == 8
    for k in before.keys() - adapted:  # embeddings, norms, biases: bit-identical
        assert torch.equal(before[k], after[k]), k

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "exp" / "adapter")).eval()
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            key = name.removeprefix("base_model.model.") + ".weight"
            # merged = untouched base + the adapters' product: the base part did not move in training
            torch.testing.assert_close(after[key], before[key] + module.get_delta_weight("default"),
                                       rtol=0, atol=1e-6)
            assert module.get_delta_weight("default").abs().max() > 1e-4

    merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "final")).eval()
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
        # generate and evaluate given the checkpoint itself: its base with the adapters merged
        from_ckpt = load_trained(run_dir / "checkpoints" / "step_0000030").model
        torch.testing.assert_close(from_ckpt(ids).logits, merged(ids).logits, rtol=0, atol=0)


@requires_shared
def test_final_export_loads_in_a_pipeline_without_peft(lora_run):
    """With peft unimportable: gptlab's default path imports fine, and pipeline() loads final/."""
    code = ("import sys; sys.modules['peft'] = None\n"  # import peft now fails
            "import gptlab.run, gptlab.export, gptlab.evaluate, gptlab.generate\n"
            "from transformers import pipeline\n"
            f"out = pipeline('text-generation', model={str(lora_run[0] / 'final')!r})('Пьер', max_new_tokens=4, "
            "do_sample=False)\n"
            "print(out[0]['generated_text'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("Пьер") and len(proc.stdout.strip()) > len("Пьер")


def _tiny_peft(r=4):
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab.lora import apply_lora

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    lc = OmegaConf.create({"r": r, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"]})
    model = apply_lora(model, lc)
    for n, p in model.named_parameters():  # B starts at zero: make the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_only_adapters_are_in_the_optimizer_and_get_gradients_with_the_fused_keytoken_loss():
    from transformers.pytorch_utils import Conv1D

    from gptlab.loss import KeytokenLoss
    from gptlab.model import forward_loss
    from gptlab.footprint import state_bytes
    from gptlab.optim import build_optimizer
    from omegaconf import OmegaConf

    model = _tiny_peft()
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora and len(lora) == 2 * 4 * 2
    conv = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert conv and all(m.fan_in_fan_out for m in model.modules() if hasattr(m, "lora_A"))
    opt = build_optimizer(model, OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1,
                                                   "betas": [0.9, 0.95], "eps": 1e-8}))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in lora}

    loss_fn = KeytokenLoss([3, 5], 2.0, False)
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    fused = forward_loss(model, x, loss_fn)  # the LM head fused into the loss, through the peft wrapper
    plain = loss_fn(model(input_ids=x).logits, x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    fused.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    plain.backward()
    assert got.keys() == lora
    for n, p in model.named_parameters():
        if n in lora:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
    opt.step()
    n_lora = sum(p.numel() for n, p in model.named_parameters() if n in lora)
    sizes = state_bytes(model, opt)  # as logged after step 1: two fp32 moments and a step count per adapter
    assert sizes["gradients"] == 4 * n_lora and sizes["optimizer_state"] == 8 * n_lora + 4 * len(lora)


def test_lora_on_another_architecture_merges_exactly():
    """Any causal LM: a Llama with nn.Linear projections (no fan_in_fan_out), named by target_modules."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptlab.lora import apply_lora, merged_copy
    from gptlab.model import forward_loss
    from gptlab.loss import CrossEntropy
    from gptlab.errors import ConfigError

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    lc = OmegaConf.create({"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["c_attn"]})
    with pytest.raises(ConfigError, match="no module named 'c_attn'; its linear layers are named down_proj, "
                                          "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(base, lc)
    lc.target_modules = ["q_proj", "v_proj"]
    model = apply_lora(base, lc).eval()
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 4 and not any(m.fan_in_fan_out for m in adapted)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = forward_loss(model, x, CrossEntropy())  # the logits path
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    merged = merged_copy(model)
    assert type(merged) is LlamaForCausalLM and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def resume_base(trained_run, cache_dir, tiny_corpus):
    return [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
            f"model.pretrained_path={trained_run[0] / 'final'}", "model.lora.r=4", "model.lora.dropout=0.1",
            "trainer.micro_batch_size=8", "trainer.grad_accum=2", "trainer.max_steps=4", "trainer.eval_every=2",
            "trainer.save_every=2", "trainer.log_every=1", "optim=adamw", "optim.lr=1e-2", "scheduler.warmup_steps=1",
            "trainer.sample_prompts=[]"]


def test_lora_resume_is_exact(tmp_path, resume_base, one_thread):
    from safetensors.torch import load_file

    ref, run = tmp_path / "ref", tmp_path / "run"
    run_training([f"run_dir={ref}", *resume_base])
    run_stopped_at(2, [f"run_dir={run}", *resume_base])
    assert not (run / "final").exists()
    run_training([f"run_dir={run}", *resume_base, "resume=auto"])
    for key in ("train/loss", "eval/loss", "train/grad_norm"):
        assert series(read_metrics(run), key) == series(read_metrics(ref), key), key
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (run, ref))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_with_activation_checkpointing_trains_the_same(tmp_path, resume_base, one_thread):
    """Non-reentrant checkpointing recomputes the blocks, adapters and dropout masks included."""
    args = [*resume_base, "trainer.max_steps=2", "trainer.save_every=0"]
    run_training([f"run_dir={tmp_path / 'plain'}", *args])
    run_training([f"run_dir={tmp_path / 'ac'}", *args, "trainer.activation_checkpointing=true"])
    assert "activation checkpointing: each transformer block" in (tmp_path / "ac" / "train.log").read_text()
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        ours, ref = series(read_metrics(tmp_path / "ac"), key), series(read_metrics(tmp_path / "plain"), key)
        assert len(ours) == len(ref) > 0, key
        assert all(math.isclose(x, y, rel_tol=1e-6) for (_, x), (_, y) in zip(ours, ref)), key


def test_bad_lora_input_fails_before_step_1(tmp_path, trained_run, resume_base, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from gptlab.checkpoint_format import CheckpointError
    from gptlab.export import export_checkpoint
    from gptlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.lora.r=-1 must be >= 0"):
        run_training([f"run_dir={tmp_path / 'a'}", *resume_base, "model.lora.r=-1"])
    with pytest.raises(ConfigError, match=r"no module named 'q_proj'; its linear layers are named c_attn, c_fc, "
                                          r"c_proj, lm_head"):
        run_training([f"run_dir={tmp_path / 'b'}", *resume_base, "model.lora.target_modules=[c_attn,q_proj]"])
    with monkeypatch.context() as m:
        m.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file .../fsdp.yaml` sets
        with pytest.raises(ConfigError, match="model.lora.r>0 under an FSDP launch is not supported yet"):
            run_training([f"run_dir={tmp_path / 'c'}", *resume_base])
    assert not (tmp_path / "b" / "checkpoints").exists()

    # a run on a copy of the base, whose weights then change under it
    base = shutil.copytree(trained_run[0] / "final", tmp_path / "base")
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", *resume_base, f"model.pretrained_path={base}"]
    run_training([*args, "trainer.max_steps=2"])
    weights = load_file(str(base / "model.safetensors"))
    weights["transformer.ln_f.weight"] += 1e-3
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters for the base model .* but this run's base .* "
                                              r"hashes to [0-9a-f]{12}: resume with the same model.pretrained_path"):
        run_training([*args, "resume=auto"])
    with pytest.raises(CheckpointError, match="has changed since training"):
        export_checkpoint(run_dir, tmp_path / "exp")
    with pytest.raises(CheckpointError, match="holds LoRA adapters only, but this run has model.lora.r=0"):
        run_training([*args, "resume=auto", "model.lora.r=0"])


def test_lora_from_scratch_keeps_its_random_base_once(tmp_path, cache_dir, tiny_corpus):
    from safetensors.torch import load_file

    from gptlab.export import export_checkpoint

    run_dir = tmp_path / "run"
    run_training([f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]",
                  "data.valid_fraction=0.2", "tokenizer.vocab_size=384", "model.lora.r=4", "optim=adamw",
                  "trainer.max_steps=2",
                  "trainer.sample_prompts=[]"])
    state = json.loads((run_dir / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["lora"]["base_path"] == str(run_dir / "lora_base")
    export_checkpoint(run_dir, tmp_path / "exp")  # the base comes back from lora_base/, hash checked
    a, b = (load_file(str(d / "model.safetensors")) for d in (run_dir / "final", tmp_path / "exp"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_is_off_by_default():
    cfg = compose([])
    assert cfg.model.lora.r == 0 and list(cfg.model.lora.target_modules) == ["c_attn", "c_proj", "c_fc"]


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(tmp_path, resume_base, one_thread):
    import shutil

    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    args = [*resume_base, "model.lora.dropout=0.0"]
    run_training([f"run_dir={one}", *args])
    port = str(free_port())
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", port, str(ROOT / "train.py"), f"run_dir={two}", *args,
                           "trainer.grad_accum=1"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in (two / "train.log").read_text()
    for key in ("train/loss", "eval/loss"):
        ours, ref = series(read_metrics(two), key), series(read_metrics(one), key)
        assert [s for s, _ in ours] == [s for s, _ in ref]
        for (_, x), (_, y) in zip(ours, ref):
            assert math.isclose(x, y, rel_tol=0, abs_tol=1e-5), key
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (one, two))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)

    # elastic: the 2-process checkpoint (DDP's "module." names) continues on 1 process
    elastic = shutil.copytree(two, tmp_path / "elastic")
    shutil.rmtree(elastic / "final")
    run_training([*args, f"resume={elastic / 'checkpoints' / 'step_0000002'}"])
    c = load_file(str(elastic / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-5)




@pytest.mark.slow
def test_memory_bench_lora_rows(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--tiny", "--block", "32",
                           "--configs", "DDP,DDP+LoRA16", "--steps", "2", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, lora = (json.loads(out.read_text())["results"][k]["state"][0] for k in ("DDP", "DDP+LoRA16"))
    assert lora["parameters"] > full["parameters"]  # the frozen model plus the adapters
    # rank 16 A (in x 16) and B (16 x out) on c_attn 64->192, attn.c_proj 64->64, c_fc 64->256,
    # mlp.c_proj 256->64, in each of the 2 layers; fp32 gradients, two fp32 moments and a step count
    n_lora = 2 * 16 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert lora["gradients"] == 4 * n_lora < full["gradients"] / 4
    assert lora["optimizer_state"] == 8 * n_lora + 4 * 2 * 4 * 2


def test_lora_takes_adamw_by_default_and_muon_when_asked(tmp_path, resume_base):
    """optim=auto picks AdamW for adapters on a pretrained model; optim=muon still runs them, with a
    warning (every adapter matrix goes to Muon: no AdamW group at all)."""
    base = [a for a in resume_base if a not in ("optim=adamw", "optim.lr=1e-2")]
    run_training([f"run_dir={tmp_path / 'auto'}", *base])
    log = (tmp_path / "auto" / "train.log").read_text()
    assert "optim=auto: AdamW at lr 5e-05, betas (0.9, 0.95), fine-tuning " in log and " with LoRA: Muon on weights trained" in log
    assert "sequence warmup" not in log  # the from-scratch default's; fine-tuning reads whole blocks
    result = run_training([f"run_dir={tmp_path / 'muon'}", *base, "optim=muon"])
    log = (tmp_path / "muon" / "train.log").read_text()  # logged before the run directory existed
    assert math.isfinite(result["train/loss"]) and "with optim=muon: Muon on a model trained with AdamW" in log
