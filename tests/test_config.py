import pytest

from conftest import compose


def test_defaults_compose():
    cfg = compose()
    assert cfg.model.n_layer == 4 and cfg.model.n_embd == 256
    assert cfg.data.source == "python_source" and cfg.tokenizer.vocab_size == 8192
    assert cfg.trainer.mixed_precision is None  # resolved to "no" on CPU


def test_gpt2_12x768_preset():
    cfg = compose(["model=gpt2_12x768"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 768)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "lrr"),
    ("trainer.max_steps=many", "max_steps"),
    ("trainer.foo=1", "foo"),
    ("model=gpt5", "gpt5"),
])
def test_bad_override_fails_at_compose(override, message):
    with pytest.raises(Exception, match=message):
        compose([override])
