"""Train a byte-level BPE with HF `tokenizers`, or load a saved tokenizer from a directory."""
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int,
              special_tokens: Sequence[str], length: Optional[int] = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE as in GPT-2; the first special token is bos, eos and pad."""
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"tokenizer.vocab_size={vocab_size} is below the 256 byte symbols plus specials")
    if not special_tokens:
        raise ValueError("tokenizer.special_tokens needs at least one token to serve as eos")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    eos = special_tokens[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos,
                                   model_max_length=10**9)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos token; gptlab separates documents with it")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
