"""model.zero_init_proj, model.tie_embeddings=false, model.activation and Muon's momentum warmup:
each keeps a plain GPT2LMHeadModel that transformers loads with no custom code."""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, pipeline

from conftest import read_metrics, run_training, series, weights
from test_speed import FakeTokenizer


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
