"""Bits per byte: the validation loss in bits per UTF-8 byte of the text, comparable across tokenizers."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import SHARED, requires_shared
from test_pipeline import make_docs, run_prepare, write_jsonl
from gptlab.evaluate import evaluate
from gptlab.tokenizer import load_tokenizer, token_byte_lengths


@requires_shared
@pytest.mark.parametrize("name", ["gpt2", "rugpt3"])
def test_token_bytes_are_the_raw_bytes_of_byte_level_bpe(name):
    tok = load_tokenizer(SHARED / "tokenizers" / name)
    lengths = token_byte_lengths(tok)
    text = "Война и мир — naïve café, 日本語; x += 1\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(len(tok.decode([i]).encode()) != lengths[i] for i in ids)  # partial characters: decode is no help
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert lengths[tok.eos_token_id] == 0


def _one_process():
    from contextlib import nullcontext
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                           reduce=lambda t, reduction: t, autocast=nullcontext)


def test_eval_bpb_equals_the_bits_over_the_bytes_of_the_validation_text(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", make_docs(60))
    data = run_prepare(tmp_path / "cache", corpus)
    tok, valid = data.tokenizer, data.valid
    # The split records its text's bytes: every document, as decoded back from the stream.
    ids = np.asarray(valid.tokens)
    cuts = np.flatnonzero(ids == tok.eos_token_id)
    docs = [tok.decode(ids[a + 1 if i else 0:b].tolist()) for i, (a, b) in enumerate(zip([0, *cuts[:-1]], cuts))]
    assert data.info["valid"]["bytes"] == sum(len(d.encode()) for d in docs) > 0

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    got = evaluate(model, valid, 4, _one_process())
    # Independently: each block's targets through the HF model in float64; EOS targets stand for no text.
    nats, nbytes = 0.0, 0
    model.double().eval()
    with torch.no_grad():
        for b in range(len(valid)):
            x = torch.as_tensor(np.asarray(valid.tokens[b * 16:(b + 1) * 16], dtype=np.int64))[None]
            logp = model(input_ids=x).logits[0, :-1].log_softmax(-1)
            targets = x[0, 1:]
            text = targets != tok.eos_token_id
            nats -= logp[text.nonzero()[:, 0], targets[text]].sum().item()
            nbytes += len(tok.decode(targets[text].tolist(), clean_up_tokenization_spaces=False).encode("utf-8"))
    assert got["eval/bytes"] == nbytes
    assert got["eval/bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert got["eval/bpb"] != pytest.approx(got["eval/loss"] / math.log(2), rel=1e-2)  # not bits per token
