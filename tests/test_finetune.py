"""Fine-tuning from local HF models and gptlab exports, the evaluate CLI, optimizers, per-epoch losses."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SHARED, read_metrics, requires_shared, run_training, series

TINY_GPT2 = SHARED / "models" / "tiny-random-gpt2"


def tiny_data(run_dir, cache_dir, corpus, *extra):
    # AdamW, as the fine-tuning presets: Muon is the from-scratch default
    return [f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", "optim=adamw", f"data.paths=[{corpus}]",
            "data.valid_fraction=0.2", *extra]


@requires_shared
def test_finetune_a_local_hf_model(tmp_path, tiny_corpus):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, pipeline

    cache = tmp_path / "cache"
    run_training(tiny_data(tmp_path / "run", cache, tiny_corpus, f"model.pretrained_path={TINY_GPT2}",
                           "trainer.max_steps=2", "trainer.sample_prompts=[]"))
    run_dir = tmp_path / "run"
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.tokenizer.path == str(TINY_GPT2)  # the model's own tokenizer...
    assert not (cache / "tokenizers").exists()  # ...and none trained
    assert len(AutoTokenizer.from_pretrained(run_dir / "tokenizer")) == 50257
    losses = series(read_metrics(run_dir), "train/loss")
    assert losses[0][1] == pytest.approx(math.log(50257), abs=0.05)  # the fixture's weights are random

    # Positions past the 64-token blocks get no gradient, so Adam leaves them exactly as loaded.
    before = load_file(str(TINY_GPT2 / "model.safetensors"))
    after = load_file(str(run_dir / "final" / "model.safetensors"))
    wpe = next(k for k in before if k.endswith("wpe.weight"))
    torch.testing.assert_close(after["transformer.wpe.weight"][64:], before[wpe][64:], rtol=0, atol=0)
    assert not torch.equal(after["transformer.wpe.weight"][:64], before[wpe][:64])

    gen = pipeline("text-generation", model=str(run_dir / "final"))
    assert gen("def ", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("def ")


@requires_shared
def test_block_size_beyond_the_model_positions_stops_before_any_data_work(tmp_path, tiny_corpus):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="data.block_size=2048 exceeds the 1024 positions"):
        run_training(tiny_data(tmp_path / "run", cache, tiny_corpus, f"model.pretrained_path={TINY_GPT2}",
                               "data.block_size=2048"))
    assert not cache.exists()
    with pytest.raises(ValueError, match="exceeds model.n_positions=128"):
        run_training(tiny_data(tmp_path / "run2", cache, tiny_corpus, "data.block_size=256"))
    assert not cache.exists()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_training(tiny_data(tmp_path / "run3", cache, tiny_corpus, f"model.pretrained_path={tmp_path}"))


@requires_shared
def test_more_tokens_than_embeddings_resizes_with_a_warning():
    from gptlab.model import load_pretrained
    from gptlab.tokenizer import load_tokenizer

    tok = load_tokenizer(TINY_GPT2)
    tok.add_tokens(["<новый>"])
    cfg = OmegaConf.create({"pretrained_path": str(TINY_GPT2), "trust_remote_code": False,
                            "attn_implementation": "sdpa"})
    with pytest.warns(UserWarning, match="resizing the embeddings to 50258"):
        model = load_pretrained(cfg, tok, 64)
    assert model.get_input_embeddings().num_embeddings == 50258
    assert model.get_output_embeddings().weight.shape[0] == 50258


def test_finetune_a_gptlab_export(trained_run, tmp_path, cache_dir, tiny_corpus):
    """Fine-tuning starts exactly where the export ended: same weights, tokenizer and data."""
    run_dir, result = trained_run
    n_tokenizers = len(list((cache_dir / "tokenizers").iterdir()))
    # lr ~0 (0 itself is refused): the first evaluation must reproduce the export's final eval/loss
    run_training(tiny_data(tmp_path, cache_dir, tiny_corpus, f"model.pretrained_path={run_dir / 'final'}",
                           "optim.lr=1e-12", "scheduler=constant", "trainer.max_steps=1",
                           "trainer.sample_prompts=[]"))
    assert series(read_metrics(tmp_path), "eval/loss")[0][1] == pytest.approx(result["eval/loss"], abs=1e-6)
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_text() == \
        (run_dir / "final" / "tokenizer.json").read_text()
    assert len(list((cache_dir / "tokenizers").iterdir())) == n_tokenizers


def test_token_cache_key_ignores_the_weights_beside_the_tokenizer(trained_run, tmp_path):
    """A fine-tuned export keeps its tokenizer, so its next fine-tune must hit the token cache."""
    import shutil

    from gptlab.tokenizer import tokenizer_hash

    export = shutil.copytree(trained_run[0] / "final", tmp_path / "export")
    before = tokenizer_hash(export)
    with open(export / "model.safetensors", "ab") as f:
        f.write(b"other weights")
    (export / "config.json").write_text("{}")
    assert tokenizer_hash(export) == before
    (export / "tokenizer_config.json").write_text("{}")
    assert tokenizer_hash(export) != before


def test_evaluate_cli(trained_run, tmp_path, capsys):
    from gptlab.evaluate import main

    run_dir, result = trained_run
    out = main([str(run_dir / "final"), "--output", str(tmp_path / "e.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(out))
    # with no overrides the corpus is the run's own: its validation loss comes back exactly
    assert out["loss"] == pytest.approx(result["eval/loss"], abs=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert out["tokens"] == out["blocks"] * 63  # 63 next-token targets per 64-token block
    train = main([str(run_dir), "--split", "train"])
    assert train["blocks"] > out["blocks"] and train["loss"] != out["loss"]
    half = main([str(run_dir), "data.block_size=32", "--batch_size", "3"])
    assert half["blocks"] in (2 * out["blocks"], 2 * out["blocks"] + 1) and half["block_size"] == 32
    assert half["tokens"] == half["blocks"] * 31 and half["loss"] != out["loss"]
    # --max_blocks: the split's first N blocks, however they are batched; all of them past its size
    assert out["blocks"] > 2
    first = [main([str(run_dir), "--max_blocks", "2", "--batch_size", b]) for b in ("1", "2")]
    assert [f["blocks"] for f in first] == [2, 2] and first[0]["of_blocks"] == out["blocks"]
    assert first[0]["tokens"] == 2 * 63 and first[0]["loss"] == pytest.approx(first[1]["loss"], abs=1e-9)
    assert first[0]["loss"] != out["loss"]
    assert main([str(run_dir), "--max_blocks", "100000"])["loss"] == pytest.approx(out["loss"], abs=1e-9)
    with pytest.raises(SystemExit):
        main([str(run_dir), "--max_blocks", "0"])
    # Bits per byte and the run's multiple-choice task, as the run's last evaluation logged them.
    assert out["bpb"] == pytest.approx(result["eval/bpb"], abs=1e-9) and out["bytes"] > out["tokens"]
    micro = OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer.micro_batch_size
    tasks = main([str(run_dir), "--tasks", "next_line", "--batch_size", str(micro)])
    assert (tasks["next_line/acc"], tasks["next_line/acc_norm"]) == (result["eval/next_line/acc"],
                                                                     result["eval/next_line/acc_norm"])
    with pytest.raises(SystemExit):
        main([str(run_dir), "--tasks", "no_such_task.jsonl"])


def test_evaluate_another_data_group_keeps_the_models_block_size(trained_run, tmp_path, tiny_corpus):
    """data=GROUP brings the group's default block_size (256); the model was trained at 64 with 128 positions."""
    from gptlab.evaluate import eval_config, main

    run_dir, _ = trained_run
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(p.read_text() for p in sorted(tiny_corpus.iterdir())))
    out = main([str(run_dir), "data=text", f"data.files=[{text}]"])
    assert out["block_size"] == 64 and out["tokens"] == out["blocks"] * 63 and out["blocks"] > 0
    given = eval_config(None, ["data=text", f"data.files=[{text}]", "data.block_size=32"], TINY_GPT2, 1024)
    assert given.data.block_size == 32
    foreign = eval_config(None, ["data=text", f"data.files=[{text}]"], TINY_GPT2, 1024)
    assert foreign.data.block_size == 1024 and foreign.tokenizer.path == str(TINY_GPT2)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor"])
def test_optimizers_follow_the_scheduled_lr(name):
    """The update is proportional to the lr the loop sets: no built-in relative step."""
    from gptlab.optim import build_optimizer

    x = torch.randint(0, 50, (2, 8))
    deltas = []
    for lr in (1e-3, 2e-3):
        model = _tiny_gpt2()
        w0 = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
        opt = build_optimizer(model, OmegaConf.create({"name": name, "lr": 5.0, "weight_decay": 0.0,
                                                      "betas": [0.9, 0.999], "eps": 1e-8}))
        for g in opt.param_groups:
            g["lr"] = lr
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        deltas.append(model.transformer.h[0].mlp.c_fc.weight.detach() - w0)
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[1], 2 * deltas[0], rtol=1e-3, atol=1e-9)
    assert type(opt).__name__.lower() == name


def test_per_epoch_train_and_test_loss(tmp_path, cache_dir, tiny_corpus):
    run_training(tiny_data(tmp_path, cache_dir, tiny_corpus, "tokenizer.vocab_size=384", "optim=adam",
                           "optim.lr=3e-3", "trainer.epochs=2", "trainer.max_steps=null", "trainer.micro_batch_size=32",
                           "trainer.grad_accum=2", "trainer.eval_every=100", "trainer.sample_prompts=[]"))
    rows = read_metrics(tmp_path)
    losses = dict(series(rows, "train/loss"))
    max_steps = max(losses)
    epochs = [r for r in rows if "epoch/epoch" in r]
    assert [r["epoch/epoch"] for r in epochs] == [1, 2] and epochs[-1]["step"] == max_steps
    previous = 0
    for r in epochs:  # log_every=1: each epoch's train loss is the mean of its steps' losses
        mine = [v for s, v in losses.items() if previous < s <= r["step"]]
        assert r["epoch/train_loss"] == pytest.approx(sum(mine) / len(mine), rel=1e-6)
        previous = r["step"]
    assert epochs[-1]["epoch/test_loss"] == pytest.approx(series(rows, "eval/loss")[-1][1])
    assert epochs[1]["epoch/test_loss"] < epochs[0]["epoch/test_loss"] < math.log(384)
