"""Typed config schemas, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `gptlab_schema` first in its defaults list, so every YAML
group and every command-line override is merged into these dataclasses: an unknown
key or a wrong type fails when Hydra composes the config, before anything runs.

Every choice among named implementations is a StrEnum, so a wrong name fails there too,
with the valid names listed (`optim.name=adamx`: "Invalid value 'adamx', expected one of
[auto, adamw, adam, adafactor, muon]"). Where a stage keeps a registry of builders
(optim.OPTIMIZERS, loss.LOSSES), its keys are the Enum's members, and a test checks that every
member of every Enum here is one the code handles. A member compares equal to its string.
"""
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


class Arch(StrEnum):  # from scratch (model.ARCHITECTURES)
    gpt2 = "gpt2"
    llama = "llama"
    qwen3 = "qwen3"


class Optimizer(StrEnum):
    auto = "auto"  # muon from scratch, adamw to fine-tune (optim.choose_optimizer)
    adamw = "adamw"
    adam = "adam"
    adafactor = "adafactor"
    muon = "muon"


class Schedule(StrEnum):
    cosine = "cosine"
    linear = "linear"
    wsd = "wsd"
    constant = "constant"


class WsdDecay(StrEnum):
    linear = "linear"
    sqrt = "sqrt"


class Loss(StrEnum):
    cross_entropy = "cross_entropy"
    keytoken = "keytoken"


class Parallel(StrEnum):
    ddp = "ddp"
    dp = "dp"


class NonFinite(StrEnum):
    skip = "skip"
    stop = "stop"


class Pack(StrEnum):
    concat = "concat"
    chunk = "chunk"
    sample = "sample"


@dataclass
class LoraConfig:
    # LoRA through peft (gptlab/lora.py): r > 0 freezes the model and trains rank-r adapters
    # on the modules named here (a name matches a module path's last parts); 0 trains every weight.
    # The adapters' output is scaled by alpha / r.
    r: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    # GPT-2's attention and MLP projections (Conv1D); other architectures name theirs (q_proj, ...).
    target_modules: List[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_positions: int = 1024
    dropout: float = 0.0
    attn_implementation: str = "sdpa"
    # From-scratch models round the vocab up to this multiple (tensor-core friendly); 1 turns it off.
    vocab_pad_multiple: int = 64
    # From scratch: the architecture, gpt2 (GPT2LMHeadModel), llama (rotary positions, RMSNorm,
    # a SiLU-gated MLP) or qwen3 (Llama's plus QK-norm), each a transformers class that loads
    # with no custom code. Then the MLP's activation (any name in transformers' ACT2FN, e.g.
    # relu2 = ReLU squared; null: GPT-2's tanh GELU, Llama's and Qwen3's SiLU), an LM head of its
    # own instead of the token embedding's transpose, the attention and MLP output projections
    # started at zero, the init's standard deviation (the HF config's initializer_range; null:
    # its 0.02).
    arch: Arch = Arch.gpt2
    activation: Optional[str] = None
    tie_embeddings: bool = True
    zero_init_proj: bool = False
    init_std: Optional[float] = None
    # A local Hugging Face causal LM to fine-tune. Its own architecture and tokenizer are
    # used (the keys above are ignored), and the tokenizer is never retrained.
    pretrained_path: Optional[str] = None
    trust_remote_code: bool = False
    # pretrained_path may be a Hub id (org/name), read through the HF cache (HF_HOME,
    # HF_HUB_OFFLINE); revision is a branch, tag or commit. A run pins it to the commit.
    revision: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # A source name (python_source, text, jsonl, sqlite, hf, librus_html) or a list of
    # them; a list entry may be a mapping {name: text, files: [...], ...} whose keys
    # override the per-source keys below for that entry only.
    source: Any = "python_source"
    # text, jsonl, hf, librus_html: local files or globs, in order. valid_files (same
    # source type) is an explicit validation split; then valid_fraction is not used.
    files: List[str] = field(default_factory=list)
    valid_files: List[str] = field(default_factory=list)
    encoding: str = "utf-8"  # text, jsonl, librus_html (lib.ru pages are cp1251)
    text_unit: str = "file"  # text: one document per file | paragraph (blank-line separated) | line
    text_field: str = "text"  # jsonl: the field; hf, sqlite: the column
    # sqlite: the database file and a query; the text is its only column, or the one named text_field.
    db: Optional[str] = None
    query: Optional[str] = None
    valid_query: Optional[str] = None
    # hf: a datasets packaged builder (json, csv, parquet, arrow, text) over `files`,
    # or `disk` for a directory written by save_to_disk (files: [DIR]).
    builder: str = "json"
    # hf: read rows as they are used (a Hub id over the network, with nothing downloaded first).
    streaming: bool = False
    # hf: keep this many rows of the train (valid) data, shuffled with split_seed first, as
    # seed 002's shuffle(seed).select(range(N)); null keeps all.
    select: Optional[int] = None
    valid_select: Optional[int] = None
    # hf with a dataset repo as builder: a Hub dataset id (org/name) or a local directory
    # laid out like one. split is read for training; valid_builder (another repo) and/or
    # valid_split give explicit validation data (its split defaults to `split`).
    # Revisions are branches, tags or commits; a run pins them to commits.
    config_name: Optional[str] = None
    revision: Optional[str] = None
    split: str = "train"
    valid_builder: Optional[str] = None
    valid_revision: Optional[str] = None
    valid_split: Optional[str] = None
    # python_source: directories to scan; empty means the running interpreter's
    # standard library and site-packages (the embedded default corpus).
    paths: List[str] = field(default_factory=list)
    max_bytes: int = 10_000_000
    # librus_html: pages downloaded once (http/https only) into download_dir.
    urls: List[str] = field(default_factory=list)
    download_dir: Optional[str] = None  # None: <cache_dir>/downloads
    download_timeout_s: float = 30.0
    download_retries: int = 3
    download_max_bytes: int = 50_000_000
    # Filters: keep documents containing any keyword (empty: all) and at least min_chars
    # non-blank characters.
    keywords: List[str] = field(default_factory=list)
    min_chars: int = 1
    valid_fraction: float = 0.01
    split_seed: int = 0
    # hash: a document goes to validation by a hash of (split_seed, its name), stable as a corpus
    # grows; sklearn: scikit-learn's train_test_split(test_size=valid_fraction,
    # random_state=split_seed) over the kept documents in order (the notebooks' split, exactly).
    split_method: str = "hash"
    # concat: EOS after each document, one stream cut into blocks (remainder dropped);
    # chunk: each document cut into blocks on its own, short tails dropped.
    pack: Pack = Pack.concat
    block_size: int = 256


@dataclass
class TokenizerConfig:
    # A directory with a saved tokenizer or a Hub id; None trains a byte-level BPE on the train split.
    path: Optional[str] = None
    revision: Optional[str] = None  # of a Hub id, as model.revision
    # byte_level: GPT-2's byte-level BPE; whitespace: seeds 000/001's words-and-punctuation BPE
    # (characters it never saw become [UNK], if that is a special token; decoding joins tokens with spaces).
    kind: str = "byte_level"
    vocab_size: int = 8192
    min_frequency: int = 2
    # The first is bos and eos (documents end with it), and pad unless [PAD] is one of them.
    special_tokens: List[str] = field(default_factory=lambda: ["<|endoftext|>"])
    # BPE training reads at most this much of the train split (an even, deterministic
    # sample of whole documents): its memory grows with what it reads (~5x). Tokenizing
    # still covers every document. null reads everything.
    max_train_bytes: Optional[int] = 512 * 2**20


@dataclass
class OptimConfig:
    # auto (the default: muon from scratch, adamw to fine-tune) | adamw | adam | adafactor | muon
    # (betas and eps do not apply to adafactor)
    name: Optimizer = Optimizer.adamw
    # null: by the job, 3e-3 from scratch, 5e-5 to fine-tune a pretrained model (optim=auto has it).
    lr: Optional[float] = 1e-3
    weight_decay: float = 0.1
    # null: by the job, (0.8, 0.99) from scratch, (0.9, 0.95) to fine-tune (optim=auto has it).
    betas: Optional[List[float]] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # muon: torch.optim.Muon for the matrices inside the blocks, AdamW (lr, weight_decay,
    # betas, eps above) for the rest; both follow the one schedule multiplier.
    muon_lr: float = 2e-3
    muon_weight_decay: float = 0.1
    momentum: float = 0.95
    ns_steps: int = 5
    # muon: orthogonalise GPT-2's fused c_attn as Q, K and V apart (modded-nanogpt's way), not as one matrix
    muon_split_qkv: bool = True
    # muon: its momentum rises linearly from momentum_start to `momentum` over these first
    # optimizer steps (modded-nanogpt: 0.85 -> 0.95 over 300); 0 keeps it constant. Other
    # optimizers ignore it (optim=auto's and optim=muon's files set 100).
    momentum_warmup_steps: int = 0
    momentum_start: float = 0.85


@dataclass
class SchedulerConfig:
    name: Schedule = Schedule.cosine
    warmup_steps: int = 30
    # Where the decay ends; null: a tenth of optim.lr.
    min_lr: Optional[float] = 1e-4
    # wsd: hold optim.lr, then decay to min_lr over this last fraction of the steps, linear | sqrt (1-sqrt).
    decay_fraction: float = 0.2
    decay: WsdDecay = WsdDecay.linear


@dataclass
class LossConfig:
    name: Loss = Loss.cross_entropy
    keywords: List[str] = field(default_factory=list)
    alpha: float = 1.0
    normalize: bool = False


DEFAULT_MAX_STEPS = 300  # the default run: about 5 minutes on a 2-core CPU


@dataclass
class TrainerConfig:
    micro_batch_size: int = 8
    # Sequences per optimizer step over all processes; null: micro_batch_size x grad_accum x processes.
    # When set, grad_accum is derived from it and the process count (the same recipe on 1 or 8 GPUs).
    global_batch_size: Optional[int] = None
    # Micro-steps per optimizer step; null: derived from global_batch_size, or 1 without it.
    # Given explicitly next to global_batch_size, it must agree with it.
    grad_accum: Optional[int] = None
    # Batch warmup: the first batch_warmup_steps optimizer steps read only the first
    # batch_warmup_micro sequences of each micro batch (cheaper steps early; 0: off).
    batch_warmup_steps: int = 0
    batch_warmup_micro: Optional[int] = None
    # Sequence warmup: the first seq_warmup_steps optimizer steps read every token of each block
    # as rows of seq_warmup_len (a shorter context alone), or with seq_warmup_split=false only each
    # block's first seq_warmup_len tokens (cheaper steps, shorter context). 0: off; null: by the
    # job, 100 steps (at most a third of the run) in the default recipe from scratch, else off
    # (schedule.sequence_warmup). seq_warmup_len null: half of data.block_size.
    seq_warmup_steps: Optional[int] = None
    seq_warmup_len: Optional[int] = None
    seq_warmup_split: bool = True
    # Optimizer steps. null: trainer.epochs decides, or DEFAULT_MAX_STEPS without it. Given, it wins
    # over epochs (as run_clm's max_steps does), so `trainer.max_steps=30` shrinks any preset.
    max_steps: Optional[int] = None
    # Passes over the training split (may be fractional), counted in optimizer steps; presets that
    # count epochs, as their notebooks do, set it.
    epochs: Optional[float] = None
    max_grad_norm: float = 1.0
    eval_every: int = 100
    # Also evaluate (and sample) the untrained model, logged at step 0 (HF's eval_on_start).
    eval_on_start: bool = False
    log_every: int = 10
    # A step with a non-finite loss or grad norm: skip its update (weights and optimizer
    # state untouched), or stop. max_skips skipped updates in a row stop the run.
    nonfinite: NonFinite = NonFinite.skip
    max_skips: int = 10
    # Skip an update whose loss is this many standard deviations above the mean of the
    # last spike_window accepted steps (as llm.c does); None turns the guard off.
    spike_zscore: Optional[float] = None
    spike_window: int = 100
    # no | fp16 | bf16. None: bf16 on a GPU with bf16 tensor cores (compute capability >= 8.0), fp16 with
    # a GradScaler on 7.x (V100, T4), "no" below and on a CPU (where low-precision matmul without
    # AVX512-BF16/AMX is emulated, ~100x slower).
    mixed_precision: Optional[str] = None
    # Torch threads per process on a CPU; null: the physical cores / the processes on this machine.
    # (accelerate launch sets OMP_NUM_THREADS=1 for a single CPU process unless told otherwise.)
    cpu_threads: Optional[int] = None
    # torch.compile the repeated transformer blocks (see model.compile_blocks).
    compile: bool = False
    # Recompute each transformer block in the backward pass instead of keeping its activations
    # (non-reentrant torch.utils.checkpoint): far less activation memory for about a third more compute.
    activation_checkpointing: bool = False
    # An exponential moving average of the weights, decay per optimizer step (0: none; ~0.99 for a
    # few hundred steps): evaluated beside the raw weights (eval/ema_*), kept in checkpoints, and
    # exported to final/ in their place unless ema_export is false (ema.py).
    ema_decay: float = 0.0
    ema_export: bool = True
    # TensorFloat-32 matmuls on CUDA GPUs that have it; no effect on CPU.
    tf32: bool = True
    # FLOP/s of one device for train/mfu; None: a table for known GPUs, else a short matmul measurement.
    peak_flops: Optional[float] = None
    # ddp: one process per device, the launch decides how many (recommended).
    # dp: legacy torch.nn.DataParallel, one process splitting each micro batch over all local GPUs.
    parallel: Parallel = Parallel.ddp
    # Generated at every evaluation, logged to TensorBoard (text) and metrics.jsonl.
    sample_prompts: List[str] = field(default_factory=lambda: ["import numpy as np\n"])
    sample_max_new_tokens: int = 48
    # A fresh order of the training blocks (samples) every epoch, from the seed; false reads them in
    # order, as a DataLoader without shuffle (seed 003).
    shuffle: bool = True
    # Checkpoint every save_every optimizer steps (0: only at the end and on SIGTERM/SIGINT);
    # a multiple of log_every. keep_last prunes older step_* checkpoints (null keeps all).
    save_every: int = 100
    keep_last: Optional[int] = 3


@dataclass
class GenerateConfig:
    """How samples are drawn, in training and as the generate CLI's defaults for a run."""
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_beams: int = 1
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    # The whole text's length in tokens, prompt included (HF's max_length, as seeds 003 and 004
    # sample); when set it replaces trainer.sample_max_new_tokens and the CLI's --max_new_tokens.
    max_length: Optional[int] = None


class TrackerName(StrEnum):  # Accelerate's trackers, beside TensorBoard and metrics.jsonl
    wandb = "wandb"
    mlflow = "mlflow"
    trackio = "trackio"
    aim = "aim"


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    jsonl: bool = True
    # More trackers, alone (logger=wandb turns TensorBoard off) or together (logger.trackers=[wandb,mlflow]),
    # with the same metric names, the resolved config as their run's parameters, and the text samples
    # where the tracker keeps text (W&B: a table; MLflow: text artifacts). Each needs its package:
    # pip install 'gptlab[wandb]' (or mlflow, trackio, aim); their own settings (WANDB_MODE,
    # MLFLOW_TRACKING_URI, ...) come from the environment as usual.
    trackers: List[TrackerName] = field(default_factory=list)
    project: str = "gptlab"  # the W&B or Trackio project, the MLflow experiment


@dataclass
class TasksConfig:
    # Multiple-choice tasks scored at every evaluation (gptlab/choices.py), logged as
    # eval/<task>/acc and eval/<task>/acc_norm: next_line (built from the validation split) or
    # JSON-lines files in HellaSwag's layout. [] turns them off.
    names: List[str] = field(default_factory=lambda: ["next_line"])
    limit: Optional[int] = 100  # items per task (next_line draws this many); null: all of a file
    every: Optional[int] = None  # steps between scorings; null: at every evaluation (trainer.eval_every)


@dataclass
class GptlabConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    seed: int = 1337
    # None: outputs/<experiment or "default">/<timestamp>, chosen once by rank 0.
    run_dir: Optional[str] = None
    # Tokenizers and token caches, shared between runs and keyed by fingerprints.
    cache_dir: str = "~/.cache/gptlab"
    # "auto": continue the latest loadable checkpoint in run_dir (or start if there is none);
    # a checkpoint directory: continue from it, in its run directory.
    resume: Optional[str] = None


def _required(key: str):
    # `key: ${required:key}` in an experiment: a YAML delta cannot use `???` (merging
    # MISSING keeps the earlier value), so the value fails when first read instead.
    raise ValueError(f"this experiment needs {key}=... on the command line")


def register_configs() -> None:
    ConfigStore.instance().store(name="gptlab_schema", node=GptlabConfig)
    OmegaConf.register_new_resolver("required", _required, replace=True)


def did_you_mean(args: list, config_dir: str) -> Optional[str]:
    """For a command line whose override names a key the config lacks (`optim.lrr=1`), the one
    line "did you mean optim.lr?": the closest key where the config's keys part from it.
    None when the line composes, or nothing is close. Hydra says what failed; this is the fix."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import DictConfig

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    plain = [o.split("=", 1)[0] for o in overrides if not o.startswith(("+", "~", "hydra."))]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            compose("config", overrides)
            return None  # it composes: the failure was not a key
        except HydraException:
            pass
        for key in [k for k in plain if "." in k]:
            try:
                cfg = compose("config", [o for o in overrides if o.split("=", 1)[0] != key])
            except HydraException:
                continue  # another override fails on its own
            node, parts = cfg, key.split(".")
            for i, part in enumerate(parts):
                if not isinstance(node, DictConfig):
                    break
                if part not in node:
                    close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
                    if close:
                        return f"did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1:]])}?"
                    break
                node = OmegaConf.select(node, part, throw_on_resolution_failure=False)
    return None
