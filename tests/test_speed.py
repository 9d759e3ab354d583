"""Speed machinery: the FLOPs formula, the logged MFU, the fused LM head + loss, the GPU path on a CPU,
and the benches in CI size (they must run and give positive numbers; speed itself is not asserted)."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import ROOT, SHARED, read_metrics, requires_shared, run_training, series

from gptlab.flops import MFU, flops_per_token, matmul_params, model_flops_per_token, peak_flops
from gptlab.loss import KeytokenLoss, _FusedLinearCE, cross_entropy_loss, keytoken_loss, make_loss_fn
from gptlab.model import build_model, compile_blocks, forward_loss


def tiny_gpt2(vocab=96, n_layer=2, n_embd=32, n_head=2, n_positions=16, **kw):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)
    return GPT2LMHeadModel(config)


# --- FLOPs and MFU ---

def test_flops_per_token_is_nanogpt_formula():
    # GPT-2 124M at T=1024 as nanoGPT counts it: N = 124,337,664 without wpe (50304 vocab).
    assert flops_per_token(124_337_664, 12, 12, 64, 1024) == 6 * 124_337_664 + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(10, 1, 1, 1, 1) == 72


def test_matmul_params_drop_position_embeddings_and_count_the_tied_head_once():
    model = tiny_gpt2()
    total = sum(p.numel() for p in model.parameters())  # parameters() lists the tied weight once
    assert matmul_params(model) == total - 16 * 32  # all but wpe (n_positions x n_embd)
    assert model_flops_per_token(model, 8) == 6 * (total - 16 * 32) + 12 * 2 * 2 * 16 * 8

    untied = tiny_gpt2(tie_word_embeddings=False)
    n = sum(p.numel() for p in untied.parameters())
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert matmul_params(untied) == n - 16 * 32 - 96 * 32  # the looked-up wte does no matmul


def test_peak_flops_sources(monkeypatch):
    assert peak_flops(torch.device("cpu"), 123e9) == (123e9, "trainer.peak_flops")
    with pytest.raises(ValueError, match="trainer.peak_flops"):
        peak_flops(torch.device("cpu"), -1.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), precision="bf16") == (989.4e12, "NVIDIA H100 80GB HBM3 data sheet "
                                                                            "(bf16 dense)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert peak_flops(torch.device("cuda"), precision="fp16")[0] == 312e12
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls
        assert peak_flops(torch.device("cuda"), precision="no") == (156e12, "NVIDIA A100-SXM4-40GB data sheet "
                                                                             "(tf32 dense)")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert peak_flops(torch.device("cuda"), precision="no")[0] == 19.5e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("name, fp32, tf32, bf16, fp16", [
    ("NVIDIA H100 80GB HBM3", 66.9e12, 494.7e12, 989.4e12, 989.4e12),  # SXM
    ("NVIDIA H100 PCIe", 51.2e12, 378e12, 756e12, 756e12),
    ("NVIDIA H200", 66.9e12, 494.7e12, 989.4e12, 989.4e12),
    ("NVIDIA A100 80GB PCIe", 19.5e12, 156e12, 312e12, 312e12),
    ("NVIDIA L4", 30.3e12, 60e12, 121e12, 121e12),
    ("NVIDIA A10", 31.2e12, 62.5e12, 125e12, 125e12),
    ("NVIDIA GeForce RTX 4090", 82.6e12, 82.6e12, 165.2e12, 165.2e12),
    ("Tesla V100-SXM2-16GB", 15.7e12, 15.7e12, None, 125e12),  # no TF32 or bf16 tensor cores
    ("Tesla V100-PCIE-32GB", 14e12, 14e12, None, 112e12),
    ("NVIDIA L40S", None, None, None, None),  # not "L4": measured
    ("NVIDIA A10G", None, None, None, None),  # not "A10"
])
def test_the_peak_table_tells_gpus_and_precisions_apart(name, fp32, tf32, bf16, fp16):
    from gptlab.flops import gpu_peak

    assert [gpu_peak(name, p) for p in ("fp32", "tf32", "bf16", "fp16")] == [fp32, tf32, bf16, fp16]
    cpu_peak, source = peak_flops(torch.device("cpu"), precision="no")
    assert cpu_peak > 1e8 and source == "measured float32 matmul on cpu"
    # bf16 autocast on a CPU: MFU against the bf16 matmul it runs (several times fp32's where native)
    assert peak_flops(torch.device("cpu"), precision="bf16")[1] == "measured bfloat16 matmul on cpu"


def test_peak_measurement_leaves_the_global_rng_alone():
    from gptlab.flops import measured_matmul_flops

    measured_matmul_flops.cache_clear()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert measured_matmul_flops("cpu", n=64, budget_s=0.01) > 0
    assert torch.equal(torch.rand(3), expected)


def test_mfu_is_tokens_times_flops_over_peak():
    model = tiny_gpt2()
    mfu = MFU(model, 8, torch.device("cpu"), num_processes=2, configured_peak=1e9)
    assert mfu(1000.0) == pytest.approx(1000.0 * model_flops_per_token(model, 8) / 2e9)


@pytest.fixture(scope="module")
def fixed_peak_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("mfu")
    run_training([f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", "trainer.peak_flops=1e9"])
    return run_dir


def test_logged_mfu_matches_throughput_and_formula(fixed_peak_run):
    from transformers import AutoModelForCausalLM

    rows = read_metrics(fixed_peak_run)
    model = AutoModelForCausalLM.from_pretrained(str(fixed_peak_run / "final"))
    fpt = model_flops_per_token(model, 64)  # debug=smoke: block_size 64
    tps = dict(series(rows, "train/tokens_per_s"))
    mfu = series(rows, "train/mfu")
    assert [s for s, _ in mfu] == list(range(1, 9))
    for step, value in mfu:
        assert value > 0
        assert value == pytest.approx(tps[step] * fpt / 1e9)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(next((fixed_peak_run / "tb").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/mfu")] == pytest.approx([v for _, v in mfu])


# --- the fused LM head + loss ---

def reference(h, W, x, loss):
    """Loss and gradients through the plain path: logits, then the loss on logits."""
    h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
    out = loss(h @ W.t(), x)
    out.backward()
    return out.detach(), h.grad, W.grad


@pytest.mark.parametrize("chunk_rows", [5, 64, 10_000])
def test_fused_linear_ce_equals_logits_path_for_both_losses(chunk_rows):
    g = torch.Generator().manual_seed(0)
    B, T, C, V = 3, 12, 16, 50
    h, W = torch.randn(B, T, C, generator=g), torch.randn(V, C, generator=g)
    x = torch.randint(0, V, (B, T), generator=g)
    x[0, :4] = 7  # samples with different key-token counts
    kt = torch.tensor([7, 9])
    cases = [
        (cross_entropy_loss, torch.full((B, T - 1), 1 / (B * (T - 1)))),
        (lambda lg, ids: keytoken_loss(lg, ids, kt, 0.5, normalize=False),
         KeytokenLoss(kt.tolist(), 0.5, False).token_weights(x)),
        (lambda lg, ids: keytoken_loss(lg, ids, kt, 0.5, normalize=True),
         KeytokenLoss(kt.tolist(), 0.5, True).token_weights(x)),
    ]
    for loss, weights in cases:
        ref, ref_gh, ref_gw = reference(h, W, x, loss)
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        flat = hh[:, :-1].reshape(-1, C)
        out = _FusedLinearCE.apply(flat, WW, x[:, 1:].reshape(-1), weights.reshape(-1), chunk_rows)
        (out * 3).backward()  # the saved gradients are scaled by the incoming one
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hh.grad, 3 * ref_gh, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(WW.grad, 3 * ref_gw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_ce_under_autocast_is_close_to_fp32(dtype):
    g = torch.Generator().manual_seed(1)
    B, T, C, V = 32, 65, 16, 256
    h, W = torch.randn(B, T, C, generator=g), torch.randn(V, C, generator=g) * 0.1
    x = torch.randint(0, V, (B, T), generator=g)
    ref, ref_gh, ref_gw = reference(h, W, x, cross_entropy_loss)
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = _FusedLinearCE.apply(hh[:, :-1].reshape(-1, C), WW, x[:, 1:].reshape(-1),
                                   torch.full((B * (T - 1),), 1 / (B * (T - 1))), 1000)
    out.backward()
    assert out.dtype == hh.grad.dtype == WW.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    scale_h, scale_w = ref_gh.abs().max(), ref_gw.abs().max()
    torch.testing.assert_close(hh.grad / scale_h, ref_gh / scale_h, rtol=0, atol=2e-2)
    torch.testing.assert_close(WW.grad / scale_w, ref_gw / scale_w, rtol=0, atol=2e-2)


class FakeTokenizer:
    def __init__(self, n):
        self.n, self.eos_token_id, self.bos_token_id, self.pad_token_id = n, 0, 0, 0

    def __len__(self):
        return self.n

    def __call__(self, text, add_special_tokens=False):  # "kw" -> one id, anything else -> two
        return {"input_ids": [5] if text.strip() == "kw" else [1, 2]}


@pytest.mark.parametrize("loss_name", ["cross_entropy", "keytoken"])
def test_forward_loss_equals_model_logits_loss_with_gradients(loss_name):
    from omegaconf import OmegaConf

    loss_cfg = OmegaConf.create({"name": loss_name, "keywords": ["kw"], "alpha": 1.0, "normalize": False})
    loss_fn = make_loss_fn(loss_cfg, FakeTokenizer(96))
    x = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(2))
    x[1, :3] = 5
    grads = []
    for fused in (False, True):
        model = tiny_gpt2()
        loss = forward_loss(model, x, loss_fn) if fused else loss_fn(model(input_ids=x).logits, x)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, g_plain), (fused, g_fused) = grads
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_fused[name], g, rtol=1e-4, atol=1e-6, msg=name)


# --- the GPU path, as far as a CPU can check it ---

def test_vocab_padding_and_padded_ids_are_never_sampled():
    from omegaconf import OmegaConf

    from gptlab.config import ModelConfig

    cfg = OmegaConf.structured(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32))
    model = build_model(cfg, FakeTokenizer(500), 16)
    assert model.config.vocab_size == 512
    assert model.generation_config.suppress_tokens == list(range(500, 512))
    assert model.config.activation_function == "gelu_pytorch_tanh"
    cfg.vocab_pad_multiple = 1
    assert build_model(cfg, FakeTokenizer(500), 16).config.vocab_size == 500
    cfg.vocab_pad_multiple = 0
    with pytest.raises(ValueError, match="vocab_pad_multiple"):
        build_model(cfg, FakeTokenizer(500), 16)


def test_fused_adamw():
    from omegaconf import OmegaConf
    from gptlab.optim import build_optimizer

    opt = build_optimizer(tiny_gpt2(), OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1,
                                                         "betas": [0.9, 0.95], "eps": 1e-8}))
    assert opt.defaults["fused"] is True


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_keep_the_model_plain():
    from omegaconf import OmegaConf

    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    loss_fn = make_loss_fn(OmegaConf.create({"name": "cross_entropy"}), None)
    eager, compiled = tiny_gpt2(), tiny_gpt2()
    compile_blocks(compiled)
    assert type(compiled) is GPT2LMHeadModel and compiled.state_dict().keys() == eager.state_dict().keys()
    for model in (eager, compiled):
        forward_loss(model, x, loss_fn).backward()
    torch.testing.assert_close(forward_loss(compiled, x, loss_fn), forward_loss(eager, x, loss_fn))
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    compiled.eval()
    with torch.no_grad():  # evaluation runs the blocks eagerly, with no recompilation
        torch.testing.assert_close(compiled(input_ids=x).logits, eager.eval()(input_ids=x).logits)


def test_cpu_threads_default_to_the_cores_shared_by_local_processes(monkeypatch):
    """accelerate launch leaves a lone CPU process OMP_NUM_THREADS=1; gptlab sets its own count."""
    import psutil
    from omegaconf import OmegaConf
    from gptlab.distributed import cpu_threads_per_process, make_accelerator

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if not logical else 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads_per_process() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads_per_process() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpu_threads_per_process() == 1

    before = torch.get_num_threads()
    try:
        for configured, expected in ((3, 3), (None, 1)):
            tc = OmegaConf.create({"mixed_precision": None, "parallel": "ddp", "cpu_threads": configured})
            make_accelerator(tc)
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


# --- the benches, CI-sized: they run and report positive numbers ---

def run_bench(*args, timeout=900):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_in_bf16(tmp_path):
    out = tmp_path / "gpu.json"
    run_bench(ROOT / "bench" / "gpu.py", "--tiny", "--no-compile", "--batch", 2, "--block", 64, "--steps", 4,
              "--warmup-steps", 2, "--json", out)
    result = json.loads(out.read_text())
    assert result["settings"]["trainer.mixed_precision"] == "bf16"
    assert result["tokens_per_s"] > 0 and result["logged_mfu"] > 0


@pytest.mark.slow
@requires_shared
def test_train_vs_trainer_bench_runs(tmp_path):
    out, text = tmp_path / "bench.json", tmp_path / "war_and_peace_start.txt"
    text.write_text((SHARED / "tolstoy" / "war_and_peace.txt").read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    stdout = run_bench(ROOT / "bench" / "train_vs_trainer.py", "--steps", 4, "--warmup-steps", 2, "--repeats", 1,
                       "--vocab-size", 1024, "--cache-dir", tmp_path, "--text", text, "--threads", 1, "--json", out)
    summary = json.loads(out.read_text())
    assert summary["command"].startswith("python bench/train_vs_trainer.py --steps 4 ")
    assert summary["peak"]["flops"] > 0 and summary["peak"]["flops_per_cpu_s"] > 0
    assert summary["flops_per_token"] > 0
    assert list(summary["arms"]) == ["gptlab", "trainer", "trainer:gelu_pytorch_tanh"]  # the like-for-like arm too
    for arm, row in summary["arms"].items():
        for key in ("tokens_per_s", "mfu", "tokens_per_cpu_s", "cpu_mfu"):
            assert row[key] > 0, (arm, key)
        assert row["runs"][0]["threads"] == [1], arm  # --threads pins every arm, gptlab's too
    gptlab = summary["arms"]["gptlab"]
    assert gptlab["runs"][0]["logged_mfu"] > 0
    assert gptlab["ratio_vs_trainer"] > 0 and gptlab["ratio_vs_same_model"] > 0
    assert "gptlab / trainer (" in stdout and "gptlab / trainer:gelu_pytorch_tanh (" in stdout


@pytest.mark.slow
def test_startup_bench_runs(tmp_path, cache_dir):
    out = tmp_path / "startup.json"
    run_bench(ROOT / "bench" / "startup.py", "--repeats", 1, "--launchers", "python", "--cache-dir", cache_dir,
              "--override", "debug=smoke", "--json", out)
    med = json.loads(out.read_text())["median_s"]["python"]
    assert 0 < med["imports, Hydra, Accelerator"] < med["first optimizer step"]
    assert med["CPU time to step 1"] > 0


def test_time_to_quality_scores_the_bf16_trainer_as_gptlab_scores_its_bf16_arms(tmp_path):
    """The bf16 Trainer's held-out loss comes from gptlab's evaluate() under the autocast that an
    Accelerator(mixed_precision="bf16") gives gptlab's bf16 arms, not in fp32."""
    import numpy as np
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from gptlab.data.blocks import TokenBlocks
    from gptlab.evaluate import evaluate

    sys.path.insert(0, str(ROOT / "bench"))
    from time_to_quality import held_out_loss

    np.random.default_rng(0).integers(0, 96, 16 * 6, dtype=np.uint16).tofile(tmp_path / "valid.bin")
    data, model = SimpleNamespace(valid=TokenBlocks(tmp_path / "valid.bin", "uint16", 16)), tiny_gpt2()
    def fresh_state():  # an Accelerator made by an earlier test in this process would pin its precision
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    fresh_state()
    try:
        bf16_arm = evaluate(model, data.valid, 4, Accelerator(cpu=True, mixed_precision="bf16"))["eval/loss"]
    finally:
        fresh_state()
    assert held_out_loss(model, data, 4, bf16=True) == bf16_arm
    assert held_out_loss(model, data, 4, bf16=False) != bf16_arm  # the fp32 score it had before


@pytest.mark.slow
@requires_shared
def test_time_to_quality_bench_runs(tmp_path):
    from gptlab.distributed import fast_cpu_precision

    out, text = tmp_path / "ttq.json", tmp_path / "war_and_peace_start.txt"
    text.write_text((SHARED / "tolstoy" / "war_and_peace.txt").read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    half = "half=trainer.batch_warmup_steps=2,trainer.batch_warmup_micro=2"  # steps 1-2 read 2 of 4 sequences
    arms = ["adamw-cosine", "muon-wsd", half,
            *(["trainer-bf16", "muon-wsd-bf16"] if fast_cpu_precision("bf16") else [])]
    stdout = run_bench(ROOT / "bench" / "time_to_quality.py", "--tiny", "--steps", 4, "--eval-every", 2,
                       *[a for arm in arms for a in ("--arm", arm)], "--threads", 1, "--cache-dir", tmp_path,
                       "--text", text, "--json", out)
    summary = json.loads(out.read_text())
    assert summary["target_loss"] > 0 and "L* = " in stdout
    for arm in ("trainer", *arms):
        row, runs = summary["arms"][arm], summary["results"][arm]
        assert row["tokens_per_s"] > 0 and row["final_loss"] > 0, arm
        assert runs[0]["train_s"] > 0 and runs[0]["train_cpu_s"] > 0, arm
    # The Trainer's L* is its own last held-out loss; every arm has a curve, evaluation left out of its seconds.
    assert summary["target_loss"] == summary["results"]["trainer"][0]["curve"][-1]["eval_loss"]
    for arm in ("trainer", *arms):
        curve = summary["results"][arm][0]["curve"]
        assert [p["step"] for p in curve] == [2, 4]
        assert 0 < curve[0]["train_s"] < curve[1]["train_s"]
        assert all(p["eval_loss"] > 0 for p in curve)
    # tokens/s counts the tokens read: 2 steps of 2 blocks of 64 and 2 of 4
    run = summary["results"][half][0]
    assert run["tokens_per_s"] * run["train_s"] == pytest.approx((2 * 2 + 2 * 4) * 64)
    assert {runs[0]["cpu_capability"] for runs in summary["results"].values()} == {
        torch.backends.cpu.get_cpu_capability()}

    # --isa avx2: the arms run ATen's AVX2 kernels, whatever this CPU has
    run_bench(ROOT / "bench" / "time_to_quality.py", "--tiny", "--steps", 2, "--eval-every", 2, "--no-trainer",
              "--arm", "muon-wsd", "--isa", "avx2", "--threads", 1, "--cache-dir", tmp_path, "--text", text,
              "--json", out)
    assert json.loads(out.read_text())["results"]["muon-wsd"][0]["cpu_capability"] == "AVX2"


@pytest.mark.slow
@requires_shared
def test_cpu_step_profile_runs_as_an_avx2_cpu(tmp_path):
    out, text = tmp_path / "profile.json", tmp_path / "war_and_peace_start.txt"
    text.write_text((SHARED / "tolstoy" / "war_and_peace.txt").read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_step_profile.py"), "--tiny", "--steps", "2",
                           "--warmup-steps", "1", "--isa", "avx2", "--cache-dir", str(tmp_path), "--text", str(text),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # it started again with the caps, and Muon's Newton-Schulz took fp32, as on an AVX2-only CPU
    assert result["config"]["cpu_capability"] == "AVX2" and result["config"]["optim"] == "muon"
    assert "Muon: Newton-Schulz in fp32" in proc.stderr
    parts = result["seconds"]
    assert all(v >= 0 for v in parts.values()) and parts["matmul"] > 0 and parts["optimizer"] > 0
    assert sum(parts.values()) == pytest.approx(max(result["wall_s"], result["profiled_self_s"]), rel=1e-6)


@pytest.mark.slow
@requires_shared
def test_ns_precision_bench_runs(tmp_path):
    out, text = tmp_path / "ns.json", tmp_path / "war_and_peace_start.txt"
    text.write_text((SHARED / "tolstoy" / "war_and_peace.txt").read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    stdout = run_bench(ROOT / "bench" / "ns_precision.py", "--tiny", "--steps", 2, "--repeats", 1,
                       "--cache-dir", tmp_path, "--text", text, "--json", out)
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["native", "avx2"] and "emulated (AVX2 only)" in stdout
    for row in results.values():
        assert all(row[f"ns_{d}_s"] > 0 and row[f"default_{d}_tokens_per_s"] > 0 for d in ("bf16", "fp32")), row
        assert row["trainer_tokens_per_s"] > 0


@pytest.mark.slow
@requires_shared
def test_gram_ns_bench_runs(tmp_path):
    out, text = tmp_path / "gram.json", tmp_path / "war_and_peace_start.txt"
    text.write_text((SHARED / "tolstoy" / "war_and_peace.txt").read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    stdout = run_bench(ROOT / "bench" / "gram_ns.py", "--tiny", "--steps", 2, "--rounds", 2, "--repeats", 1,
                       "--isa", "avx2", "--cache-dir", tmp_path, "--text", text, "--json", out)
    result = json.loads(out.read_text())
    # it started again with the caps, and ran each iteration in alternate rounds
    assert result["cpu_capability"] == "AVX2" and "gram / textbook" in stdout
    assert all(result["newton_schulz_s"][v] > 0 and len(result["tokens_per_s"][v]) == 2 for v in ("gram", "textbook"))
