"""model.arch, model.zero_init_proj, model.tie_embeddings=false, model.activation and Muon's
momentum warmup: each builds a plain transformers class that loads with no custom code."""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, pipeline

from conftest import final_weights, read_metrics, run_stopped_at, run_training, series, weights
from test_speed import FakeTokenizer, make_loss_fn


def build(**options):
    from gptlab.config import ModelConfig
    from gptlab.model import build_model

    torch.manual_seed(0)
    return build_model(OmegaConf.structured(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, **options)),
                       FakeTokenizer(500), 16)


def test_each_option_does_what_it_says_and_the_default_is_gpt2s():
    base, new = build(), build(zero_init_proj=True, tie_embeddings=False, activation="relu2")
    assert type(base) is type(new) is GPT2LMHeadModel
    for b, n in zip(base.transformer.h, new.transformer.h):
        for proj in ("attn", "mlp"):
            assert getattr(b, proj).c_proj.weight.abs().sum() > 0
            assert getattr(n, proj).c_proj.weight.abs().sum() == 0
            assert getattr(n, proj).c_proj.bias.abs().sum() == 0  # GPT-2 starts its biases at zero anyway
    assert base.lm_head.weight is base.transformer.wte.weight
    assert new.lm_head.weight is not new.transformer.wte.weight
    assert not torch.equal(new.lm_head.weight, new.transformer.wte.weight)
    assert (base.config.activation_function, new.config.activation_function) == ("gelu_pytorch_tanh", "relu2")
    assert (base.config.tie_word_embeddings, new.config.tie_word_embeddings) == (True, False)
    x = torch.randn(3, 7)
    torch.testing.assert_close(new.transformer.h[0].mlp.act(x), torch.relu(x) ** 2)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_init_std_sets_the_configs_initializer_range_and_the_weights_follow(arch):
    base, wide = build(arch=arch), build(arch=arch, init_std=0.08)
    assert (base.config.initializer_range, wide.config.initializer_range) == (0.02, 0.08)
    emb = base.get_input_embeddings().weight, wide.get_input_embeddings().weight  # 500 x 32 draws
    assert emb[0].std().item() == pytest.approx(0.02, rel=0.05)
    assert emb[1].std().item() == pytest.approx(0.08, rel=0.05)


def test_a_run_with_every_option_exports_a_model_pipeline_loads(tmp_path, cache_dir):
    run_training([f"run_dir={tmp_path}", f"cache_dir={cache_dir}", "debug=smoke", "trainer.max_steps=4",
                  "model.zero_init_proj=true", "model.tie_embeddings=false", "model.activation=relu2",
                  "optim.momentum_warmup_steps=3"])
    final = tmp_path / "final"
    saved = weights(final)
    assert "lm_head.weight" in saved and not torch.equal(saved["lm_head.weight"], saved["transformer.wte.weight"])
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert type(model) is GPT2LMHeadModel and model.config.activation_function == "relu2"
    torch.testing.assert_close(model.lm_head.weight, saved["lm_head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.transformer.h[1].mlp.c_proj.weight, saved["transformer.h.1.mlp.c_proj.weight"],
                               rtol=0, atol=0)
    assert model.transformer.h[1].mlp.c_proj.weight.abs().sum() > 0  # trained away from zero
    out = pipeline("text-generation", model=str(final))("def ", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("def ")
    assert [s for s, _ in series(read_metrics(tmp_path), "train/loss")] == [1, 2, 3, 4]


def test_muon_momentum_rises_over_the_warmup_and_only_muons_groups_take_it():
    from gptlab.config import OptimConfig
    from gptlab.optim import build_optimizer, set_momentum
    from gptlab.schedule import make_momentum

    oc = OmegaConf.structured(OptimConfig(name="muon", momentum=0.95, momentum_start=0.85, momentum_warmup_steps=4))
    momentum = make_momentum(oc)
    assert [momentum(t) for t in (1, 2, 4, 5, 300)] == pytest.approx([0.875, 0.9, 0.95, 0.95, 0.95])
    assert make_momentum(OmegaConf.structured(OptimConfig())) is None  # off by default
    opt = build_optimizer(build(), oc)
    set_momentum(opt, 0.9)
    assert [g.get("momentum") for g in opt.param_groups] == [0.9, None]  # Muon's; AdamW's (tied: one group)


@pytest.mark.parametrize("arch, cls", [("llama", LlamaForCausalLM), ("qwen3", Qwen3ForCausalLM)])
def test_rotary_architectures_are_built_as_configured_with_the_fused_head(arch, cls):
    from gptlab.model import forward_loss, token_losses
    from gptlab.optim import muon_split

    model = build(arch=arch, zero_init_proj=True)
    c = model.config
    assert type(model) is cls and (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (32, 2, 2)
    assert (c.head_dim, c.num_key_value_heads, c.intermediate_size, c.max_position_embeddings) == (16, 2, 128, 32)
    assert c.hidden_act == "silu" and c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert hasattr(model.model.layers[0].self_attn, "q_norm") == (arch == "qwen3")  # QK-norm
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.weight.abs().sum() == 0 and layer.mlp.down_proj.weight.abs().sum() == 0
        assert layer.self_attn.q_proj.weight.abs().sum() > 0
    # Muon takes the seven matrices of each block; AdamW the embedding (and head) and the norms.
    names = {id(p): n for n, p in model.named_parameters()}
    muon, _ = muon_split(model)
    assert sorted(names[i].split(".", 3)[3] for i in muon) == sorted(
        2 * ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"])
    # The loss with the LM head fused into it: the model's own logits' loss and gradients.
    model = build(arch=arch)
    x = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(2))
    loss_fn = make_loss_fn(OmegaConf.create({"name": "cross_entropy"}), FakeTokenizer(500))
    fused = forward_loss(model, x, loss_fn)
    fused.backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=x).logits
    plain = loss_fn(logits, x)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    torch.testing.assert_close(token_losses(model, x), ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, pretrained", [("gpt2", False), ("llama", False), ("llama", True)])
def test_the_eos_embedding_trains(arch, pretrained, tmp_path):
    """gptlab's pad id is its eos, which ends every document: Llama's embedding would never update
    that row (nn.Embedding's padding_idx) if gptlab left it set, from scratch or fine-tuning
    (an export's config.json names pad_token_id)."""
    from gptlab.config import ModelConfig
    from gptlab.model import build_model

    model = build(arch=arch, tie_embeddings=False)  # untied: the head's gradient reaches every row
    if pretrained:
        model.save_pretrained(tmp_path)
        assert type(AutoModelForCausalLM.from_pretrained(tmp_path).model.embed_tokens.padding_idx) is int
        model = build_model(OmegaConf.structured(ModelConfig(pretrained_path=str(tmp_path))), FakeTokenizer(500), 16)
    x = torch.tensor([[3, 4, 0, 5, 6, 0, 7, 8]])
    loss_fn = make_loss_fn(OmegaConf.create({"name": "cross_entropy"}), FakeTokenizer(500))
    loss_fn(model(input_ids=x).logits, x).backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad[0].abs().sum() > 0 and grad[9].abs().sum() == 0  # eos (id 0) is in the batch, id 9 is not


def test_a_llama_run_exports_a_model_pipeline_loads(tmp_path, cache_dir):
    run_training([f"run_dir={tmp_path}", f"cache_dir={cache_dir}", "debug=smoke", "trainer.max_steps=4",
                  "model.arch=qwen3", "model.tie_embeddings=false"])
    final = tmp_path / "final"
    saved = weights(final)
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert type(model) is Qwen3ForCausalLM and not model.config.tie_word_embeddings
    for name in ("lm_head.weight", "model.layers.1.self_attn.q_norm.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(model.state_dict()[name], saved[name], rtol=0, atol=0)
    out = pipeline("text-generation", model=str(final))("def ", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("def ")
    losses = [v for _, v in series(read_metrics(tmp_path), "train/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.usefixtures("one_thread")
def test_a_stopped_qwen3_run_resumes_exactly(tmp_path, cache_dir, tiny_corpus):
    """Rotary caches, QK-norm and Muon over nn.Linear save and resume like GPT-2 (test_resume.py)."""
    base = [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "tokenizer.vocab_size=384",
            "trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=3", "model.arch=qwen3"]
    run_training([f"run_dir={tmp_path / 'a'}", *base])
    run_stopped_at(3, [f"run_dir={tmp_path / 'b'}", *base])
    run_training([f"run_dir={tmp_path / 'b'}", *base, "resume=auto"])
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("train/loss", "eval/loss"):
        assert series(a, key) == series(b, key), key
    assert [s for s, _ in series(b, "train/loss")] == list(range(1, 7))
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
