"""Checks that run before step 1, so a bad input fails in one line, not an hour in.

Three moments, called from run.py:
- check_config: the composed config alone (values, ranges, cross-key rules);
- check_environment: the machine (mixed precision support, writable directories);
- check_run: once the model and data exist (positions, vocab, batch sizes, disk).

Every failure is a ConfigError naming the key and the bad value; train.py prints
a GptlabError as one line and exits non-zero. A check that needs a stage's knowledge
(the model's positions, the loss's keywords) lives in that stage and
is called from here, so imports run one way: run -> preflight -> stages -> errors.
"""
import logging
import math
import shutil
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError
from transformers.activations import ACT2FN

from .choices import check_task_names
from .distributed import fsdp_asked
from .errors import ConfigError
from .lora import check_lora_config
from .loss import check_loss_config
from .model import check_block_size, count_parameters
from .optim import choose_optimizer
from .schedule import seq_warmup_length
from .tokenizer import KINDS
from .tracking import check_trackers

log = logging.getLogger(__name__)

POSITIVE = (
    "trainer.micro_batch_size", "trainer.grad_accum", "trainer.global_batch_size", "trainer.max_steps", "trainer.eval_every",
    "trainer.log_every", "trainer.max_skips", "trainer.sample_max_new_tokens", "trainer.cpu_threads",
    "model.n_layer", "model.n_head", "model.n_embd", "model.n_positions", "generate.max_length",
    "data.select", "data.valid_select",
)
MIXED_PRECISION = (None, "no", "fp16", "bf16")
# fp32 weights plus AdamW's two fp32 moments.
CHECKPOINT_BYTES_PER_PARAM = 12


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_warmup(warmup_steps: int, max_steps: int) -> None:
    # A warning, not an error: the schedule stays defined (a linear ramp that stops short),
    # and smoke runs of a step or two under a longer default warmup are legitimate.
    if warmup_steps > max_steps:
        log.warning("scheduler.warmup_steps=%d is longer than the run (%d steps): the LR never reaches "
                    "optim.lr and never decays", warmup_steps, max_steps)


def check_config(cfg) -> None:
    try:  # interpolations first, such as an experiment's ${required:data.files}
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        raise ConfigError(str(e).splitlines()[0].split("resolving interpolation: ")[-1]) from None
    cfg, _ = choose_optimizer(cfg)  # optim=auto, as run() decides it
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        _require(value is None or value >= 1, f"{key}={value} must be at least 1")
    tc, mc, oc, sc = cfg.trainer, cfg.model, cfg.optim, cfg.scheduler
    _require(tc.epochs is None or (tc.epochs > 0 and math.isfinite(tc.epochs)),
             f"trainer.epochs={tc.epochs} must be a positive number (or null)")
    _require(tc.max_grad_norm >= 0, f"trainer.max_grad_norm={tc.max_grad_norm} must be >= 0 (0 turns clipping off)")
    # accelerate's fp8 recipes convert nn.Linear, not GPT-2's Conv1D, and no fp8 path has been measured on a GPU.
    _require(tc.mixed_precision != "fp8", "trainer.mixed_precision=fp8 is not supported: accelerate's fp8 recipes "
                                          "leave GPT-2's Conv1D layers in bf16, and gptlab has not measured fp8 on a "
                                          "GPU; use bf16")
    _require(tc.mixed_precision in MIXED_PRECISION,
             f"trainer.mixed_precision={tc.mixed_precision} must be one of no, fp16, bf16 (or null)")
    _require(tc.spike_zscore is None or tc.spike_zscore > 0,
             f"trainer.spike_zscore={tc.spike_zscore} must be > 0 (or null to turn the guard off)")
    _require(0 <= tc.ema_decay < 1, f"trainer.ema_decay={tc.ema_decay} must be in [0, 1) (0: no weight average)")
    _require(tc.spike_window >= 2, f"trainer.spike_window={tc.spike_window} must be at least 2")
    _require(tc.batch_warmup_steps >= 0, f"trainer.batch_warmup_steps={tc.batch_warmup_steps} must be >= 0 (0: off)")
    _require(not tc.batch_warmup_steps or (tc.batch_warmup_micro is not None and
                                           1 <= tc.batch_warmup_micro <= tc.micro_batch_size),
             f"trainer.batch_warmup_micro={tc.batch_warmup_micro} must be in 1..trainer.micro_batch_size="
             f"{tc.micro_batch_size}: the sequences of each micro batch the first batch_warmup_steps steps read")
    check_seq_warmup(tc, cfg.data)

    check_block_size(mc, cfg.data.block_size)  # the pretrained model's positions in fine-tune mode
    if not mc.pretrained_path:  # a pretrained model brings its own shape
        _require(mc.n_embd % mc.n_head == 0, f"model.n_embd={mc.n_embd} is not divisible by model.n_head={mc.n_head}")
        _require(0 <= mc.dropout < 1, f"model.dropout={mc.dropout} must be in [0, 1)")
        _require(mc.arch == "gpt2" or mc.dropout == 0,
                 f"model.dropout={mc.dropout}: only model.arch=gpt2 has dropout; set model.dropout=0")
        _require(mc.activation is None or mc.activation in ACT2FN,
                 f"model.activation={mc.activation}: choose one of transformers' ACT2FN ({', '.join(sorted(ACT2FN))})")
        _require(mc.init_std is None or mc.init_std > 0, f"model.init_std={mc.init_std} must be > 0 (null: 0.02)")
        if not cfg.tokenizer.path:
            n_special = len(cfg.tokenizer.special_tokens)
            _require(n_special >= 1, "tokenizer.special_tokens=[] needs at least one token to serve as eos")
            _require(cfg.tokenizer.kind in KINDS,
                     f"tokenizer.kind={cfg.tokenizer.kind}: choose {' or '.join(KINDS)}")
            _require(cfg.tokenizer.kind != "byte_level" or cfg.tokenizer.vocab_size >= 256 + n_special,
                     f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is below the 256 byte symbols "
                     f"plus {n_special} special token(s)")

    _require(oc.lr > 0 and math.isfinite(oc.lr), f"optim.lr={oc.lr} must be a positive number")
    _require(oc.weight_decay >= 0, f"optim.weight_decay={oc.weight_decay} must be >= 0")
    _require(len(oc.betas) == 2 and all(0 <= b < 1 for b in oc.betas),
             f"optim.betas={list(oc.betas)} must be two numbers in [0, 1)")
    _require(oc.eps > 0, f"optim.eps={oc.eps} must be > 0: Adam divides by sqrt(v) + eps, so a weight "
                         "with no gradient yet (an unused embedding row) would turn NaN")
    _require(sc.warmup_steps >= 0, f"scheduler.warmup_steps={sc.warmup_steps} must be >= 0")
    _require(sc.min_lr is None or sc.min_lr >= 0, f"scheduler.min_lr={sc.min_lr} must be >= 0")
    _require(sc.min_lr is None or sc.min_lr <= oc.lr, f"scheduler.min_lr={sc.min_lr} is greater than optim.lr={oc.lr}")
    if oc.name == "muon":
        _check_muon(oc)
        if mc.pretrained_path:  # asked for: it runs, but it is not the tested path
            log.warning("fine-tuning %s%s with optim=muon: Muon on a model trained with AdamW is not measured "
                        "here; optim=auto (the default) picks AdamW for fine-tuning", mc.pretrained_path,
                        " (LoRA adapters)" if mc.lora.r else "")
    _require(0 < sc.decay_fraction <= 1, f"scheduler.decay_fraction={sc.decay_fraction} must be in (0, 1]")
    check_loss_config(cfg.loss)
    check_task_names(cfg.tasks.names)
    check_trackers(cfg.logger.trackers)
    _require(cfg.tasks.limit is None or cfg.tasks.limit >= 1, f"tasks.limit={cfg.tasks.limit} must be at least 1")
    _require(cfg.tasks.every is None or cfg.tasks.every >= 1, f"tasks.every={cfg.tasks.every} must be at least 1")
    check_lora_config(mc.lora)


def _check_muon(oc) -> None:
    _require(oc.muon_lr > 0 and math.isfinite(oc.muon_lr), f"optim.muon_lr={oc.muon_lr} must be a positive number")
    _require(oc.muon_weight_decay >= 0, f"optim.muon_weight_decay={oc.muon_weight_decay} must be >= 0")
    _require(0 <= oc.momentum < 1, f"optim.momentum={oc.momentum} must be in [0, 1)")
    _require(1 <= oc.ns_steps < 100, f"optim.ns_steps={oc.ns_steps} must be in [1, 99]")
    _require(oc.momentum_warmup_steps >= 0, f"optim.momentum_warmup_steps={oc.momentum_warmup_steps} must be >= 0")
    _require(0 <= oc.momentum_start < 1, f"optim.momentum_start={oc.momentum_start} must be in [0, 1)")


def check_seq_warmup(tc, data) -> None:
    """The sequence warmup's values as given; left null, schedule.sequence_warmup decides them."""
    steps, length = tc.seq_warmup_steps, seq_warmup_length(tc, data.block_size)
    _require(steps is None or steps >= 0,
             f"trainer.seq_warmup_steps={steps} must be >= 0 (0: off; null: 100 in the default recipe from scratch)")
    if steps == 0 or (steps is None and tc.seq_warmup_len is None):
        return
    _require(2 <= length <= data.block_size,
             f"trainer.seq_warmup_len={length} must be in 2..data.block_size={data.block_size}: "
             "the tokens in each row of the first seq_warmup_steps steps")
    _require(not tc.seq_warmup_split or data.block_size % length == 0,
             f"trainer.seq_warmup_split=true: data.block_size={data.block_size} must be a multiple of "
             f"trainer.seq_warmup_len={length} (each block is read as rows of that length)")
    _require(steps is None or data.pack != "sample",
             "trainer.seq_warmup_steps needs blocks (data.pack=concat or chunk); with data.pack=sample "
             "each row is already one document")


def check_environment(cfg, cuda: bool) -> None:
    # (fp16/bf16 without native support: a CPU falls back to fp32, a GPU warns: distributed.py.)
    # An FSDP launch (launch/accelerate/fsdp.yaml) sets this; sharding peft's mix of frozen and
    # trainable parameters is not tested yet.
    _require(not (fsdp_asked() and cfg.model.lora.r > 0),
             "model.lora.r>0 under an FSDP launch is not supported yet: launch with DDP (LoRA's gradients and "
             "optimizer state are small), or set model.lora.r=0")
    _require(not (fsdp_asked() and cfg.trainer.ema_decay),
             "trainer.ema_decay under an FSDP launch is not supported yet: the average would need sharding like "
             "the weights; launch with DDP or set trainer.ema_decay=0")
    check_writable("run_dir", cfg.run_dir or "outputs")
    check_writable("cache_dir", cfg.cache_dir)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(key: str, value: str) -> None:
    """Probe with a real file, not os.access: root passes os.access on a read-only mount."""
    base = _nearest_existing(Path(value).expanduser().absolute())
    _require(base.is_dir(), f"{key}={value} is not writable: {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={value} is not writable: {base}: {e.strerror}") from None


def checkpoint_bytes(n_params: int) -> int:
    return CHECKPOINT_BYTES_PER_PARAM * n_params


def check_disk(run_dir: Path, n_params: int) -> None:
    free = shutil.disk_usage(_nearest_existing(Path(run_dir))).free
    need = checkpoint_bytes(n_params)
    _require(free >= need, f"run_dir={run_dir} has {free / 2**20:.0f} MiB free, less than one checkpoint needs "
                           f"(~{need / 2**20:.0f} MiB: {n_params:,} parameters x fp32 weights and 2 Adam moments)")


def check_run(cfg, model, train_blocks, valid_blocks, num_processes: int, run_dir: Path) -> None:
    """The model and data against each other and the config; before the optimizer exists."""
    b = cfg.trainer.micro_batch_size
    _require(len(train_blocks) >= b,
             f"the training set has {len(train_blocks)} {train_blocks.what}, fewer than one "
             f"micro batch (trainer.micro_batch_size={b})")
    need = b * num_processes
    _require(len(valid_blocks) >= need,
             f"the validation set has {len(valid_blocks)} {valid_blocks.what}, fewer than one batch "
             f"(trainer.micro_batch_size={b} x {num_processes} process(es) = {need}); "
             f"give it more data or lower {'trainer.micro_batch_size' if cfg.data.pack == 'sample' else 'data.block_size'}")
    check_disk(run_dir, count_parameters(model, trainable_only=True))  # LoRA checkpoints hold only the adapters
