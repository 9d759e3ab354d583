from transformers import GPT2Config, GPT2LMHeadModel

from gptlab.optim import param_groups


def test_weight_decay_groups_by_module_type():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied LM head is named wte
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    # GPT-2's norms are ln_1/ln_2/ln_f: a "LayerNorm.weight" name rule misses all of them.
    for n in ("transformer.h.0.ln_1.weight", "transformer.h.1.ln_2.weight", "transformer.ln_f.weight",
              "transformer.h.0.attn.c_attn.bias", "transformer.wte.weight", "transformer.wpe.weight"):
        assert n in not_decayed, n
    for n in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert n in decayed, n
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique
    assert len(decay["params"]) == 2 * 4  # four matrices per block
