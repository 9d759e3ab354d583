"""optim=muon: which parameters Muon takes, each group's LR and weight decay, exact resume,
and 2 processes equal to 1 with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose, free_port, read_metrics, run_stopped_at, run_training, series
from gptlab.muon import Muon

MUON = {"name": "muon", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "muon_lr": 4e-3,
        "muon_weight_decay": 0.05, "momentum": 0.95, "ns_steps": 5, "muon_split_qkv": False}


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64))


def _split_names(model):
    from gptlab.optim import muon_split

    muon, adamw = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[i] for i in muon), sorted(names[i] for i in adamw)


def test_gpt2_block_matrices_go_to_muon_the_rest_to_adamw():
    muon, adamw = _split_names(_gpt2())
    assert muon == [f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    # The token embedding (tied to lm_head), the positions, norms and every bias.
    assert adamw == sorted(["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                            "transformer.ln_f.bias"] + [f"transformer.h.{i}.{m}" for i in range(2) for m in (
                                "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                                "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")])


def test_llama_gets_the_same_split_by_module_type():
    muon, adamw = _split_names(_llama())
    assert muon == sorted(f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"))
    # Llama's untied output head stays on AdamW, as do its RMSNorms and the embedding.
    assert adamw == sorted(["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"] +
                           [f"model.layers.{i}.{n}.weight" for i in range(2)
                            for n in ("input_layernorm", "post_attention_layernorm")])


def test_split_qkv_orthogonalises_q_k_and_v_as_three_matrices():
    """optim.muon_split_qkv: each layer's c_attn (in, 3·in) steps as Q, K and V would as three
    parameters of their own, to the bit; the other matrices as without it."""
    from gptlab.optim import build_optimizer, choose_optimizer, fused_attention_pieces

    model = _gpt2()
    assert sorted(fused_attention_pieces(model).values()) == [3, 3]
    default, _ = choose_optimizer(compose([]))  # from scratch: the default splits them
    assert build_optimizer(model, default.optim).inner[0].pieces == {0: 3, 4: 3}  # each layer's first matrix
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    def stepped(split: bool) -> dict:
        for n, p in model.named_parameters():
            p.data.copy_(weights[n])
            p.grad = grads[n].clone()
        build_optimizer(model, OmegaConf.create({**MUON, "muon_split_qkv": split})).step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    split, whole = stepped(True), stepped(False)
    attn = "transformer.h.0.attn.c_attn.weight"
    q_k_v = [torch.nn.Parameter(w) for w in weights[attn].clone().chunk(3, dim=1)]
    for p, g in zip(q_k_v, grads[attn].chunk(3, dim=1)):
        p.grad = g.clone()
    Muon(q_k_v, lr=4e-3, weight_decay=0.05, momentum=0.95, ns_steps=5).step()
    assert torch.equal(split[attn], torch.cat([p.detach() for p in q_k_v], dim=1))
    assert not torch.equal(split[attn], whole[attn])
    for n in split:
        if not n.endswith("c_attn.weight"):
            assert torch.equal(split[n], whole[n]), n


def test_adamws_betas_follow_the_job_unless_set():
    """optim=auto: AdamW beside Muon from scratch takes (0.8, 0.99), fine-tuning keeps (0.9, 0.95);
    optim.betas set wins either way."""
    from gptlab.optim import build_optimizer, choose_optimizer

    def adamw_betas(overrides: list) -> tuple:
        cfg, _ = choose_optimizer(compose(overrides))
        return build_optimizer(_gpt2(), cfg.optim).inner[-1].param_groups[0]["betas"]

    assert adamw_betas([]) == (0.8, 0.99)
    assert adamw_betas(["optim.betas=[0.9,0.99]"]) == (0.9, 0.99)
    tuned, line = choose_optimizer(compose(["model.pretrained_path=/some/gpt2"]))
    assert (tuned.optim.name, list(tuned.optim.betas)) == ("adamw", [0.9, 0.95]) and "betas (0.9, 0.95)" in line
    assert list(choose_optimizer(compose(["optim=muon"]))[0].optim.betas) == [0.8, 0.99]


def test_each_group_has_its_own_base_lr_and_weight_decay_under_one_multiplier():
    from gptlab.config import SchedulerConfig
    from gptlab.optim import build_optimizer, set_lr
    from gptlab.schedule import make_schedule

    model = _llama()
    opt = build_optimizer(model, OmegaConf.create(MUON))
    muon, decayed, plain = opt.param_groups  # Muon; AdamW's decayed lm_head; AdamW's rest
    assert (muon["weight_decay"], decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.1, 0.0)
    assert [p is model.lm_head.weight for p in decayed["params"]] == [True]
    assert isinstance(opt.inner[0], Muon)
    for step, adamw_lr in ((5, 5e-4), (10, 1e-3), (80, 1e-3), (90, 5.5e-4), (100, 1e-4)):
        lr = make_schedule(SchedulerConfig(name="wsd", warmup_steps=10, min_lr=1e-4), 1e-3, 100)(step)
        assert lr == pytest.approx(adamw_lr)
        set_lr(opt, lr)
        assert decayed["lr"] == plain["lr"] == lr
        assert muon["lr"] == pytest.approx(4 * lr)


def test_muon_steps_and_its_state_round_trips():
    from gptlab.optim import build_optimizer

    torch.manual_seed(0)
    model = _gpt2()
    opt = build_optimizer(model, OmegaConf.create(MUON))
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    x = torch.randint(0, 64, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    rms = (model.transformer.h[0].mlp.c_fc.weight.detach() - before).pow(2).mean().sqrt().item()
    # match_rms_adamw: Newton-Schulz leaves singular values near 1 (roughly 0.5-1.5), so the
    # update's RMS is about 0.2 * muon_lr, whichever way round Conv1D stores the (32, 128) matrix.
    assert 0.5 * 0.2 * 4e-3 < rms < 1.5 * 0.2 * 4e-3
    state = opt.state_dict()
    fresh = build_optimizer(model, OmegaConf.create(MUON))
    fresh.load_state_dict(state)
    w = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(fresh.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])
    # The loaded groups are the ones the loop's LR reaches.
    assert fresh.param_groups[0] is fresh.inner[0].param_groups[0]


def test_muon_config_errors_before_step_1(monkeypatch):
    from gptlab.errors import ConfigError
    from gptlab.preflight import check_config

    with pytest.raises(ConfigError, match="optim.muon_lr=0.0 must be a positive number"):
        check_config(compose(["optim=muon", "optim.muon_lr=0"]))
    with pytest.raises(ConfigError, match="optim.momentum=1.0 must be in"):
        check_config(compose(["optim=muon", "optim.momentum=1.0"]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what launch/accelerate/fsdp.yaml sets: Muon runs sharded
    check_config(compose(["optim=muon"]))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ConfigError, match="scheduler.decay_fraction=0.0 must be in"):
        check_config(compose(["scheduler=wsd", "scheduler.decay_fraction=0"]))


# --- real runs: exact resume, and 2 processes ---

STEPS = 6


@pytest.fixture(scope="module")
def base(cache_dir, tiny_corpus):
    return [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
            "tokenizer.vocab_size=384", "trainer.micro_batch_size=10", "trainer.grad_accum=2",
            f"trainer.max_steps={STEPS}", "trainer.eval_every=3", "trainer.save_every=3", "optim=muon",
            "optim.lr=1e-3", "optim.muon_lr=4e-3", "scheduler=wsd", "scheduler.warmup_steps=2", "scheduler.decay_fraction=0.5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, one_thread):
    """An uninterrupted run, recording each group's LR as each optimizer step is taken."""
    import gptlab.run

    lrs, real = [], gptlab.run.build_optimizer

    def build_optimizer(model, cfg):
        opt = real(model, cfg)
        opt.register_step_pre_hook(lambda o, a, k: lrs.append([g["lr"] for g in o.param_groups]))
        return opt

    run_dir = tmp_path_factory.mktemp("muon_ref")
    gptlab.run.build_optimizer = build_optimizer
    try:
        run_training([f"run_dir={run_dir}", *base])
    finally:
        gptlab.run.build_optimizer = real
    return run_dir, lrs


def test_groups_follow_the_schedule_in_a_run(reference):
    _, lrs = reference
    # wsd over 6 steps: warmup to step 2, hold to step 3, linear decay to min_lr 1e-4 at step 6.
    adamw = [5e-4, 1e-3, 1e-3, 7e-4, 4e-4, 1e-4]
    assert [len(g) for g in lrs] == [2] * STEPS  # Muon's group, AdamW's undecayed group (GPT-2 ties its head)
    for got, want in zip(lrs, adamw):
        assert got[1] == pytest.approx(want) and got[0] == pytest.approx(4 * want)


def test_resume_with_muon_is_exact(tmp_path, base, reference, one_thread):
    from safetensors.torch import load_file

    run_stopped_at(4, [f"run_dir={tmp_path}", *base])
    run_training([f"run_dir={tmp_path}", *base, "resume=auto"])
    ref_dir, _ = reference
    ours, ref = read_metrics(tmp_path), read_metrics(ref_dir)
    for key in ("train/loss", "train/lr", "eval/loss"):
        assert series(ours, key) == series(ref, key), key  # exact float equality
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path, ref_dir))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_with_muon_equal_one_with_accumulation(tmp_path, base, reference):
    """2 processes x accum 1 against the 1-process reference's accum 2: the same global batch."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "train.py"), f"run_dir={tmp_path}", *base,
           "trainer.grad_accum=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in (tmp_path / "train.log").read_text()
    ref_dir, _ = reference
    got, want = series(read_metrics(tmp_path), "train/loss"), series(read_metrics(ref_dir), "train/loss")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-5, f"step {step}: train/loss {a} vs {b}"
    from safetensors.torch import load_file
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path, ref_dir))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_resume_applies_changed_optimizer_settings_and_keeps_the_moments(tmp_path, base, reference, one_thread):
    """The reference run's step-3 checkpoint, resumed with another muon_lr and Muon weight decay: the
    groups take the new values (load_state_dict had restored the saved ones), the log says which."""
    import gptlab.run

    lrs, real = [], gptlab.run.build_optimizer

    def build_optimizer(model, cfg):
        opt = real(model, cfg)
        opt.register_step_pre_hook(lambda o, a, k: lrs.append([(g["lr"], g["weight_decay"]) for g in o.param_groups]))
        return opt

    ref_dir, ref_lrs = reference
    gptlab.run.build_optimizer = build_optimizer
    try:
        run_training([f"run_dir={tmp_path}", *base, f"resume={ref_dir / 'checkpoints' / 'step_0000003'}",
                      "optim.muon_lr=8e-3", "optim.muon_weight_decay=0.02"])
    finally:
        gptlab.run.build_optimizer = real
    assert len(lrs) == STEPS - 3  # steps 4-6
    for (muon, adamw), (ref_muon_lr, ref_adamw_lr) in zip(lrs, ref_lrs[3:]):
        assert adamw == (ref_adamw_lr, 0.0)  # AdamW's group (GPT-2's undecayed rest) unchanged
        assert muon[0] == pytest.approx(8 * adamw[0]) and ref_muon_lr == pytest.approx(4 * ref_adamw_lr)
        assert muon[1] == 0.02  # the reference ran 0.1
    log = (tmp_path / "train.log").read_text()
    assert ("resume: this run's optimizer settings apply, the moments are the checkpoint's: optim.muon_lr 0.004 -> "
            "0.008, optim.muon_weight_decay 0.1 -> 0.02") in log
    assert series(read_metrics(tmp_path), "train/lr") == series(read_metrics(ref_dir), "train/lr")[3:]
