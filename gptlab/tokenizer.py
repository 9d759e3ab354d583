"""Train a BPE with HF `tokenizers`, or load a saved tokenizer from a directory.

tokenizer.kind=byte_level (the default) is GPT-2's byte-level BPE: any text encodes, and
decodes back exactly. whitespace is seeds 000/001's: words split on whitespace and
punctuation (which it drops), merges over the characters seen in training, `[UNK]` for any
other; decoding joins the tokens with spaces.

Whichever it is, the tokenizer has an eos token (documents are separated by it), a pad
token (eos if it had none), a content hash that keys the token cache, and it is saved
into the run directory next to the model whose embedding it must fit.
"""
import hashlib
import logging
import math
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from .errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def tokenizer_path(cfg) -> Optional[str]:
    """Where a config's tokenizer comes from; None means a BPE trained on the train split.

    The one place this is decided: training, `prepare` and the cache key all ask here,
    so `prepare` builds exactly the cache a run with the same overrides reads.
    """
    return cfg.tokenizer.path or cfg.model.pretrained_path or None  # a model's own tokenizer, never retrained


def sample_evenly(texts: Iterable[str], total_bytes: int, max_bytes: Optional[int]) -> Iterator[str]:
    """At most `max_bytes` (UTF-8) of whole documents, spread evenly over `texts`.

    `total_bytes` is the size of all of them (an estimate is fine): document i is kept
    when the running fraction max_bytes/total_bytes crosses an integer there, so the
    sample is deterministic and covers the corpus from start to end, not its first part.
    """
    if max_bytes is None or total_bytes <= max_bytes:
        yield from texts
        return
    fraction, read = max_bytes / total_bytes, 0
    for i, text in enumerate(texts):
        if math.floor((i + 1) * fraction) > math.floor(i * fraction):
            size = len(text.encode())
            if read + size > max_bytes:
                continue
            read += size
            yield text


KINDS = ("byte_level", "whitespace")
UNK, PAD = "[UNK]", "[PAD]"  # the whitespace kind's unknown and padding tokens, by the seeds' names


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, special_tokens: Sequence[str],
              length: Optional[int] = None, kind: str = "byte_level") -> PreTrainedTokenizerFast:
    """A BPE of `kind`; the first special token is bos and eos (and pad, unless [PAD] is one)."""
    if not special_tokens:
        raise ValueError("tokenizer.special_tokens needs at least one token to serve as eos")
    if kind == "byte_level":
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"tokenizer.vocab_size={vocab_size} is below the 256 byte symbols plus specials")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "whitespace":
        tok = Tokenizer(models.BPE(unk_token=UNK if UNK in special_tokens else None))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        alphabet = []
    else:
        raise ValueError(f"tokenizer.kind={kind!r}: choose {' or '.join(KINDS)}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    eos = special_tokens[0]
    roles = {"unk_token": UNK} if UNK in special_tokens and kind == "whitespace" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos,
                                   pad_token=PAD if PAD in special_tokens else eos, model_max_length=10**9, **roles)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """AutoTokenizer, or GPT2TokenizerFast for a bare vocab.json + merges.txt directory.

    ruGPT-3's files have no tokenizer_class and no config.json, so AutoTokenizer cannot
    tell what they are; they are a GPT-2 byte-level BPE.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingPathError(f"tokenizer.path={path}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            raise ConfigError(f"tokenizer.path={path}: cannot load a tokenizer there: {str(e).splitlines()[0]}") from e
        log.info("AutoTokenizer cannot load %s (%s); loading vocab.json + merges.txt as GPT-2 BPE",
                 path, str(e).splitlines()[0])
        tok = GPT2TokenizerFast.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer.path={path}: the tokenizer has no eos token; gptlab separates documents with it")
    base = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    if tok.eos_token_id >= base:
        log.warning("the eos token %r of %s is not in its vocabulary and was added as id %d: a pretrained "
                    "model has no trained embedding row for it", tok.eos_token, path, tok.eos_token_id)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# A model directory (model.pretrained_path) holds the tokenizer beside the weights, which
# must not key the token cache: hashing them costs a read of every byte, and a fine-tuned
# export with the same tokenizer would miss the cache.
MODEL_FILES = ("config.json", "generation_config.json")
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")


def tokenizer_hash(path: str | Path) -> str:
    """Content hash of a saved tokenizer directory (its files, not their mtimes; no model files)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).expanduser().iterdir()
                    if p.is_file() and p.name not in MODEL_FILES and not p.name.endswith(MODEL_SUFFIXES)):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def check_vocab(tokenizer, embedding_rows: int) -> None:
    """Every token id must have an embedding row, or the first batch fails deep in torch."""
    if len(tokenizer) > embedding_rows:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                          f"{embedding_rows} rows; use the model's own tokenizer or resize the embedding")


def _byte_stand_ins() -> dict:
    """Byte-level BPE's printable stand-in character for each byte value (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(extra)}}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """The UTF-8 bytes of text each token id stands for (0 for a special token), for bits per byte.

    Byte-level BPE (GPT-2's, ruGPT-3's, gptlab's default) spells each token with one printable
    stand-in per raw byte, so a token holding part of a multi-byte character counts exactly its
    own bytes. Any other tokenizer (tokenizer.kind=whitespace) counts the bytes of each token's
    decoded text, which is exact for whole words and characters.
    """
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    stand_ins = _byte_stand_ins()
    byte_level = all(c in stand_ins for i, t in enumerate(tokens) if i not in special for c in t)
    lengths = np.zeros(n, dtype=np.int64)
    for i, t in enumerate(tokens):
        if i not in special:
            lengths[i] = len(t) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return lengths
