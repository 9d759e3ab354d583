"""Compose one training run from a config: data, model, optimizer, loop, export."""
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from .checkpoint import Checkpoints, plan_run_dir
from .choices import accuracy, documents, load_tasks
from .config import DEFAULT_MAX_STEPS
from .data.blocks import BatchPlan, TrainOrder
from .data.prepare import prepare
from .data.sources import HfSource
from .console import EarlyLogs, setup_logging
from .distributed import end_processes, is_sharded, make_accelerator, prepare_model
from .ema import WeightAverage
from .export import export_final
from .generate import log_samples
from .hub import is_hub_id, pin_hub_ids
from .lock import release_run_dirs
from .lora import apply_lora, base_reference
from .loop import train
from .loss import make_loss_fn
from .model import (apply_activation_checkpointing, build_model, check_block_size, compile_blocks, count_parameters,
                    pretrained_dir)
from .optim import build_optimizer, choose_optimizer
from .run_dir import agree_run_dir
from .schedule import sequence_warmup
from .tokenizer import check_vocab, tokenizer_path
from .tracking import Tracker
from .preflight import check_config, check_environment, check_run, check_warmup

log = logging.getLogger(__name__)
# The final metrics next to the hyperparameters in TensorBoard's HParams tab.
HPARAM_METRICS = ("eval/loss", "eval/perplexity", "eval/bpb", "eval/ema_loss", "train/tokens_per_s")


def _save_config(cfg, run_dir: Path) -> None:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        from hydra.core.hydra_config import HydraConfig
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))


def _saved_config(run_dir: Path, resume):
    """The config an earlier launch of this run saved, when this launch resumes it."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if resume and path.is_file() else None


def resolve_max_steps(tc, order: TrainOrder) -> int:
    """trainer.max_steps when given (it wins over epochs, as in run_clm), else the steps of
    trainer.epochs, else the default run's length."""
    if tc.max_steps is not None:
        if tc.epochs is not None:
            log.info("trainer.max_steps=%d wins over trainer.epochs=%s (%.2f epochs); trainer.max_steps=null "
                     "trains by epochs", tc.max_steps, tc.epochs, order.epoch_at(tc.max_steps))
        return tc.max_steps
    if tc.epochs is None:
        return DEFAULT_MAX_STEPS
    return max(1, math.floor(tc.epochs * order.steps_per_epoch))


def run(cfg) -> dict:
    early = EarlyLogs()  # what is logged before the run directory exists goes into its train.log
    try:
        return _run(cfg, early)
    finally:
        early.release()  # shown on the console if the run failed before that
        release_run_dirs()  # the lock agree_run_dir took, also when the run fails


def _run(composed, early) -> dict:
    # A copy of the composed config gets what this launch decides (the optimizer of optim=auto, the
    # grad_accum of this process count, the tokenizer, each Hub id's commit) before it is saved, so
    # the saved config records what ran; from then on it is read-only.
    cfg, chosen = choose_optimizer(composed)
    if chosen:
        log.info(chosen)
    check_config(cfg)
    check_environment(cfg, torch.cuda.is_available())
    run_dir = plan_run_dir(cfg)  # checks the checkpoint options before any work
    accelerator = make_accelerator(cfg.trainer)
    main = accelerator.is_main_process
    tc = cfg.trainer
    plan = BatchPlan.derive(tc, accelerator.num_processes, cfg.data.block_size)  # once, for this launch
    tc.grad_accum = plan.accum
    run_dir = agree_run_dir(accelerator, run_dir)
    setup_logging(run_dir, main, early)
    if cfg.model.pretrained_path and not cfg.tokenizer.path:
        cfg.tokenizer.revision = cfg.model.revision  # the model's own tokenizer, never retrained
    cfg.tokenizer.path = tokenizer_path(cfg)
    # Before the config is saved: the run dir and every checkpoint store the pinned commits.
    pin_hub_ids(cfg, accelerator, Path(cfg.cache_dir).expanduser(), datasets=HfSource.reads_repo(cfg.data),
                stream=cfg.data.streaming,
                previous=_saved_config(run_dir, cfg.resume))
    OmegaConf.set_readonly(cfg, True)
    if main:
        _save_config(cfg, run_dir)
    log.info("run directory %s; %d process(es), %s, mixed precision %s%s", run_dir,
             accelerator.num_processes, accelerator.distributed_type, accelerator.mixed_precision,
             f", {torch.get_num_threads()} CPU thread(s) per process" if accelerator.device.type == "cpu" else "")

    set_seed(cfg.seed)
    if is_hub_id(cfg.model.pretrained_path or ""):  # its positions are known now that pin_hub_ids fetched it
        check_block_size(cfg.model, cfg.data.block_size)
    data = prepare(cfg, Path(cfg.cache_dir).expanduser(), is_builder=accelerator.is_local_main_process,
                   show_progress=main)
    tokenizer = data.tokenizer
    log.info("data: %d train blocks, %d valid blocks of %d tokens (cache %s)",
             len(data.train), len(data.valid), cfg.data.block_size, data.info["cache_dir"])
    if main:
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))

    model = build_model(cfg.model, tokenizer, cfg.data.block_size)
    check_vocab(tokenizer, model.get_input_embeddings().num_embeddings)
    lora_base = None
    if cfg.model.lora.r > 0:  # freeze the model, train adapters; the base is referenced, not checkpointed
        stored = pretrained_dir(cfg.model) if cfg.model.pretrained_path else None  # a Hub id: its snapshot
        lora_base = base_reference(model, cfg.model, stored, run_dir, main)
        model = apply_lora(model, cfg.model.lora)
    check_run(cfg, model, data.train, data.valid, accelerator.num_processes, run_dir)
    # TF32 matmuls on Ampere and later: ~8x the fp32 FLOP/s for the parts autocast leaves in fp32.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.trainer.tf32
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if cfg.trainer.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg.optim)
    n_all, n_train = count_parameters(model), count_parameters(model, trainable_only=True)
    # (the optimizer state's bytes are logged after step 1, when the moments exist: footprint.py)
    log.info("parameters: %s trainable of %s (%.3g%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)
    loss_fn = make_loss_fn(cfg.loss, tokenizer)
    model, optimizer = prepare_model(accelerator, model, optimizer, cfg.trainer.parallel)

    order = TrainOrder(len(data.train), plan.micro, plan.accum, plan.processes, accelerator.process_index, cfg.seed,
                       tc.shuffle, tc.batch_warmup_steps, tc.batch_warmup_micro)
    max_steps = resolve_max_steps(tc, order)
    check_warmup(cfg.scheduler.warmup_steps, max_steps)
    log.info("global batch %d%s = micro %d x accum %d x %d process(es); %d tokens per optimizer step; "
             "%d steps (%.2f epochs)", plan.global_batch,
             " (trainer.global_batch_size; grad_accum derived)" if tc.global_batch_size else "",
             plan.micro, plan.accum, plan.processes, plan.tokens_per_step, max_steps, order.epoch_at(max_steps))
    if tc.batch_warmup_steps:
        log.info("batch warmup: steps 1-%d read %d of each micro batch's %d sequences", tc.batch_warmup_steps,
                 tc.batch_warmup_micro, plan.micro)
    seq_warmup = sequence_warmup(tc, cfg.data, max_steps, default_recipe=chosen is not None and
                                 not cfg.model.pretrained_path)
    if seq_warmup.steps:
        log.info("%s%s", seq_warmup.describe(cfg.data.block_size),
                 "; trainer.seq_warmup_steps=0 turns it off" if tc.seq_warmup_steps is None else "")

    ema = WeightAverage(accelerator.unwrap_model(model), tc.ema_decay) if tc.ema_decay else None
    checkpoints = Checkpoints(accelerator, run_dir, cfg, model, optimizer, tokenizer, order, plan, lora_base, ema)
    start_step = checkpoints.resume(cfg.resume)
    # A resumed run supersedes what was logged after its checkpoint.
    tracker = Tracker(run_dir, cfg.logger.tensorboard, cfg.logger.jsonl, enabled=main, trackers=cfg.logger.trackers,
                      project=cfg.logger.project, config=OmegaConf.to_container(cfg, resolve=True),
                      resume_step=start_step if cfg.resume else None)

    sharded = is_sharded(model)
    tasks = load_tasks(cfg.tasks.names, cfg.tasks.limit, lambda: documents(data.valid, tokenizer), cfg.seed)

    def score_tasks() -> dict:  # at every evaluation, on every process
        started, scores = time.perf_counter(), {}
        for task in tasks:
            scores.update(accuracy(model, tokenizer, task, tc.micro_batch_size, accelerator, cfg.data.block_size))
        if tasks:
            log.info("%d multiple-choice task(s) scored in %.2f s", len(tasks), time.perf_counter() - started)
        return scores

    def sample(step: int) -> None:  # after every evaluation, on the main process (FSDP: on all, in step)
        if (main or sharded) and tc.sample_prompts:
            log_samples(accelerator.unwrap_model(model), tokenizer, tc.sample_prompts, step, tracker,
                        tc.sample_max_new_tokens, cfg.seed, cfg.generate)

    try:
        with checkpoints.signals:
            result = train(model, optimizer, loss_fn, order, data.train, data.valid, cfg, accelerator, tracker,
                           max_steps=max_steps, seq_warmup=seq_warmup, start_step=start_step, checkpoints=checkpoints,
                           on_eval=sample, score_tasks=score_tasks if tasks else None, ema=ema)
        accelerator.wait_for_everyone()
        if checkpoints.stopped:
            log.info("stopped by %s; continue with resume=auto run_dir=%s", checkpoints.stopped, run_dir)
        elif main:
            tracker.hparams(OmegaConf.to_container(cfg, resolve=True),
                            {k: result[k] for k in HPARAM_METRICS if k in result})
            unwrapped = accelerator.unwrap_model(model)
            average = ema if ema is not None and tc.ema_export else None  # exported in the weights' place
            with average.swapped_in() if average is not None else nullcontext():
                export_final(unwrapped, tokenizer, checkpoints.latest, run_dir / "final")
            log.info("done: %d parameters, final train/loss %.4f, eval/loss %.4f; exported %sto %s",
                     count_parameters(unwrapped), result.get("train/loss", float("nan")),
                     result.get("eval/loss", float("nan")),
                     f"the weight average (eval/ema_loss {result['eval/ema_loss']:.4f}) "
                     if average is not None and "eval/ema_loss" in result else "", run_dir / "final")
    finally:
        tracker.close()
    end_processes(accelerator)
    return {**result, "run_dir": str(run_dir), "stopped": checkpoints.stopped}
