"""Build a GPT-2 from the config, sized to the tokenizer."""
import logging

from transformers import GPT2Config, GPT2LMHeadModel

log = logging.getLogger(__name__)


def build_model(model_cfg, tokenizer, block_size: int) -> GPT2LMHeadModel:
    if block_size > model_cfg.n_positions:
        raise ValueError(f"data.block_size={block_size} exceeds model.n_positions={model_cfg.n_positions}")
    if model_cfg.n_embd % model_cfg.n_head:
        raise ValueError(f"model.n_embd={model_cfg.n_embd} is not divisible by model.n_head={model_cfg.n_head}")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=model_cfg.n_positions,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = model_cfg.attn_implementation
    model = GPT2LMHeadModel(config)
    log.info("GPT-2 with %.2fM parameters (%d layers, %d wide, vocab %d)",
             count_parameters(model) / 1e6, config.n_layer, config.n_embd, config.vocab_size)
    return model


def count_parameters(model) -> int:
    """Unique parameters: GPT-2 ties the LM head to the token embedding."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
