"""What a checkpoint holds, keep-N and best on disk, fallback from a damaged checkpoint,
failed saves, the checkpoint options, and `python -m gptlab.export`."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose, disk_full_at_step, read_metrics, run_training, series


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(cache_dir, tiny_corpus):
    # A constant, too-high LR makes eval/loss bottom out at step 2 and then rise, so the
    # best checkpoint is one that keep_last prunes from the step_* directories.
    return [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
            "tokenizer.vocab_size=384", "trainer.micro_batch_size=20", "trainer.max_steps=6",
            "trainer.eval_every=1", "trainer.save_every=1", "trainer.keep_last=2",
            "optim=adamw", "optim.lr=0.1", "scheduler=constant", "scheduler.warmup_steps=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, base):
    run_dir = tmp_path_factory.mktemp("ckpt_run")
    # resume=auto on a fresh run_dir starts at step 0: one command for a first start and a requeue
    result = run_training([f"run_dir={run_dir}", *base, "resume=auto"])
    assert result["stopped"] is None
    return run_dir


def state(ckpt):
    return json.loads((ckpt / "trainer_state.json").read_text())


def test_keep_last_and_best_on_disk(run):
    evals = series(read_metrics(run), "eval/loss")
    assert [s for s, _ in evals] == [1, 2, 3, 4, 5, 6]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_step not in (5, 6)  # else this test would not show that best survives pruning

    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step_0000005", "step_0000006"]
    best = state(ckpts / "best")
    assert best["step"] == best_step and best["eval/loss"] == best_loss
    assert state(ckpts / "step_0000006")["best"] == {"step": best_step, "eval/loss": best_loss}
    from safetensors.torch import load_file
    w_best = load_file(str(ckpts / "best" / "model.safetensors"))
    w_last = load_file(str(ckpts / "step_0000006" / "model.safetensors"))
    assert any(not torch.equal(w_best[k], w_last[k]) for k in w_best)


def test_a_checkpoint_holds_everything_to_continue(run):
    from accelerate.utils import load
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run / "checkpoints" / "step_0000006"
    st = state(ckpt)
    assert st["step"] == 6 and st["max_steps"] == 6 and st["world_size"] == 1
    assert st["data_position"]["optimizer_step"] == 6 and "pure function of (seed, optimizer step)" in \
        st["data_position"]["how"]
    assert st["epoch"] > 0 and st["best"]["step"] < 6
    assert st["files"]["model.safetensors"] == (ckpt / "model.safetensors").stat().st_size
    assert OmegaConf.load(ckpt / "config.yaml").optim.lr == 0.1  # the resolved config
    # Loads as it is, as the notebooks reload checkpoint-5000: the trained weights (the last
    # checkpoint's are the final export's), with the config and tokenizer beside them.
    assert len(AutoTokenizer.from_pretrained(str(ckpt))) == 384
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt)).state_dict()
    final = AutoModelForCausalLM.from_pretrained(str(run / "final")).state_dict()
    assert loaded.keys() == final.keys() and all(torch.equal(loaded[k], final[k]) for k in final)
    optim = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert optim["state"] and all(int(s["step"]) == 6 for s in optim["state"].values())
    rng = load(ckpt / "random_states_0.pkl")  # weights_only=True
    assert {"torch_manual_seed", "numpy_random_seed", "random_state"} <= set(rng)
    assert not list((run / "checkpoints").glob(".*"))  # no temporary directories left


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _scramble_header(path):
    # Same size, so only loading can tell: the safetensors header is now garbage.
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _scramble_header], ids=["truncated", "corrupt"])
def test_a_latest_checkpoint_that_fails_to_load_falls_back_with_a_warning(run, base, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    damage(run_dir / "checkpoints" / "step_0000006" / "model.safetensors")

    run_training([f"run_dir={run_dir}", *base, "resume=auto"])
    log = (run_dir / "train.log").read_text()
    assert "checkpoint" in log and "step_0000006 failed to load" in log and "falling back" in log
    assert "resumed from" in log and "step_0000005: step 5" in log
    assert (run_dir / "checkpoints" / "step_0000006.superseded").is_dir()  # kept for a look, never loaded
    # step 6 was trained again from step 5, to the same numbers as the first time
    for key in ("train/loss", "eval/loss"):
        assert series(read_metrics(run_dir), key) == series(read_metrics(run), key)
    assert state(run_dir / "checkpoints" / "best")["step"] == state(run / "checkpoints" / "best")["step"]


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_why(base, tmp_path, monkeypatch):
    from gptlab.checkpoint_format import CheckpointError, read_trainer_state

    disk_full_at_step(monkeypatch, 4)
    with pytest.raises(CheckpointError, match=r"could not save checkpoint .*step_0000004.*No space left on device"):
        run_training([f"run_dir={tmp_path}", *base, "trainer.save_every=2", "trainer.eval_every=2"])
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "step_0000002"]
    assert read_trainer_state(ckpts / "step_0000002")["step"] == 2  # intact: every file at its size


def test_a_save_due_with_an_evaluation_comes_first(base, tmp_path, monkeypatch):
    """An evaluation that fails (out of memory on a GPU) loses nothing: the step's checkpoint is on disk,
    and a resume from it gives what the uninterrupted run gives."""
    import gptlab.loop

    real = gptlab.loop.evaluate

    def evaluate(model, blocks, batch_size, accelerator):
        if gptlab.loop.evaluate.calls == 1:  # the second: at step 2
            raise RuntimeError("CUDA out of memory (simulated)")
        gptlab.loop.evaluate.calls += 1
        return real(model, blocks, batch_size, accelerator)

    evaluate.calls = 0
    monkeypatch.setattr(gptlab.loop, "evaluate", evaluate)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_training([f"run_dir={tmp_path}", *base, "trainer.save_every=2", "trainer.keep_last=null"])
    assert state(tmp_path / "checkpoints" / "step_0000002")["step"] == 2
    assert state(tmp_path / "checkpoints" / "step_0000002")["eval/loss"] is None  # saved before it evaluated
    monkeypatch.setattr(gptlab.loop, "evaluate", real)
    run_training([f"run_dir={tmp_path}", *base, "trainer.save_every=2", "trainer.keep_last=null", "resume=auto"])
    with_eval = state(tmp_path / "checkpoints" / "step_0000004")
    assert with_eval["eval/loss"] == dict(series(read_metrics(tmp_path), "eval/loss"))[4]  # recorded once evaluated
    assert with_eval["best"]["step"] <= 4


def test_checkpoint_options_are_checked_before_anything_runs(tmp_path):
    from gptlab.checkpoint import plan_run_dir

    def plan(*overrides):
        return plan_run_dir(compose(["debug=smoke", *overrides]))

    with pytest.raises(ValueError, match="multiple of trainer.log_every"):
        plan("trainer.save_every=3", "trainer.log_every=2")
    with pytest.raises(ValueError, match="keep at least 1"):
        plan("trainer.keep_last=0")
    with pytest.raises(ValueError, match="resume=auto continues the run in run_dir"):
        plan("resume=auto")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        plan(f"resume={tmp_path / 'nope'}")
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    assert plan(f"resume={ckpt}") == str(tmp_path / "run")
    with pytest.raises(ValueError, match="already holds checkpoints: pass resume=auto"):
        plan(f"run_dir={tmp_path / 'run'}")
    assert plan(f"run_dir={tmp_path / 'run'}", "resume=auto") == str(tmp_path / "run")
    assert plan("trainer.keep_last=null", "trainer.save_every=0") is None


def test_supersede_drops_later_rows_and_a_line_cut_short(tmp_path):
    from gptlab.tracking import supersede_jsonl

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "train/lo')
    supersede_jsonl(path, 4)
    assert read_metrics(tmp_path) == rows[:4]


def test_export_cli(run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "gptlab.export", str(run), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_0000006 (step 6)" in proc.stderr  # a run directory means its latest checkpoint
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == 384 and (out / "tokenizer.json").is_file()
    exported, final = load_file(str(out / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)

    from gptlab.export import main
    assert main([str(run / "checkpoints" / "best"), str(tmp_path / "best")]) == 0
    best = load_file(str(tmp_path / "best" / "model.safetensors"))
    assert any(not torch.equal(best[k], final[k]) for k in final)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), str(tmp_path / "x")])
    assert exit_info.value.code == 1


def test_an_export_replaces_only_an_export(run, tmp_path):
    """`python -m gptlab.export CKPT OUT` with OUT a typo for a directory that matters (outputs, ~):
    refused in one line that names it, before any work, and the directory is untouched."""
    from gptlab.export import main as export_main

    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "gptlab.export", str(run), str(home)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {home} exists and is not an export gptlab wrote (it has no gptlab_export.json): refusing to "
        "replace it; give a new or empty directory"]
    assert (home / "notes.txt").read_text() == "keep me" and (home / "projects").is_dir()
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    with pytest.raises(SystemExit):
        export_main([str(run), str(a_file)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main([str(run), str(empty)]) == 0 and (empty / "gptlab_export.json").is_file()
    assert export_main([str(run), str(empty)]) == 0  # an export gptlab wrote is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "home", "model.bin"]  # no .tmp-/.trash- left


def test_a_run_dir_whose_final_is_not_gptlabs_is_refused_before_step_1(base, tmp_path):
    from gptlab.errors import ConfigError

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "thesis.tex").write_text("keep me")
    with pytest.raises(ConfigError, match=rf"^run_dir={tmp_path}: {tmp_path / 'final'} exists and is not an export "
                                          "gptlab wrote"):
        run_training([f"run_dir={tmp_path}", *base])
    assert (tmp_path / "final" / "thesis.tex").read_text() == "keep me"
