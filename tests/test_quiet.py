"""A newcomer's console: no warnings that are not the user's to act on."""
import logging
import warnings

import pytest

from conftest import ROOT, SHARED, requires_shared


@requires_shared
@pytest.mark.parametrize("prompt", ["def f(x):", "", "<|endoftext|>"])  # the last is the pad token itself
def test_sampling_passes_the_attention_mask(prompt, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab.generate import generate
    from gptlab.tokenizer import load_tokenizer

    tok = load_tokenizer(SHARED / "models" / "tiny-random-gpt2")
    # a from-scratch model as gptlab builds it: pad = eos, so a pad id in the prompt is plausible
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tok), n_positions=32,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    logging.Logger.warning_once.cache_clear()  # transformers says it once per process: say it here if it would
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        generate(model, tok, prompt, max_new_tokens=3)
        generate(model, tok, prompt, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if "attention_mask" in s or "attention mask" in s or "pad token" in s], said



@requires_shared
def test_a_block_that_starts_and_ends_with_eos_is_not_taken_for_padding(caplog):
    """Packed blocks often start or end with eos, which is also the pad id."""
    import torch

    from conftest import compose
    from gptlab.model import build_model
    from gptlab.tokenizer import load_tokenizer

    tok = load_tokenizer(SHARED / "models" / "tiny-random-gpt2")
    model = build_model(compose(["debug=smoke"]).model, tok, 16)
    assert model.config.pad_token_id == tok.eos_token_id  # the export still knows its pad id
    ids = torch.tensor([[tok.eos_token_id, 11, 12, tok.eos_token_id]])
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.INFO):
        model(input_ids=ids)
    assert "attention_mask" not in caplog.text

def test_the_launch_file_the_readme_gives_is_quiet(caplog):
    """Without an accelerate config, launch prints a block of defaults 'not passed';
    `--config_file launch/accelerate/cpu.yaml` (or `accelerate config default`) silences it."""
    from accelerate.commands import launch

    parser = launch.launch_command_parser()
    with caplog.at_level(logging.WARNING, logger=launch.logger.name):
        launch._validate_launch_command(parser.parse_args(["--cpu", "train.py"]))
    assert "not passed" in caplog.text  # the noise this guards against still exists upstream
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=launch.logger.name):
        launch._validate_launch_command(parser.parse_args(
            ["--config_file", str(ROOT / "launch" / "accelerate" / "cpu.yaml"), "train.py"]))
    assert "not passed" not in caplog.text


def test_log_lines_print_above_the_progress_bar_not_into_it(tmp_path):
    """A line logged mid-run starts a line of its own: the bar is cleared, the line printed, the bar redrawn."""
    import io

    from tqdm.auto import tqdm

    from gptlab.console import setup_logging

    console = io.StringIO()
    root, before = logging.getLogger(), logging.getLogger().handlers[:]
    try:
        setup_logging(tmp_path, is_main=True)
        console_handler = next(h for h in root.handlers if not isinstance(h, logging.FileHandler))
        console_handler.setStream(console)
        with tqdm(total=4, desc="train", file=console, mininterval=0) as bar:
            bar.update(1)
            logging.getLogger("gptlab.loop").info("step 1: loss 10.8")
            bar.update(1)
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
            h.close()
        for h in before:
            root.addHandler(h)
    text = console.getvalue()
    at = text.index("step 1: loss 10.8")
    line_start = text.rfind("[", 0, at)  # the formatter's "[HH:MM:SS INFO gptlab.loop] "
    assert text[line_start - 1] in "\r\n", repr(text[max(0, line_start - 40):at])
    assert "train:  50%" in text[at:]  # the bar came back below the line
    assert "step 1: loss 10.8" in (tmp_path / "train.log").read_text()
