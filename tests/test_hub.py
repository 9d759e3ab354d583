"""Hub ids for models, tokenizers and datasets, with no network (HF_HUB_OFFLINE=1, see conftest).

Each test builds a Hugging Face hub cache in a temporary HF_HOME, in the layout that
`snapshot_download` and `from_pretrained` read offline: `models--org--name/blobs/<sha256>`,
`snapshots/<commit>/<file>` as links to the blobs, and `refs/main` naming the commit.
"""
import json
import os

import pytest
from omegaconf import OmegaConf

from gptlab.hub import HubError

from conftest import (SHARED, cache_repo, cache_tiny_gpt2, compose, read_metrics, requires_shared, run_training,
                      series)

TINY_GPT2 = SHARED / "models" / "tiny-random-gpt2"
RUGPT = "ai-forever/rugpt3small_based_on_gpt2"


def smoke(run_dir, cache, *extra):
    return [f"run_dir={run_dir}", f"cache_dir={cache}", "debug=smoke", "trainer.max_steps=2", "trainer.eval_every=2",
            "trainer.log_every=1", "trainer.save_every=2", "trainer.sample_prompts=[]", *extra]


def stages(cache):
    log = cache / "builds.log"
    return [json.loads(line)["stage"] for line in log.read_text().splitlines()] if log.is_file() else []


@requires_shared
def test_fine_tune_a_model_by_hub_id_from_the_cache(tmp_path, hub, tiny_corpus):
    commit = cache_tiny_gpt2(hub, "org/tiny-gpt2")
    cache = tmp_path / "cache"
    valid = tmp_path / "valid.py"  # a few blocks: evaluating a 50k vocab is the slow part
    valid.write_text((tiny_corpus / "colorsys.py").read_text()[:1500])
    data = ["data.source=text", "data.text_unit=file", f"data.files=[{tiny_corpus / 'bisect.py'}]",
            f"data.valid_files=[{valid}]"]
    run_training(smoke(tmp_path / "by_id", cache, "model.pretrained_path=org/tiny-gpt2", *data))

    run = tmp_path / "by_id"
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert (saved.model.pretrained_path, saved.model.revision) == ("org/tiny-gpt2", commit)
    assert (saved.tokenizer.path, saved.tokenizer.revision) == ("org/tiny-gpt2", commit)
    ckpt = OmegaConf.load(run / "checkpoints" / "step_0000002" / "config.yaml")
    assert ckpt.model.revision == commit
    assert f"model.pretrained_path=org/tiny-gpt2: snapshot {commit} (from {hub})" in (run / "train.log").read_text()
    assert stages(cache) == ["hub", "splits", "tokens"]

    # The same files as a local directory: the token cache is hit (keyed by the tokenizer's
    # files, not by the id) and the weights are the same, so the losses are too.
    run_training(smoke(tmp_path / "by_dir", cache, f"model.pretrained_path={TINY_GPT2}", *data))
    assert stages(cache) == ["hub", "splits", "tokens"]
    assert series(read_metrics(run), "train/loss") == series(read_metrics(tmp_path / "by_dir"), "train/loss")


def test_an_id_missing_from_the_cache_stops_before_any_data_work(tmp_path, hub):
    from gptlab.hub import HubError

    cache = tmp_path / "cache"
    with pytest.raises(HubError) as e:
        run_training(smoke(tmp_path / "run", cache, "experiment=tolstoy_finetune"))
    assert str(e.value) == (
        f"model.pretrained_path={RUGPT}: the Hugging Face Hub is not reachable (HF_HUB_OFFLINE=1) and the id is "
        f"not in the local cache {hub}; on a machine with a network run `hf download {RUGPT}` (with HF_HOME set "
        f"as here), or pass a local directory")
    assert stages(cache) == [] and not (cache / "splits").exists() and not (cache / "downloads").exists()


@requires_shared
def test_tolstoy_finetune_runs_from_the_cache_under_its_default_id(tmp_path, hub):
    commit = cache_tiny_gpt2(hub, RUGPT)
    text = tmp_path / "kazaki.txt"
    text.write_text((SHARED / "tolstoy" / "kazaki.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    run_training(smoke(tmp_path / "run", tmp_path / "cache", "experiment=tolstoy_finetune", "data.source=text",
                       "data.encoding=utf-8", "data.urls=[]", f"data.files=[{text}]",
                       "data.text_unit=paragraph"))
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert (saved.model.pretrained_path, saved.model.revision) == (RUGPT, commit)
    assert len(series(read_metrics(tmp_path / "run"), "train/loss")) == 2


def code_rows(n, seed):
    lines = ["import pandas as pd", "import numpy as np", "df = pd.DataFrame(x)", "plt.plot(df)", "model.fit(X, y)"]
    return b"".join(json.dumps({"content": "\n".join(lines[(seed + i + j) % 5] for j in range(12)),
                                "repo_name": f"r{i}"}).encode() + b"\n" for i in range(n))


def cache_codeparrot(hub):
    """The seed's two dataset repos (json lines; the valid repo's split is `validation`), and its
    code tokenizer, stood in for by GPT-2's, whose vocabulary has the key tokens as single tokens too."""
    train = cache_repo(hub, "huggingface-course/codeparrot-ds-train",
                       {"data/train-00000-of-00001.jsonl": code_rows(40, 0)}, "dataset")
    valid = cache_repo(hub, "huggingface-course/codeparrot-ds-valid",
                       {"data/validation-00000-of-00001.jsonl": code_rows(12, 3)}, "dataset")
    cache_tiny_gpt2(hub, "huggingface-course/code-search-net-tokenizer", tokenizer_only=True)
    return train, valid


@pytest.mark.parametrize("streaming", [False, True])
def test_codeparrot_trains_from_its_default_dataset_ids(tmp_path, hub, streaming):
    train, valid = cache_codeparrot(hub)
    run_training(smoke(tmp_path / "run", tmp_path / "cache", "experiment=codeparrot", "trainer.epochs=null",
                       "trainer.grad_accum=1", f"data.streaming={streaming}", "data.block_size=32"))
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert (saved.data.revision, saved.data.valid_revision) == (train, valid)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "kept 40 of 40 documents" in log and "explicit validation data gives 12 validation documents" in log
    assert len(series(read_metrics(tmp_path / "run"), "train/loss")) == 2


def test_a_dataset_is_keyed_by_its_commit_and_a_local_repo_dir_loads(tmp_path, hub):
    from gptlab.data.prepare import make_sources, prepare

    cfg = compose(["experiment=codeparrot"])
    first, _ = cache_codeparrot(hub)
    before = make_sources(cfg.data, tmp_path)[0].fingerprint()
    assert before["repos"]["train"] == (["huggingface-course/codeparrot-ds-train", first], "train")
    second = cache_repo(hub, "huggingface-course/codeparrot-ds-train",  # a new commit on main
                        {"data/train-00000-of-00001.jsonl": code_rows(40, 0) + b"\n"}, "dataset")
    assert make_sources(cfg.data, tmp_path)[0].fingerprint()["repos"]["train"][0][1] == second != first

    # The snapshot directory itself, as a local dataset repo with a train and a validation split.
    repo = hub / "datasets--huggingface-course--codeparrot-ds-train" / "snapshots" / first
    (repo / "data" / "validation-00000-of-00001.jsonl").write_bytes(code_rows(10, 1))
    cfg = compose(["debug=smoke", "data=hf", f"data.builder={repo}", "data.valid_split=validation",
                   "data.block_size=32"])
    data = prepare(cfg, tmp_path / "cache")
    assert data.info["split"]["train"]["documents"] == 40 and data.info["split"]["n_valid"] == 10


def test_a_resumed_run_keeps_the_commit_it_started_with(tmp_path, hub):
    from types import SimpleNamespace

    from gptlab.hub import pin_hub_ids

    tiny = {p.name: p.read_bytes() for p in sorted(TINY_GPT2.iterdir()) if p.suffix == ".json"}
    first = cache_repo(hub, "org/m", tiny)
    second = cache_repo(hub, "org/m", {**tiny, "extra.json": b"{}"})  # main moved on
    one = SimpleNamespace(num_processes=1, is_local_main_process=True)

    def pinned(previous):
        cfg = compose(["model.pretrained_path=org/m"])
        pin_hub_ids(cfg, one, tmp_path / "cache", datasets=False, previous=previous)
        return cfg.model.revision

    started = compose(["model.pretrained_path=org/m", f"model.revision={first}"])
    assert pinned(None) == second
    assert pinned(started) == first
    assert pinned(compose(["model.pretrained_path=org/other", f"model.revision={first}"])) == second


def test_a_download_skips_other_frameworks_and_the_bin_copy_of_safetensors(hub, monkeypatch):
    """Online (faked here): a dry run lists the repo, then the download leaves out what torch never reads."""
    from types import SimpleNamespace

    import huggingface_hub

    from gptlab.hub import resolve

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("dry_run"):
            return [SimpleNamespace(filename=f) for f in ("config.json", "model.safetensors", "pytorch_model.bin")]
        return str(hub / "models--org--m" / "snapshots" / ("a" * 40))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    snapshot = resolve("org/m", "v1", key="model.pretrained_path")
    assert (snapshot.repo_id, snapshot.commit) == ("org/m", "a" * 40)
    assert [c.get("dry_run", False) for c in calls] == [True, False]
    assert calls[1]["revision"] == "v1" and calls[1]["cache_dir"] == str(hub)
    assert {"pytorch_model*.bin", "*.h5", "flax_model*", "*.onnx"} <= set(calls[1]["ignore_patterns"])

    calls.clear()  # a tokenizer: no weights at all, so nothing to list first
    resolve("org/m", key="tokenizer.path", weights=False)
    assert len(calls) == 1 and {"*.safetensors", "*.bin", "*.h5"} <= set(calls[0]["ignore_patterns"])


@requires_shared
def test_a_tokenizer_by_id_keys_the_token_cache_like_its_directory(tmp_path, hub):
    from gptlab.data.prepare import prepare

    rugpt3 = SHARED / "tokenizers" / "rugpt3"
    cache_repo(hub, "org/rugpt3-tokenizer", {p.name: p.read_bytes() for p in rugpt3.iterdir()})
    text = tmp_path / "kazaki.txt"
    text.write_text((SHARED / "tolstoy" / "kazaki.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    data = ["debug=smoke", "data=text", f"data.files=[{text}]", "data.valid_fraction=0.2", "data.block_size=32"]
    by_id = prepare(compose([*data, "tokenizer.path=org/rugpt3-tokenizer"]), tmp_path / "cache")
    by_dir = prepare(compose([*data, f"tokenizer.path={rugpt3}"]), tmp_path / "cache")
    assert by_id.info["cache_dir"] == by_dir.info["cache_dir"]
    assert stages(tmp_path / "cache") == ["splits", "tokens"]


@requires_shared
@pytest.mark.slow
def test_two_processes_resolve_an_id_once_and_fail_together_without_it(tmp_path, hub, tiny_corpus):
    """The local main process resolves (downloads); the other waits for it, also when it fails."""
    from test_launch import ACCELERATE, TRAIN_PY, finish, output, start

    commit = cache_tiny_gpt2(hub, "org/tiny-gpt2")
    env = {**os.environ, "HF_HOME": str(hub.parent)}
    valid = tmp_path / "valid.py"
    valid.write_text((tiny_corpus / "colorsys.py").read_text()[:1500])
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", TRAIN_PY,
           *smoke(tmp_path / "run", tmp_path / "cache", "data.source=text", "data.text_unit=file",
                  f"data.files=[{tiny_corpus / 'bisect.py'}]", f"data.valid_files=[{valid}]")]
    finish([start([*cmd, "model.pretrained_path=org/tiny-gpt2"], tmp_path, env)])
    assert "2 process(es)" in (tmp_path / "run" / "train.log").read_text()
    assert stages(tmp_path / "cache") == ["hub", "splits", "tokens"]
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").model.revision == commit

    proc = start([*cmd, "run_dir=" + str(tmp_path / "missing"), "model.pretrained_path=org/absent"], tmp_path, env)
    proc.wait(timeout=240)
    assert proc.returncode != 0
    assert "error: model.pretrained_path=org/absent: the Hugging Face Hub is not reachable" in output(proc)


@requires_shared
def test_generate_and_evaluate_a_hub_id_from_the_cache(tmp_path, hub, capsys, tiny_corpus):
    """The notebooks sample from a Hub model before fine-tuning it: both CLIs take an id, offline from
    the HF cache, and give what the same files give from a local directory."""
    from gptlab.evaluate import main as evaluate
    from gptlab.generate import main as generate

    commit = cache_tiny_gpt2(hub, RUGPT)
    args = ["--prompt", "Мне нравится", "--max_new_tokens", "5", "--seed", "1"]
    by_id, by_dir = generate([RUGPT, *args]), generate([str(TINY_GPT2), *args])
    assert by_id == by_dir and by_id[0]["samples"][0].startswith("Мне нравится")
    assert generate([RUGPT, "--revision", commit, *args]) == by_id
    data = ["data=text", "data.text_unit=file", f"data.files=[{tiny_corpus / 'bisect.py'}]",
            f"data.valid_files=[{tiny_corpus / 'colorsys.py'}]", "data.block_size=64", f"cache_dir={tmp_path / 'c'}"]
    scored = evaluate([RUGPT, *data])
    assert scored["tokens"] > 0 and scored["loss"] == evaluate([str(TINY_GPT2), *data])["loss"]
    with pytest.raises(HubError, match="org/missing: the Hugging Face Hub is not reachable"):
        generate(["org/missing", *args])


def test_stale_launch_markers_go_and_nothing_else(tmp_path):
    """cache_dir may be a shared directory: only gptlab's own day-old launch markers are removed."""
    import time

    from gptlab.hub import _remove_stale_markers

    old = time.time() - 2 * 24 * 3600
    stale, fresh, foreign = tmp_path / f"{time.time_ns() - 10**15}-host", tmp_path / f"{time.time_ns()}-host", \
        tmp_path / "my-project"
    for d in (stale, fresh, foreign):
        d.mkdir()
    for d in (stale, foreign):
        os.utime(d, (old, old))
    _remove_stale_markers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, "my-project"])


@requires_shared
def test_lora_on_a_hub_id_records_the_snapshot_and_the_id(tmp_path, hub, tiny_corpus, monkeypatch):
    """The checkpoint names the base by its snapshot, and by id and commit: export and evaluate find
    it, even from another machine's HF cache (the snapshot path then gone)."""
    import shutil

    from gptlab.evaluate import main as evaluate
    from gptlab.export import main as export_main

    commit = cache_tiny_gpt2(hub, "org/tiny-gpt2")
    data = ["data.source=text", "data.text_unit=file", f"data.files=[{tiny_corpus / 'bisect.py'}]",
            f"data.valid_files=[{tiny_corpus / 'colorsys.py'}]", "data.block_size=32"]
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the old code's record: a path under the current directory
    run_training(smoke(run, tmp_path / "cache", "model.pretrained_path=org/tiny-gpt2", "model.lora.r=4", *data))
    state = json.loads((run / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    snapshot = hub / "models--org--tiny-gpt2" / "snapshots" / commit
    assert state["lora"]["base_path"] == str(snapshot) and (snapshot / "config.json").is_file()
    assert (state["lora"]["base_id"], state["lora"]["base_revision"]) == ("org/tiny-gpt2", commit)
    assert export_main([str(run / "checkpoints" / "step_0000002"), str(tmp_path / "out")]) == 0

    moved = tmp_path / "other_hf_home"  # the same cache under another HF_HOME, the recorded path gone
    shutil.move(str(hub.parent), str(moved))
    monkeypatch.setenv("HF_HOME", str(moved))
    assert export_main([str(run / "checkpoints" / "step_0000002"), str(tmp_path / "out2")]) == 0
    scored = evaluate([str(run / "checkpoints" / "step_0000002"), *data, f"cache_dir={tmp_path / 'cache'}"])
    assert scored["tokens"] > 0
