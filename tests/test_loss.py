import math

import torch
import torch.nn.functional as F

from conftest import SHARED, requires_shared

from gptlab.loss import cross_entropy_loss, keytoken_ids, keytoken_loss


def seed_keytoken_loss(inputs, logits, keytoken_ids, alpha=1.0):
    """Seed 002's formula, as written in the course notebook."""
    shift_labels = inputs[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
    loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    loss_per_sample = loss.view(shift_logits.size(0), shift_logits.size(1)).mean(axis=1)
    weights = torch.stack([(inputs == kt).float() for kt in keytoken_ids]).sum(axis=[0, 2])
    weights = alpha * (1.0 + weights)
    return (loss_per_sample * weights).mean(), weights


def test_keytoken_matches_seed_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, 50, generator=g)
    inputs = torch.randint(0, 50, (4, 16), generator=g)
    inputs[0, :5] = 7  # make the weights differ between samples
    kt = [7, 11, 13]
    ref, weights = seed_keytoken_loss(inputs, logits, kt, alpha=0.5)
    got = keytoken_loss(logits, inputs, torch.tensor(kt), alpha=0.5)
    assert weights.unique().numel() > 1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    normalized = keytoken_loss(logits, inputs, torch.tensor(kt), alpha=0.5, normalize=True)
    torch.testing.assert_close(normalized, ref / weights.mean(), rtol=0, atol=1e-6)


def test_cross_entropy_is_shifted_token_mean():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 30, generator=g)
    x = torch.randint(0, 30, (2, 8), generator=g)
    manual = sum(-F.log_softmax(logits[b, t], -1)[x[b, t + 1]] for b in range(2) for t in range(7)) / 14
    torch.testing.assert_close(cross_entropy_loss(logits, x), manual, rtol=0, atol=1e-6)
    uniform = cross_entropy_loss(torch.zeros(2, 8, 30), x)
    assert math.isclose(uniform.item(), math.log(30), rel_tol=1e-6)


@requires_shared
def test_keytoken_ids_tries_leading_space_and_reports_multi_token_words():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "gpt2"))
    ids, skipped = keytoken_ids(tok, ["def", "fit", "xqzxqzxqz"])
    assert skipped == ["xqzxqzxqz"]
    expected = {tok.convert_tokens_to_ids(t) for t in ("def", "Ġdef", "fit", "Ġfit")}
    assert expected == set(ids)
