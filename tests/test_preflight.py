"""Bad input -> the one-line message that names it, before step 1; and loading is safe."""
import os
import re
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from conftest import ROOT, compose, run_training
from test_experiments import EXPERIMENTS, REQUIRED
from gptlab.errors import ConfigError
from gptlab.preflight import check_config, check_environment, check_run


def smoke(run_dir, cache_dir, *extra):
    return [f"run_dir={run_dir}", f"cache_dir={cache_dir}", "debug=smoke", *extra]


# The config alone: check_config on the composed config, no data, no model.
CONFIG_TABLE = [
    ("trainer.micro_batch_size=0", r"^trainer\.micro_batch_size=0 must be at least 1$"),
    ("trainer.grad_accum=-2", r"^trainer\.grad_accum=-2 must be at least 1$"),
    ("trainer.max_steps=0", r"^trainer\.max_steps=0 must be at least 1$"),
    ("trainer.eval_every=0", r"^trainer\.eval_every=0 must be at least 1$"),
    ("trainer.log_every=-1", r"^trainer\.log_every=-1 must be at least 1$"),
    ("trainer.cpu_threads=0", r"^trainer\.cpu_threads=0 must be at least 1$"),
    ("trainer.max_skips=0", r"^trainer\.max_skips=0 must be at least 1$"),
    ("trainer.sample_max_new_tokens=0", r"^trainer\.sample_max_new_tokens=0 must be at least 1$"),
    ("trainer.epochs=0", r"^trainer\.epochs=0\.0 must be a positive number \(or null\)$"),
    ("trainer.max_grad_norm=-1", r"^trainer\.max_grad_norm=-1\.0 must be >= 0"),
    ("trainer.mixed_precision=int4", r"^trainer\.mixed_precision=int4 must be one of no, fp16, bf16 \(or null\)$"),
    ("trainer.mixed_precision=fp8", r"^trainer\.mixed_precision=fp8 is not supported: accelerate's fp8 recipes "
                                    r"leave GPT-2's Conv1D layers in bf16"),
    ("trainer.spike_zscore=0", r"^trainer\.spike_zscore=0\.0 must be > 0"),
    ("trainer.spike_window=1", r"^trainer\.spike_window=1 must be at least 2$"),
    ("trainer.batch_warmup_steps=20", r"^trainer\.batch_warmup_micro=None must be in 1\.\.trainer\.micro_batch_size=4"),
    ("trainer.batch_warmup_steps=20 trainer.batch_warmup_micro=5", r"^trainer\.batch_warmup_micro=5 must be in 1"),
    ("trainer.seq_warmup_steps=-1", r"^trainer\.seq_warmup_steps=-1 must be >= 0 \(0: off; null: 100 in the "),
    ("trainer.seq_warmup_len=65", r"^trainer\.seq_warmup_len=65 must be in 2\.\.data\.block_size=64: "),
    ("trainer.seq_warmup_steps=20 trainer.seq_warmup_len=1", r"^trainer\.seq_warmup_len=1 must be in 2\.\."),
    ("trainer.seq_warmup_len=24", r"^trainer\.seq_warmup_split=true: data\.block_size=64 must be a multiple of "
                                  r"trainer\.seq_warmup_len=24 "),
    ("trainer.seq_warmup_steps=20 data.block_size=63",
     r"^trainer\.seq_warmup_split=true: data\.block_size=63 must be a multiple of trainer\.seq_warmup_len=31 "),
    ("trainer.seq_warmup_steps=20 data.pack=sample", r"^trainer\.seq_warmup_steps needs blocks \(data\.pack=concat "
                                                     r"or chunk\)"),
    ("scheduler.min_lr=0.01", r"^scheduler\.min_lr=0\.01 is greater than optim\.lr=0\.003$"),
    ("scheduler.warmup_steps=-1", r"^scheduler\.warmup_steps=-1 must be >= 0$"),
    ("optim.lr=0", r"^optim\.lr=0\.0 must be a positive number$"),
    ("optim.lr=nan", r"^optim\.lr=nan must be a positive number$"),
    ("optim.betas=[0.9,1.5]", r"^optim\.betas=\[0\.9, 1\.5\] must be two numbers in \[0, 1\)$"),
    ("optim.eps=0", r"^optim\.eps=0\.0 must be > 0: Adam divides by sqrt\(v\) \+ eps"),
    ("optim.weight_decay=-0.1", r"^optim\.weight_decay=-0\.1 must be >= 0$"),
    ("data.block_size=256", r"^data\.block_size=256 exceeds model\.n_positions=128$"),
    ("model.n_head=3", r"^model\.n_embd=32 is not divisible by model\.n_head=3$"),
    ("model.n_layer=0", r"^model\.n_layer=0 must be at least 1$"),
    ("model.dropout=1.0", r"^model\.dropout=1\.0 must be in \[0, 1\)$"),
    ("model.arch=llama model.dropout=0.1",
     r"^model\.dropout=0\.1: only model\.arch=gpt2 has dropout; set model\.dropout=0$"),
    ("model.activation=swish2", r"^model\.activation=swish2: choose one of transformers' ACT2FN \("),
    ("tokenizer.vocab_size=200", r"^tokenizer\.vocab_size=200 is below the 256 byte symbols plus 1 special"),
    ("loss.alpha=0", r"^loss\.alpha=0\.0 must be > 0"),
    ("loss.name=keytoken", r"^loss=keytoken needs loss\.keywords; the list is empty$"),
]


@pytest.mark.parametrize("override, message", CONFIG_TABLE, ids=[o for o, _ in CONFIG_TABLE])
def test_config_table(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_config(compose(["debug=smoke", *override.split()]))
    assert "\n" not in str(err.value)


def test_an_experiment_setting_left_unset_is_named():
    with pytest.raises(ConfigError, match=r"^this experiment needs data\.db=\.\.\. on the command line$"):
        check_config(compose(["experiment=wikibooks"]))


def test_fine_tune_mode_checks_the_pretrained_model(tmp_path):
    from gptlab.errors import MissingPathError

    _tiny_gpt2(n_positions=32).save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^data\.block_size=64 exceeds the 32 positions of the pretrained model"):
        check_config(compose(["debug=smoke", f"model.pretrained_path={tmp_path}"]))
    check_config(compose(["debug=smoke", f"model.pretrained_path={tmp_path}", "data.block_size=32"]))
    with pytest.raises(MissingPathError, match=r"^model\.pretrained_path=.*/nope: no config\.json there"):
        check_config(compose(["debug=smoke", f"model.pretrained_path={tmp_path / 'nope'}"]))


def test_good_configs_pass():
    for overrides in ([], ["debug=smoke"], ["model=gpt2_12x768"], ["loss=keytoken", "loss.keywords=[def]"],
                      ["scheduler=linear", "trainer.spike_zscore=4"]):
        check_config(compose(overrides))


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", r"Key 'lrr' not in 'OptimConfig'"),
    ("trainer.max_steps=many", r"Value 'many' of type 'str' could not be converted to Integer"),
    ("trainer.spike_zscore=high", r"Value 'high' of type 'str' could not be converted to Float"),
    # A choice among named implementations is an Enum: the valid names, when the config composes.
    ("optim.name=adamx", r"Invalid value 'adamx', expected one of \[auto, adamw, adam, adafactor, muon\]"),
    ("scheduler.name=step", r"Invalid value 'step', expected one of \[cosine, linear, wsd, constant\]"),
    ("scheduler.decay=cubic", r"Invalid value 'cubic', expected one of \[linear, sqrt\]"),
    ("loss.name=focal", r"Invalid value 'focal', expected one of \[cross_entropy, keytoken\]"),
    ("trainer.nonfinite=ignore", r"Invalid value 'ignore', expected one of \[skip, stop\]"),
    ("trainer.parallel=ddpp", r"Invalid value 'ddpp', expected one of \[ddp, dp\]"),
    ("data.pack=pad", r"Invalid value 'pad', expected one of \[concat, chunk, sample\]"),
    ("model.arch=mamba", r"Invalid value 'mamba', expected one of \[gpt2, llama, qwen3\]"),
])
def test_unknown_key_or_wrong_type_fails_at_compose(override, message):
    with pytest.raises(Exception) as err:
        compose([override])
    assert re.search(message, f"{err.value} {err.value.__cause__}")
    assert override.split("=")[0] in f"{err.value} {err.value.__cause__}"


def test_a_wrong_choice_name_fails_at_cfg_job_time_with_the_valid_names():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "optim.name=adamx", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "optim:" not in proc.stdout  # no config printed
    assert "Invalid value 'adamx', expected one of [auto, adamw, adam, adafactor, muon]" in proc.stderr


def test_every_choice_enum_member_is_one_the_code_handles():
    from gptlab import config
    from gptlab.data.pack import write_token_streams  # noqa: F401 (pack modes: see test_pipeline)
    from gptlab.loss import LOSSES
    from gptlab.model import ARCHITECTURES
    from gptlab.optim import OPTIMIZERS
    from gptlab.schedule import SCHEDULES, WSD_DECAYS

    assert {*OPTIMIZERS, "auto"} == set(config.Optimizer)
    assert set(LOSSES) == set(config.Loss) and set(ARCHITECTURES) == set(config.Arch)
    assert set(SCHEDULES) == set(config.Schedule) and set(WSD_DECAYS) == set(config.WsdDecay)
    assert set(config.NonFinite) == {"skip", "stop"} and set(config.Parallel) == {"ddp", "dp"}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_on_a_cpu_without_native_support_falls_back_to_fp32(precision, monkeypatch, caplog):
    from gptlab.distributed import resolve_mixed_precision

    monkeypatch.setattr("gptlab.distributed.fast_cpu_precision", lambda mp: False)
    with caplog.at_level("WARNING"):
        assert resolve_mixed_precision(precision, cuda=False) == "no"
    assert (f"trainer.mixed_precision={precision}: this CPU has no native {precision} matmul (emulated, ~70x "
            "slower); training in fp32 here") in caplog.text
    monkeypatch.setattr("gptlab.distributed.fast_cpu_precision", lambda mp: True)
    assert resolve_mixed_precision(precision, cuda=False) == precision
    check_environment(compose(["debug=smoke", f"trainer.mixed_precision={precision}"]), cuda=False)


def test_this_cpu_is_judged_by_its_real_capabilities():
    from gptlab.distributed import resolve_mixed_precision
    from gptlab.distributed import fast_cpu_precision

    for precision in ("bf16", "fp16"):
        expected = precision if fast_cpu_precision(precision) else "no"
        assert resolve_mixed_precision(precision, cuda=False) == expected


@pytest.mark.parametrize("capability, unset, explicit_bf16_warns", [
    ((9, 0), "bf16", False), ((8, 0), "bf16", False), ((8, 9), "bf16", False),  # H100/H200, A100, L4/4090
    ((7, 0), "fp16", True), ((7, 5), "fp16", True),  # V100, T4: fp16 tensor cores, emulated bf16
    ((6, 1), "no", True)])  # P40/GTX 10x0: neither
def test_the_default_precision_follows_the_gpu_generation(monkeypatch, caplog, capability, unset,
                                                         explicit_bf16_warns):
    """torch.cuda.is_bf16_supported() counts emulation (it says yes on a V100): the capability decides."""
    from gptlab.distributed import resolve_mixed_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_mixed_precision(None, cuda=True) == unset
    with caplog.at_level("WARNING"):
        assert resolve_mixed_precision("bf16", cuda=True) == "bf16"
    warned = "trainer.mixed_precision=bf16 on Tesla V100-SXM2-16GB (compute capability " in caplog.text
    assert warned == explicit_bf16_warns
    assert not warned or "trainer.mixed_precision=fp16 uses its fp16 tensor cores" in caplog.text
    assert resolve_mixed_precision("no", cuda=True) == "no" and resolve_mixed_precision("fp16", cuda=True) == "fp16"


def test_output_dir_under_a_file_is_not_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "run"
    with pytest.raises(ConfigError, match=rf"^run_dir={re.escape(str(bad))} is not writable: .*afile is a file"):
        check_environment(compose(["debug=smoke", f"run_dir={bad}"]), cuda=False)
    with pytest.raises(ConfigError, match=r"^cache_dir=/proc/gptlab_cache is not writable: /proc: "):
        check_environment(compose(["debug=smoke", "cache_dir=/proc/gptlab_cache"]), cuda=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_is_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(ConfigError, match=r"is not writable: .*Permission denied"):
        check_environment(compose(["debug=smoke", f"run_dir={ro / 'run'}"]), cuda=False)


# The model and the data against each other: check_run on small real objects.
class _Blocks(list):
    what = "blocks of data.block_size=64"  # as TokenBlocks names them


class _Tokenizer:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _tiny_gpt2(vocab=300, n_positions=64):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=8, n_layer=1, n_head=1))


def _check_run(tmp_path, model=None, n_train=100, n_valid=10, processes=1, overrides=()):
    cfg = compose(["debug=smoke", *overrides])
    check_run(cfg, model or _tiny_gpt2(), _Blocks(range(n_train)), _Blocks(range(n_valid)), processes, tmp_path)


def test_run_checks_pass_on_a_consistent_setup(tmp_path):
    _check_run(tmp_path)


RUN_TABLE = [
    (dict(n_train=3), r"^the training set has 3 blocks of data\.block_size=64, fewer than one micro batch "
                      r"\(trainer\.micro_batch_size=4\)$"),
    (dict(n_valid=3), r"^the validation set has 3 blocks of data\.block_size=64, fewer than one batch "
                      r"\(trainer\.micro_batch_size=4 x 1 process\(es\) = 4\)"),
    (dict(n_valid=6, processes=2), r"^the validation set has 6 blocks .* = 8\)"),
]


@pytest.mark.parametrize("kwargs, message", RUN_TABLE, ids=["train", "valid", "valid_ddp"])
def test_run_table(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _check_run(tmp_path, **kwargs)


def test_tokenizer_larger_than_the_embedding():
    from gptlab.tokenizer import check_vocab

    with pytest.raises(ConfigError, match=r"^the tokenizer has 512 tokens but the model's embedding has only 300 "
                                          r"rows; use the model's own tokenizer"):
        check_vocab(_Tokenizer(512), _tiny_gpt2().get_input_embeddings().num_embeddings)
    check_vocab(_Tokenizer(300), 300)


def test_data_errors_are_one_line_errors_too(tmp_path, cache_dir):
    from gptlab.data.sources import DataError
    from gptlab.errors import GptlabError

    assert issubclass(DataError, GptlabError)
    with pytest.raises(DataError, match=r"^data\.block_size must be at least 2, got 1$"):
        run_training(smoke(tmp_path, cache_dir, "data.block_size=1"))


def test_disk_too_small_for_one_checkpoint(tmp_path, monkeypatch):
    from gptlab.model import count_parameters
    usage = namedtuple("usage", "total used free")
    model = _tiny_gpt2()
    need = 12 * count_parameters(model)
    monkeypatch.setattr("gptlab.preflight.shutil.disk_usage", lambda p: usage(10**12, 0, need - 1))
    with pytest.raises(ConfigError, match=rf"^run_dir={re.escape(str(tmp_path))} has 0 MiB free, less than one "
                                          rf"checkpoint needs \(~0 MiB: {count_parameters(model):,} parameters"):
        _check_run(tmp_path, model=model)
    monkeypatch.setattr("gptlab.preflight.shutil.disk_usage", lambda p: usage(10**12, 0, need))
    _check_run(tmp_path, model=model)


# Wiring: the same errors come out of a real run, before step 1.
def test_checks_run_before_step_1(tmp_path, cache_dir, monkeypatch):
    with pytest.raises(ConfigError, match=r"^loss=keytoken: none of loss\.keywords=\['qqzzxxjj'\] is a single"):
        run_training(smoke(tmp_path / "a", cache_dir, "loss=keytoken", "loss.keywords=[qqzzxxjj]"))
    with pytest.raises(ConfigError, match=r"^the validation set has \d+ blocks of data\.block_size=64, fewer than "
                                          r"one batch \(trainer\.micro_batch_size=1000 x 1"):
        run_training(smoke(tmp_path / "b", cache_dir, "trainer.micro_batch_size=1000"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("gptlab.preflight.shutil.disk_usage", lambda p: usage(10**12, 0, 1000))
    with pytest.raises(ConfigError, match=r"has 0 MiB free, less than one checkpoint needs"):
        run_training(smoke(tmp_path / "c", cache_dir))
    for d in "abc":
        assert not (tmp_path / d / "metrics.jsonl").exists()  # nothing trained


def test_warmup_longer_than_the_run_warns(tmp_path, cache_dir):
    run_training(smoke(tmp_path, cache_dir, "trainer.max_steps=1", "scheduler.warmup_steps=5"))
    assert "scheduler.warmup_steps=5 is longer than the run (1 steps)" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("override,line,run_dir_made", [
    ("scheduler.min_lr=0.5", "error: scheduler.min_lr=0.5 is greater than optim.lr=0.003", False),
    ("tokenizer.path=../nope-gptlab", "error: tokenizer.path=../nope-gptlab: no such directory", True),
])
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, cache_dir, override, line, run_dir_made):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *smoke(tmp_path / "run", cache_dir), override],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line
    # A failure after the run directory exists is in its train.log too, as its last line.
    log = tmp_path / "run" / "train.log"
    assert log.is_file() == run_dir_made
    if run_dir_made:
        assert log.read_text().strip().splitlines()[-1].endswith(f"ERROR gptlab] {line}")


@pytest.mark.parametrize("args,hint", [
    (["optim.lrr=3e-4"], "did you mean optim.lr?"),
    (["optimm.lr=3e-4", "trainer.max_steps=3"], "did you mean optim.lr?"),
    (["experiment=codeparrot", "trainer.max_stepz=3"], "did you mean trainer.max_steps?"),
    (["optim.lr=3e-4"], None),  # composes: nothing to suggest
    (["optim.qqqqqq=1"], None),  # nothing close
])
def test_a_misspelt_key_gets_the_key_it_meant(args, hint):
    from gptlab.config import did_you_mean

    assert did_you_mean(["--cfg", "job", *args], str(ROOT / "conf")) == hint


def test_cli_says_did_you_mean_after_hydras_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "optim.lrr=3e-4"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "optim.lrr" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "did you mean optim.lr?"


# Loading is safe: the package source, grepped.
SOURCES = sorted((ROOT / "gptlab").rglob("*.py")) + sorted(ROOT.glob("*.py"))


def _calls(text: str, name: str):
    """The full text of each call `name(...)`, parentheses balanced."""
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        yield text[m.start():i + 1]


def test_package_source_loads_safely():
    assert SOURCES and any(p.name == "preflight.py" for p in SOURCES)
    problems = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        problems += [f"{where}: {c}" for c in _calls(text, "torch.load") if "weights_only=True" not in c]
        problems += [f"{where}: {c}" for c in _calls(text, "urlopen") if "timeout=" not in c]
        for pattern in (r"shell\s*=\s*True", r"\bos\.system\(", r"\bos\.popen\(", r"\bpickle\.loads?\(",
                        r"trust_remote_code\s*=\s*True", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            problems += [f"{where}: {m.group()}" for m in re.finditer(pattern, text)]
    assert not problems, problems


def test_source_grep_catches_what_it_claims():
    bad = 'x = torch.load(path, map_location="cpu")\nsubprocess.run(cmd, shell=True)\n'
    assert list(_calls(bad, "torch.load")) == ['torch.load(path, map_location="cpu")']
    assert re.search(r"shell\s*=\s*True", bad)


def test_trust_remote_code_defaults_to_false():
    """The one such key there is, and every preset leaves it off (a missing key would fail here)."""
    for overrides in ([], *([f"experiment={e}", *REQUIRED.get(e, [])] for e in EXPERIMENTS)):
        assert compose(overrides).model.trust_remote_code is False, overrides
