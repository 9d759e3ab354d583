"""One recipe on any process count: trainer.global_batch_size, and resume on another count.

The 1-process run (micro 20 x derived accum 2) is the reference. The 2-process run of the
same command (accum derived as 1) and the elastic resumes (2 -> 1 and 1 -> 2 processes from
the step-4 checkpoint) must log its train/loss and eval/loss to 1e-5: DDP's all-reduce and
one process's accumulation sum the same gradients in another order, so bit equality is
not expected, float tolerance is.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, read_metrics, run_training, series

STEPS = 8
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(cache_dir, tiny_corpus):
    # An epoch is 3 optimizer steps: the resume point (4) is mid-epoch and the rest crosses one.
    return [f"cache_dir={cache_dir}", "debug=smoke", f"data.paths=[{tiny_corpus}]", "data.valid_fraction=0.2",
            "tokenizer.vocab_size=384", "trainer.micro_batch_size=20", "trainer.global_batch_size=40",
            "model.dropout=0", f"trainer.max_steps={STEPS}", "trainer.eval_every=2", "trainer.save_every=2",
            "trainer.keep_last=null"]


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, base):
    run_dir = tmp_path_factory.mktemp("one_proc")
    run_training([f"run_dir={run_dir}", *base])
    return run_dir


def launch_2proc(overrides):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(ROOT / "train.py"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_curve(run_dir, reference, tol=1e-5):
    ours, ref = read_metrics(run_dir), read_metrics(reference)
    for key in ("train/loss", "eval/loss"):
        a, b = series(ours, key), series(ref, key)
        assert [s for s, _ in a] == [s for s, _ in b], key  # every step logged exactly once
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= tol, (key, a, b)
    assert [s for s, _ in series(ours, "train/loss")] == list(range(1, STEPS + 1))


def resume_copy(src, dst, step=4):
    """A copy of a finished run, to be continued from its step-`step` checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    return [f"run_dir={dst}", f"resume={dst / 'checkpoints' / f'step_{step:07d}'}"]


def test_grad_accum_is_derived_and_logged(one_proc):
    log = (one_proc / "train.log").read_text()
    assert "global batch 40 (trainer.global_batch_size; grad_accum derived) = micro 20 x accum 2 x 1" in log


@pytest.mark.parametrize("extra, message", [
    (["trainer.global_batch_size=50"], "trainer.global_batch_size=50 is not divisible by "
                                       "trainer.micro_batch_size=20 x 1 process(es) = 20; nearest valid "
                                       "global_batch_size: 40 or 60"),
    (["trainer.grad_accum=3"], "trainer.grad_accum=3 disagrees with trainer.global_batch_size=40: "
                               "trainer.micro_batch_size=20 x 1 process(es) = 20 needs grad_accum=2"),
])
def test_a_batch_that_does_not_fit_fails_before_step_1(tmp_path, base, extra, message):
    from gptlab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        run_training([f"run_dir={tmp_path / 'run'}", *base, *extra])
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory, let alone step 1


def test_plan_grad_accum():
    from gptlab.data.blocks import plan_grad_accum
    from gptlab.errors import ConfigError

    assert plan_grad_accum(32, 1, 256) == 8 and plan_grad_accum(32, 8, 256) == 1
    assert plan_grad_accum(8, 2, None, None) == 1 and plan_grad_accum(8, 2, None, 3) == 3
    assert plan_grad_accum(32, 2, 256, 4) == 4  # explicit and agreeing
    with pytest.raises(ConfigError, match=r"nearest valid global_batch_size: 96 \(or"):  # no valid value below
        plan_grad_accum(32, 3, 64)


def test_a_resume_with_another_global_batch_is_refused(tmp_path, base, one_proc):
    from gptlab.errors import ConfigError

    overrides = resume_copy(one_proc, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"global batch of 40 sequences, this run's is 20 .*"
                                          r"set trainer.global_batch_size=40 to continue it"):
        run_training([*base, "trainer.global_batch_size=20", *overrides])


@pytest.mark.slow
def test_two_processes_and_elastic_resume_follow_the_one_process_curve(tmp_path, base, one_proc):
    """Same command on 2 processes; then 2 -> 1 and 1 -> 2 processes (the latter with activation
    checkpointing under DDP) resumed at step 4."""
    two = tmp_path / "two"
    launch_2proc([f"run_dir={two}", *base])
    assert "= micro 20 x accum 1 x 2 process(es)" in (two / "train.log").read_text()
    assert_same_curve(two, one_proc)

    run_training([*base, *resume_copy(two, tmp_path / "two_to_one")])
    log = (tmp_path / "two_to_one" / "train.log").read_text()
    assert "elastic resume:" in log and "written by 2 process(es), this run has 1" in log
    assert "dropout is on" not in log
    assert_same_curve(tmp_path / "two_to_one", one_proc)

    # ... with activation checkpointing too, which must not change a number under DDP either
    launch_2proc([*base, *resume_copy(one_proc, tmp_path / "one_to_two"), "trainer.activation_checkpointing=true"])
    assert_same_curve(tmp_path / "one_to_two", one_proc)
    log = (tmp_path / "one_to_two" / "train.log").read_text()
    assert "written by 1 process(es), this run has 2" in log and "activation checkpointing: each" in log


def test_elastic_resume_with_dropout_says_the_masks_cannot_match(tmp_path, base, one_proc):
    """A checkpoint written as if by 2 processes, resumed on 1 with dropout on: one line, and it continues."""
    import json

    overrides = resume_copy(one_proc, tmp_path / "run")
    state_file = tmp_path / "run" / "checkpoints" / "step_0000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["world_size"] = 2
    state_file.write_text(json.dumps(state))
    result = run_training([*base, "model.dropout=0.1", *overrides])
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("dropout is on: its masks cannot match") == 1
    assert result["stopped"] is None and (tmp_path / "run" / "final").is_dir()


@pytest.fixture(scope="module")
def no_seq_warmup(tmp_path_factory, base):
    run_dir = tmp_path_factory.mktemp("no_seq_warmup")
    run_training([f"run_dir={run_dir}", *base, "trainer.seq_warmup_steps=0"])
    return run_dir


def test_the_default_recipe_warms_up_on_half_blocks_and_zero_turns_it_off(base, one_proc, no_seq_warmup):
    """From scratch with optim=auto, the first third of an 8-step run (2 steps) reads each block
    as two rows of 32: its first loss is not the one without the warmup."""
    log = (one_proc / "train.log").read_text()
    assert ("sequence warmup: steps 1-2 read all, as rows of 32, of each block's 64 tokens; "
            "trainer.seq_warmup_steps=0 turns it off") in log
    off = no_seq_warmup
    assert "sequence warmup" not in (off / "train.log").read_text()
    assert abs(series(read_metrics(off), "train/loss")[0][1] - series(read_metrics(one_proc), "train/loss")[0][1]) > 1e-3
    assert series(read_metrics(off), "train/loss")[2:] != series(read_metrics(one_proc), "train/loss")[2:]


@pytest.mark.parametrize("split, reads", [(False, "the first 16"), (True, "all, as rows of 16,")])
def test_sequence_warmup_reads_shorter_rows_and_resumes_exactly(tmp_path, base, no_seq_warmup, split, reads):
    """Steps 1-6 read rows of 16 tokens, each block's first 16 or (split) all its 64 as four
    rows: the run leaves the one without a warmup from step 1, and a resume at step 4, inside the
    warmup, continues bit-exactly. A warmup over the whole block is the run without one, to
    the last bit."""
    warm = [*base, "trainer.seq_warmup_steps=6", "trainer.seq_warmup_len=16", f"trainer.seq_warmup_split={split}"]
    ref = tmp_path / "ref"
    run_training([f"run_dir={ref}", *warm])
    assert f"sequence warmup: steps 1-6 read {reads} of each block's 64 tokens\n" in (ref / "train.log").read_text()
    first = series(read_metrics(ref), "train/loss")[0][1]
    assert abs(first - series(read_metrics(no_seq_warmup), "train/loss")[0][1]) > 1e-3
    run_training([*warm, *resume_copy(ref, tmp_path / "resumed")])
    assert_same_curve(tmp_path / "resumed", ref, tol=0)
    whole = tmp_path / "whole"
    run_training([f"run_dir={whole}", *base, "trainer.seq_warmup_steps=6", "trainer.seq_warmup_len=64",
                  f"trainer.seq_warmup_split={split}"])
    assert_same_curve(whole, no_seq_warmup, tol=0)


def test_batch_warmup_resumes_exactly_and_keeps_its_micro_batch(tmp_path, base):
    """Inside the batch warmup (6 steps, 5 of each micro batch's 20 sequences) a resume at step 4
    continues bit-exactly; with another micro batch it would read other sequences: refused."""
    from gptlab.errors import ConfigError

    warm = [*base, "trainer.batch_warmup_steps=6", "trainer.batch_warmup_micro=5"]
    ref = tmp_path / "ref"
    run_training([f"run_dir={ref}", *warm])
    assert "batch warmup: steps 1-6 read 5 of each micro batch's 20 sequences" in (ref / "train.log").read_text()
    run_training([*warm, *resume_copy(ref, tmp_path / "resumed")])
    assert_same_curve(tmp_path / "resumed", ref, tol=0)
    with pytest.raises(ConfigError, match=r"inside the batch warmup .* of each micro batch of 20; this run's is 10: "
                                          r"resume with trainer.micro_batch_size=20$"):
        run_training([*warm, "trainer.micro_batch_size=10", *resume_copy(ref, tmp_path / "other")])
