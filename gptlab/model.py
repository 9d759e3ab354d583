"""Build a GPT-2 from the config, sized to the tokenizer; the training loss of a (wrapped) model."""
import logging
import math

import torch
from torch import nn
from accelerate.utils import extract_model_from_parallel
from transformers import GPT2Config, GPT2LMHeadModel

from .loss import fused_linear_loss

log = logging.getLogger(__name__)


def build_model(model_cfg, tokenizer, block_size: int) -> GPT2LMHeadModel:
    if block_size > model_cfg.n_positions:
        raise ValueError(f"data.block_size={block_size} exceeds model.n_positions={model_cfg.n_positions}")
    if model_cfg.n_embd % model_cfg.n_head:
        raise ValueError(f"model.n_embd={model_cfg.n_embd} is not divisible by model.n_head={model_cfg.n_head}")
    if model_cfg.vocab_pad_multiple < 1:
        raise ValueError(f"model.vocab_pad_multiple={model_cfg.vocab_pad_multiple}: give 1 (no padding) or more")
    # Matmuls over a vocab that is a multiple of 64 use whole tensor-core tiles (nanoGPT: 50257 -> 50304).
    vocab_size = math.ceil(len(tokenizer) / model_cfg.vocab_pad_multiple) * model_cfg.vocab_pad_multiple
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=model_cfg.n_positions,
        n_embd=model_cfg.n_embd,
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        # The tanh GELU of GPT-2 ("gelu_new") in one fused kernel instead of seven elementwise ones.
        activation_function="gelu_pytorch_tanh",
        resid_pdrop=model_cfg.dropout,
        embd_pdrop=model_cfg.dropout,
        attn_pdrop=model_cfg.dropout,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = model_cfg.attn_implementation
    model = GPT2LMHeadModel(config)
    if vocab_size > len(tokenizer):  # padding ids are never sampled
        model.generation_config.suppress_tokens = list(range(len(tokenizer), vocab_size))
    log.info("GPT-2 with %.2fM parameters (%d layers, %d wide, vocab %d)",
             count_parameters(model) / 1e6, config.n_layer, config.n_embd, config.vocab_size)
    return model


def count_parameters(model) -> int:
    """Unique parameters: GPT-2 ties the LM head to the token embedding."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def compile_blocks(model: nn.Module) -> None:
    """torch.compile the forward of each repeated block (GPT-2's `transformer.h[i]`), for training.

    Regional compilation: the blocks share one compiled graph, and the model keeps its
    type, its parameter names and its Python-side glue (HF output capture, the fused
    loss), which Dynamo would otherwise have to trace or break on.
    """
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(b) for b in module}) == 1:
            for block in module:
                block.forward = _when_training(block, torch.compile(block.forward), block.forward)


def _when_training(block: nn.Module, compiled, eager):
    def forward(*args, **kwargs):
        # Evaluation and sampling, with its KV cache growing a token at a time, would
        # recompile again and again for little gain: they run eagerly.
        return (compiled if block.training and torch.is_grad_enabled() else eager)(*args, **kwargs)
    return forward


def forward_loss(model, input_ids: torch.Tensor, loss_fn) -> torch.Tensor:
    """The training loss of `model` (as prepared: DDP, compiled, autocast) on (B, T) ids.

    For GPT-2 the model stops at the final hidden states and the LM head is fused into
    the loss (see loss.fused_linear_loss); any other model computes its logits.
    The call still goes through the wrapped model, so DDP and autocast see it; no KV
    cache is built, as HF models otherwise do in training too.
    """
    inner = extract_model_from_parallel(model, keep_torch_compile=False)
    if not isinstance(inner, GPT2LMHeadModel) or not hasattr(loss_fn, "token_weights"):
        return loss_fn(model(input_ids=input_ids, use_cache=False).logits, input_ids)
    no_logits = torch.empty(0, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, use_cache=False, logits_to_keep=no_logits, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (B, T, C), after the final layer norm
    return fused_linear_loss(hidden, inner.lm_head.weight, input_ids, loss_fn.token_weights(input_ids))
