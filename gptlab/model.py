"""Build a GPT-2 (or a Llama or Qwen3) from the config sized to the tokenizer, or load a local
pretrained causal LM; the training loss of a (wrapped) model."""
import logging
import math
import warnings
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .hub import is_commit, is_hub_id, resolve
from .errors import ConfigError, MissingPathError
from .lora import base_of
from .loss import _token_ce, chunked_token_ce, fused_linear_loss

log = logging.getLogger(__name__)

# Given no attention mask, transformers' mask builder looks for packed sequences in the
# position ids and reads the answer back to the host (masking_utils.
# find_packed_sequence_indices): a stream sync in every training forward on a GPU. gptlab
# never passes a mask and never pads on the left (a sample's padding follows its end), so
# model.attn_implementation=sdpa trains with the same SDPA kernel registered under a name the
# mask builder does not know: it skips straight to SDPA's is_causal path. Exports still say sdpa.
CAUSAL_SDPA = "gptlab_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


def attention(name: str) -> str:
    return CAUSAL_SDPA if name == "sdpa" else name


def build_model(model_cfg, tokenizer, block_size: int):
    if model_cfg.pretrained_path:
        return never_padded(load_pretrained(model_cfg, tokenizer, block_size))
    if model_cfg.n_embd % model_cfg.n_head:
        raise ConfigError(f"model.n_embd={model_cfg.n_embd} is not divisible by model.n_head={model_cfg.n_head}")
    if model_cfg.vocab_pad_multiple < 1:
        raise ConfigError(f"model.vocab_pad_multiple={model_cfg.vocab_pad_multiple}: give 1 (no padding) or more")
    # Matmuls over a vocab that is a multiple of 64 use whole tensor-core tiles (nanoGPT: 50257 -> 50304).
    vocab_size = math.ceil(len(tokenizer) / model_cfg.vocab_pad_multiple) * model_cfg.vocab_pad_multiple
    ids = dict(bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = ARCHITECTURES[model_cfg.arch](model_cfg, vocab_size, ids)
    if model_cfg.zero_init_proj:  # each block starts as the identity (modded-nanogpt)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(OUTPUT_PROJECTIONS):
                    p.zero_()
    if vocab_size > len(tokenizer):  # padding ids are never sampled
        model.generation_config.suppress_tokens = list(range(len(tokenizer), vocab_size))
    c = model.config
    log.info("%s with %.2fM parameters (%d layers, %d wide, vocab %d)", type(model).__name__,
             count_parameters(model) / 1e6, c.num_hidden_layers, c.hidden_size, c.vocab_size)
    return never_padded(model)


def _gpt2(model_cfg, vocab_size: int, ids: dict):
    config = GPT2Config(vocab_size=vocab_size, n_positions=model_cfg.n_positions, n_embd=model_cfg.n_embd,
                        n_layer=model_cfg.n_layer, n_head=model_cfg.n_head,
                        activation_function=model_cfg.activation or "gelu_pytorch_tanh",
                        tie_word_embeddings=model_cfg.tie_embeddings, resid_pdrop=model_cfg.dropout,
                        embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout, **_init(model_cfg), **ids)
    config._attn_implementation = attention(model_cfg.attn_implementation)
    return GPT2LMHeadModel(config)


def _init(model_cfg) -> dict:
    # Left out when unset, so the config keeps its class's own default (and its repr stays short).
    return {} if model_cfg.init_std is None else {"initializer_range": model_cfg.init_std}


def _rotary(config_class, model_class):
    """Llama's block (rotary positions, RMSNorm, a SiLU-gated MLP, no biases); Qwen3's adds RMSNorm
    on each head's queries and keys (QK-norm). The gated MLP's three matrices are 8/3 as wide as
    the model (rounded up to a multiple of 64), as many weights as GPT-2's two at 4x."""
    def build(model_cfg, vocab_size: int, ids: dict):
        config = config_class(
            vocab_size=vocab_size, hidden_size=model_cfg.n_embd,
            intermediate_size=math.ceil(8 * model_cfg.n_embd / 3 / 64) * 64,
            num_hidden_layers=model_cfg.n_layer, num_attention_heads=model_cfg.n_head,
            num_key_value_heads=model_cfg.n_head, head_dim=model_cfg.n_embd // model_cfg.n_head,
            max_position_embeddings=model_cfg.n_positions, hidden_act=model_cfg.activation or "silu",
            tie_word_embeddings=model_cfg.tie_embeddings, **_init(model_cfg), **ids)
        config._attn_implementation = attention(model_cfg.attn_implementation)
        return model_class(config)
    return build


ARCHITECTURES = {"gpt2": _gpt2, "llama": _rotary(LlamaConfig, LlamaForCausalLM),
                 "qwen3": _rotary(Qwen3Config, Qwen3ForCausalLM)}
# The attention and MLP output projections, by each architecture's names.
OUTPUT_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight")


def _no_padding_guess(input_ids, attention_mask) -> None:
    pass


def never_padded(model):
    """Turn off what a model does for padding, which gptlab never feeds it.

    The input embedding's padding_idx (Llama's and Qwen3's, from config.pad_token_id) would
    leave the pad id's row untrained, and the pad id is gptlab's eos (and many tokenizers'),
    which ends every document: without padding it only ever stops real tokens' gradients.

    And transformers' guess that a pad id at either end of the ids means padding.

    gptlab never pads: training and evaluation read packed blocks, and a sample is one
    prompt. But eos doubles as the pad id and starts or ends many blocks, and generate()
    drops an all-ones attention_mask (transformers 5), so GPT-2 warned "We strongly
    recommend passing in an `attention_mask`" in every default run. An explicit mask on
    every forward would cost a mask per step and change the attention path for nothing.
    """
    embedding = model.get_input_embeddings()
    if isinstance(embedding, nn.Embedding):
        embedding.padding_idx = None
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.warn_if_padding_and_no_attention_mask = _no_padding_guess
    return model


def pretrained_dir(model_cfg) -> Path:
    """The local directory of model.pretrained_path: the user's own, or a Hub id's cached snapshot."""
    if is_hub_id(model_cfg.pretrained_path):
        path = resolve(model_cfg.pretrained_path, model_cfg.revision, key="model.pretrained_path").path
    else:
        path = Path(model_cfg.pretrained_path).expanduser()
    if not (path / "config.json").is_file():
        raise MissingPathError(f"model.pretrained_path={model_cfg.pretrained_path}: no config.json there; "
                               "expected a Hugging Face model directory (save_pretrained) or a Hub id")
    return path


def max_positions(config) -> int | None:
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return None


def check_block_size(model_cfg, block_size: int) -> None:
    """Before any data is prepared: a block longer than the position table cannot train."""
    if not model_cfg.pretrained_path:
        if block_size > model_cfg.n_positions:
            raise ConfigError(f"data.block_size={block_size} exceeds model.n_positions={model_cfg.n_positions}")
        return
    if is_hub_id(model_cfg.pretrained_path) and not is_commit(model_cfg.revision):
        return  # checked once run.py's pin_hub_ids has fetched it, on one process per machine
    path = pretrained_dir(model_cfg)
    n_pos = max_positions(AutoConfig.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code))
    if n_pos is not None and block_size > n_pos:
        raise ConfigError(f"data.block_size={block_size} exceeds the {n_pos} positions of the pretrained model "
                          f"in {path}; set data.block_size<={n_pos}")


def load_pretrained(model_cfg, tokenizer, block_size: int):
    path = pretrained_dir(model_cfg)
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code,
                                                 attn_implementation=attention(model_cfg.attn_implementation))
    n_emb = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_emb:
        # ruGPT-3's tokenizer files name an <|endoftext|> that is not in its vocab, so
        # loading them adds one token: its embedding row is new and untrained.
        warnings.warn(f"the tokenizer has {len(tokenizer)} tokens but the model in {path} embeds {n_emb}; "
                      f"resizing the embeddings to {len(tokenizer)} (new rows are untrained)")
        log.warning("resizing token embeddings %d -> %d", n_emb, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    log.info("pretrained %s from %s: %.2fM parameters, vocab %d (model.* architecture keys are ignored)",
             type(model).__name__, path, count_parameters(model) / 1e6, model.config.vocab_size)
    return model


def count_parameters(model, trainable_only: bool = False) -> int:
    """Unique parameters: GPT-2 ties the LM head to the token embedding."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
               if p.requires_grad or not trainable_only)


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


# Causal LMs whose logits are their LM head's product with the final hidden states, nothing
# scaled or capped after it, so the loss can take the head over (loss.fused_linear_loss).
FUSED_HEAD = (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM)


def _lm_head(model):
    """The causal LM inside a prepared model (DDP, compiled, peft) whose LM head the loss fuses; else None."""
    inner = base_of(extract_model_from_parallel(model, keep_torch_compile=False))
    return inner if isinstance(inner, FUSED_HEAD) else None


def _final_hidden(model, inputs: torch.Tensor) -> torch.Tensor:
    """(B, T, C) after the final layer norm, through the wrapped model (so DDP and autocast see
    the call), with no logits and no KV cache."""
    no_logits = torch.empty(0, dtype=torch.long, device=inputs.device)
    out = model(input_ids=inputs, use_cache=False, logits_to_keep=no_logits, output_hidden_states=True)
    return out.hidden_states[-1]


def forward_loss(model, labels: torch.Tensor, loss_fn, z=None) -> torch.Tensor:
    """The training loss Σ w·CE of `model` (as prepared: DDP, compiled, autocast) on a (B, T) batch.

    `z` is this process's share of the step's denominator (see loss.py). The inputs are the
    labels with padding read as token 0: it only ever follows a sample's last token, where
    causal attention hides it from every real one.
    For GPT-2, Llama and Qwen3 the model stops at the final hidden states and the LM head is
    fused into the loss (see loss.fused_linear_loss); any other model computes its logits.
    Under LoRA the peft wrapper passes the call through to the model inside, whose (frozen)
    head the fused loss reads.
    """
    inputs, lm = labels.clamp_min(0), _lm_head(model)
    if lm is None:
        return loss_fn(model(input_ids=inputs, use_cache=False).logits, labels, z)
    return fused_linear_loss(_final_hidden(model, inputs), lm.lm_head.weight, labels,
                             loss_fn.token_weights(labels, z))


@torch.no_grad()
def token_losses(model, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) next-token cross-entropies, 0 at padding (evaluation). FUSED_HEAD models' come from the LM
    head a chunk of rows at a time, so the (B, T, V) logits never exist; any other model's from its logits."""
    inputs, lm = labels.clamp_min(0), _lm_head(model)
    if lm is None:
        return _token_ce(model(input_ids=inputs, use_cache=False).logits, labels)
    return chunked_token_ce(_final_hidden(model, inputs), lm.lm_head.weight, labels)


def apply_activation_checkpointing(model, enabled: bool) -> None:
    """trainer.activation_checkpointing: every transformer block of the HF model recomputed in backward.

    Transformers' own switch (non-reentrant torch.utils.checkpoint around each block's forward,
    so hooks such as DDP's or FSDP2's stay outside it, and dropout masks are replayed from the
    saved RNG state). Blocks then receive use_cache=False, which training passes anyway.
    """
    if not enabled:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"trainer.activation_checkpointing=true: {type(model).__name__} does not support "
                          "activation checkpointing; set trainer.activation_checkpointing=false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    log.info("activation checkpointing: each transformer block is recomputed in the backward pass")
