"""Generation: the CLI on runs, exports and checkpoints, sampling options, and samples logged in training."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED, read_metrics, requires_shared, run_training

TINY_GPT2 = SHARED / "models" / "tiny-random-gpt2"


def cli(capsys, *argv):
    from gptlab.generate import main

    main([str(a) for a in argv] + ["--json"])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def untrained_export(trained_run, tmp_path_factory):
    """The trained run's architecture and tokenizer with freshly initialised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    final = trained_run[0] / "final"
    out = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(final)).save_pretrained(out)
    AutoTokenizer.from_pretrained(final).save_pretrained(out)
    return out


def test_trained_weights_are_loaded_not_reinitialised(trained_run, untrained_export, capsys):
    run_dir = trained_run[0]
    args = ["--prompt", "def ", "--max_new_tokens", 24, "--seed", 3]
    from_run = cli(capsys, run_dir, *args)[0]["samples"]
    from_export = cli(capsys, run_dir / "final", *args)[0]["samples"]
    untrained = cli(capsys, untrained_export, *args)[0]["samples"]
    assert from_run == from_export
    assert from_run != untrained  # seed 004 sampled from a re-created, random model
    assert all(s.startswith("def ") and len(s) > 4 for s in from_run + untrained)

    from transformers import AutoModelForCausalLM
    from gptlab.generate import generate
    from gptlab.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert generate(model, load_tokenizer(run_dir / "final"), "def ", 24, seed=3) == from_run


def test_sampling_options(trained_run):
    from gptlab.generate import generate
    from gptlab.trained import load_trained

    t = load_trained(trained_run[0])
    gen = lambda **kw: generate(t.model, t.tokenizer, "import ", 20, **kw)  # noqa: E731
    assert gen(seed=1) == gen(seed=1)
    assert gen(seed=1) != gen(seed=2)
    greedy = gen(seed=1, do_sample=False)
    assert gen(seed=5, do_sample=True, top_k=1) == greedy  # top_k reaches the sampler
    assert gen(seed=5, do_sample=True, top_p=1e-6) == greedy  # so does top_p
    assert gen(seed=5, do_sample=True, temperature=1e-4) == greedy  # and temperature
    three = gen(seed=1, num_return_sequences=3)
    assert len(three) == 3 and len(set(three)) > 1
    beams = gen(seed=1, do_sample=False, num_beams=2, num_return_sequences=2)
    assert len(beams) == 2 and beams[0] != beams[1]
    assert gen(seed=9, do_sample=False, num_beams=2, num_return_sequences=2) == beams
    assert gen(seed=1, do_sample=False, repetition_penalty=5.0) != greedy
    # max_length counts the prompt (seeds 003/004) and replaces max_new_tokens
    prompt_tokens = len(t.tokenizer("import ", add_special_tokens=False)["input_ids"])
    short = generate(t.model, t.tokenizer, "import ", 7, do_sample=False)
    assert gen(do_sample=False, max_length=prompt_tokens + 7) == short != greedy


def test_cli_defaults_come_from_the_run_and_prompts_file(trained_run, tmp_path, capsys):
    run_dir = trained_run[0]
    out = cli(capsys, run_dir, "--max_new_tokens", 4)
    assert [r["prompt"] for r in out] == ["def ", "import "]  # trainer.sample_prompts of the run
    (tmp_path / "p.json").write_text(json.dumps(["class A:\n    def ", "x = "]))
    (tmp_path / "p.txt").write_text("for i in \n\nwhile \n")
    out = cli(capsys, run_dir, "--prompts_file", tmp_path / "p.json", "--max_new_tokens", 4,
              "--num_return_sequences", 2, "--no-do_sample", "--num_beams", 2)
    assert [r["prompt"] for r in out] == ["class A:\n    def ", "x = "]
    assert all(len(r["samples"]) == 2 for r in out)
    out = cli(capsys, run_dir, "--prompts_file", tmp_path / "p.txt", "--max_new_tokens", 4)
    assert [r["prompt"] for r in out] == ["for i in ", "while "]
    with pytest.raises(SystemExit, match="num_beams"):
        cli(capsys, run_dir, "--prompt", "a", "--no-do_sample", "--num_return_sequences", 2)


def test_checkpoint_dir_and_unfinished_run(trained_run, tmp_path):
    """A checkpoint generates like the export of the same step; a run without final/ uses its
    latest complete checkpoint, skipping a truncated one."""
    from gptlab.generate import generate
    from gptlab.trained import load_trained

    run_dir = trained_run[0]
    ref = load_trained(run_dir / "final")
    expected = generate(ref.model, ref.tokenizer, "def ", 16, seed=2)
    ckpt = run_dir / "checkpoints" / "step_0000040"
    t = load_trained(ckpt)
    assert t.source == ckpt and t.run_cfg.trainer.max_steps == 40
    assert generate(t.model, t.tokenizer, "def ", 16, seed=2) == expected

    crashed = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("final"))
    broken = shutil.copytree(crashed / "checkpoints" / "step_0000040", crashed / "checkpoints" / "step_0000050")
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    t = load_trained(crashed)
    assert t.source.name == "step_0000040"
    assert generate(t.model, t.tokenizer, "def ", 16, seed=2) == expected
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model here"):
        load_trained(tmp_path / "empty")


def test_training_logs_samples_at_every_evaluation(trained_run):
    from gptlab.generate import generate
    from gptlab.trained import load_trained

    run_dir = trained_run[0]
    rows = read_metrics(run_dir)
    for i, prompt in enumerate(["def ", "import "]):
        samples = [(r["step"], r[f"sample/{i}"]) for r in rows if f"sample/{i}" in r]
        assert [s for s, _ in samples] == [20, 40]
        assert all(text.startswith(prompt) for _, text in samples)
    # the last one is what the exported model generates with the run's settings
    t = load_trained(run_dir)
    last = [r["sample/0"] for r in rows if "sample/0" in r][-1]
    assert generate(t.model, t.tokenizer, "def ", 8, seed=1337, do_sample=True, top_k=50, top_p=1.0,
                    temperature=1.0, num_beams=1, num_return_sequences=1, repetition_penalty=1.0)[0] == last

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(next((run_dir / "tb").glob("events.out.tfevents.*"))))
    acc.Reload()
    assert {"sample/0/text_summary", "sample/1/text_summary"} <= set(acc.Tags()["tensors"])


def test_sampling_during_training_leaves_the_losses_alone(tmp_path, cache_dir, tiny_corpus):
    # Dropout draws from the global RNG, so a sampler that moved it would change the losses.
    common = [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
              "tokenizer.vocab_size=384", "model.dropout=0.2", "trainer.max_steps=4", "trainer.eval_every=2"]
    run_training([f"run_dir={tmp_path / 'quiet'}", *common, "trainer.sample_prompts=[]"])
    run_training([f"run_dir={tmp_path / 'chatty'}", *common, "trainer.sample_prompts=[\"a\",\"b\"]"])
    loss = lambda d: [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / d) if "train/loss" in r]  # noqa
    assert loss("quiet") == loss("chatty") and len(loss("quiet")) == 4
    assert any("sample/1" in r for r in read_metrics(tmp_path / "chatty"))
    assert not any("sample/0" in r for r in read_metrics(tmp_path / "quiet"))


@requires_shared
def test_cyrillic_comes_out_readable():
    """Byte-level BPE stores Cyrillic as byte symbols; decoding must map them back to UTF-8."""
    prompt = "Пьер закашлялся и"
    proc = subprocess.run([sys.executable, "-m", "gptlab.generate", str(TINY_GPT2), "--prompt", prompt,
                           "--max_new_tokens", "5", "--json"], cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout.decode("utf-8"))
    text = out[0]["samples"][0]
    assert text.startswith(prompt) and "Ð" not in text[:len(prompt)]

    from gptlab.tokenizer import load_tokenizer
    tok = load_tokenizer(TINY_GPT2)
    raw = "".join(tok.convert_ids_to_tokens(tok(prompt)["input_ids"]))
    assert "Ð" in raw  # what printing the token strings (seed 003) shows
