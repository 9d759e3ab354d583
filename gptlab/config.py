"""Typed config schemas, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `gptlab_schema` first in its defaults list, so every YAML
group and every command-line override is merged into these dataclasses: an unknown
key or a wrong type fails when Hydra composes the config, before anything runs.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore


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


@dataclass
class DataConfig:
    source: str = "python_source"
    # python_source: directories to scan; empty means the running interpreter's
    # standard library and site-packages (the embedded default corpus).
    paths: List[str] = field(default_factory=list)
    max_bytes: int = 10_000_000
    valid_fraction: float = 0.01
    split_seed: int = 0
    block_size: int = 256


@dataclass
class TokenizerConfig:
    # A directory with a saved tokenizer; None trains a byte-level BPE on the train split.
    path: Optional[str] = None
    vocab_size: int = 8192
    min_frequency: int = 2
    special_tokens: List[str] = field(default_factory=lambda: ["<|endoftext|>"])


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 30
    min_lr: float = 1e-4


@dataclass
class LossConfig:
    name: str = "cross_entropy"  # cross_entropy | keytoken
    keywords: List[str] = field(default_factory=list)
    alpha: float = 1.0
    normalize: bool = False


@dataclass
class TrainerConfig:
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 300
    # When set, overrides max_steps with the optimizer steps that make this many epochs.
    epochs: Optional[int] = None
    max_grad_norm: float = 1.0
    eval_every: int = 100
    log_every: int = 10
    # None picks bf16 on a CUDA GPU that supports it and "no" elsewhere:
    # low-precision matmul on a CPU without AVX-512 is emulated and ~100x slower.
    mixed_precision: Optional[str] = None
    # torch.compile the repeated transformer blocks (see model.compile_blocks).
    compile: bool = False
    # TensorFloat-32 matmuls on CUDA GPUs that have it; no effect on CPU.
    tf32: bool = True
    # FLOP/s of one device for train/mfu; None: a table for known GPUs, else a short matmul measurement.
    peak_flops: Optional[float] = None
    sample_prompt: str = "import numpy as np\n"
    sample_max_new_tokens: int = 48


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    jsonl: bool = True


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
    seed: int = 1337
    # None: outputs/<experiment or "default">/<timestamp>, chosen once by rank 0.
    run_dir: Optional[str] = None
    # Tokenizers and token caches, shared between runs and keyed by fingerprints.
    cache_dir: str = "~/.cache/gptlab"


def register_configs() -> None:
    ConfigStore.instance().store(name="gptlab_schema", node=GptlabConfig)
