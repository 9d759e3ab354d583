"""The training loop: one optimizer step (`train_step`), and around it logging, checkpoints and evaluation."""
import logging
import math
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from .data.blocks import to_device
from .evaluate import evaluate
from .flops import MFU
from .footprint import log_state_bytes
from .guards import StepGuard, TrainingHalted, halt
from .model import forward_loss
from .optim import clip_grad_norm, set_lr, set_momentum, step_unless
from .schedule import SeqWarmup, make_momentum, make_schedule

log = logging.getLogger(__name__)


def train_step(model, optimizer, loss_fn, batches, z, guard, t: int, accelerator, max_norm: float):
    """Optimizer step t over this process's micro-batches (each a (B, T) tensor of token ids).

    `z` is this process's share of the step's loss denominator (targets, samples or weights
    of every micro-batch of every process): the loss is Σ w·CE / denominator, so k
    micro-batches of b equal one batch of k·b, and W processes equal one (loss.py).
    Returns the step's loss, its gradient norm and whether the update was rejected: device
    tensors, none read here, so a GPU never waits for the host.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, x in enumerate(batches):
        x = to_device(x, accelerator.device)
        # Gradients are all-reduced only on the last micro-step.
        with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
            with accelerator.autocast():  # the fused LM head and loss run outside the model's forward
                loss = forward_loss(model, x, loss_fn, z)
            accelerator.backward(loss)
        loss_sum += loss.detach()
    norm = clip_grad_norm(accelerator, model, max_norm)
    # The guard rejects a non-finite loss or norm, or a loss spike. It decides on the device,
    # and the update is a masked step: where `reject` is true, weights and optimizer state
    # stay as they were (optim.step_unless), with no host read.
    reject = guard.check(loss_sum, norm, t)
    step_unless(optimizer, reject)
    if accelerator.scaler is not None:  # fp16: the next scale, from the overflow clipping's unscale_ found
        accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm, reject


class Meter:
    """What the loop logs, summed on the device between the host's reads (log steps, epoch ends):
    the loss and gradient norm of the updates taken (a rejected one adds nothing), tokens, time."""

    def __init__(self, device):
        self.loss, self.norm, self.epoch_loss = (torch.zeros((), device=device) for _ in range(3))
        self.kept = self.epoch_kept = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, loss, norm, reject, tokens: int) -> None:
        self.loss += torch.where(reject, 0.0, loss)
        self.norm += torch.where(reject, 0.0, norm.float())
        self.epoch_loss += torch.where(reject, 0.0, loss)
        self.tokens += tokens

    def count(self, taken: int) -> None:
        """Updates taken since the last count, as the guard's flush reports them."""
        self.kept += taken
        self.epoch_kept += taken

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Time that is not training throughput (a checkpoint save)."""
        self.start += seconds

    def window(self, accelerator) -> dict:
        """The log row since the last one (averages over the updates taken), then a fresh window."""
        kept, elapsed = self.kept, time.perf_counter() - self.start
        row = {"train/loss": accelerator.reduce(self.loss, reduction="mean").item() / kept if kept else math.nan,
               "train/grad_norm": self.norm.item() / kept if kept else math.nan,
               "train/tokens_per_s": self.tokens / elapsed}
        self.loss.zero_()
        self.norm.zero_()
        self.kept = self.tokens = 0
        self.restart_clock()
        return row

    def epoch_train_loss(self, accelerator) -> float:
        kept = self.epoch_kept
        loss = accelerator.reduce(self.epoch_loss, reduction="mean").item() / kept if kept else math.nan
        self.epoch_loss.zero_()
        self.epoch_kept = 0
        return loss


def train(model, optimizer, loss_fn, order, train_blocks, valid_blocks, cfg, accelerator, tracker,
          max_steps: int, seq_warmup: SeqWarmup, start_step: int = 0, checkpoints=None, on_eval=None,
          score_tasks=None, ema=None) -> dict:
    """Steps start_step + 1 .. max_steps; returns the last log row with the last evaluation.

    score_tasks() gives the multiple-choice accuracies (choices.py), logged every tasks.every steps
    (null: with each evaluation) and at the end. `ema` (ema.WeightAverage) is updated after every
    step and evaluated beside the weights."""
    tc = cfg.trainer
    schedule, momentum = make_schedule(cfg.scheduler, cfg.optim.lr, max_steps), make_momentum(cfg.optim)
    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
    mfu = MFU(accelerator.unwrap_model(model), train_blocks.block_size, accelerator.device, accelerator.num_processes,
              tc.peak_flops, accelerator.mixed_precision)
    guard = StepGuard.from_config(tc, accelerator)
    meter, last, evaluated_at = Meter(accelerator.device), {}, None
    tasks_every = cfg.tasks.every or tc.eval_every
    short_blocks = seq_warmup.blocks(train_blocks)  # steps 1..seq_warmup.steps read shorter rows

    def run_eval(t: int) -> dict:
        metrics = evaluate(model, valid_blocks, tc.micro_batch_size, accelerator)
        shown = ("eval/loss", "eval/perplexity", "eval/bpb")
        if ema is not None:
            with ema.swapped_in():
                averaged = evaluate(model, valid_blocks, tc.micro_batch_size, accelerator)
            metrics.update({f"eval/ema_{k[len('eval/'):]}": averaged[k] for k in shown if k in averaged})
            shown += ("eval/ema_loss", "eval/ema_perplexity", "eval/ema_bpb")
        tracker.log({k: metrics[k] for k in shown if k in metrics}, t)
        log.info("step %d: eval/loss %.4f, perplexity %.2f, %.4f bits per byte%s", t, metrics["eval/loss"],
                 metrics["eval/perplexity"], metrics.get("eval/bpb", math.nan),
                 f"; weight average: eval/loss {metrics['eval/ema_loss']:.4f}" if ema is not None else "")
        return metrics

    def run_tasks(t: int) -> dict:
        accuracies = score_tasks()
        tracker.log(accuracies, t)
        log.info("step %d: %s", t, ", ".join(f"{k[len('eval/'):]} {v:.3f}" for k, v in accuracies.items()))
        return accuracies

    if tc.eval_on_start and start_step == 0:  # the untrained model's loss and samples, as step 0
        run_eval(0)
        if score_tasks is not None:
            run_tasks(0)
        if on_eval is not None:
            on_eval(0)

    model.train()
    bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    for t in range(start_step + 1, max_steps + 1):  # t: the optimizer step, 1-based as logged
        lr = schedule(t)
        set_lr(optimizer, lr)
        if momentum is not None:
            set_momentum(optimizer, momentum(t))
        blocks = short_blocks if t <= seq_warmup.steps else train_blocks
        everyone = order.step_batches(t - 1)  # the data order counts the steps before this one
        z = sum(loss_fn.denominator(blocks, ids) for ids in everyone) / accelerator.num_processes
        batches = [blocks.batch(ids) for ids in order.micro_batches(t - 1)]
        loss, norm, reject = train_step(model, optimizer, loss_fn, batches, z, guard, t, accelerator, max_norm)
        if ema is not None:
            ema.update(t, reject)
        meter.add(loss, norm, reject, sum(blocks.n_tokens(ids) for ids in everyone))
        if t == start_step + 1:
            log_state_bytes(model, optimizer, accelerator.num_processes)  # the optimizer's state exists now

        log_due = t % tc.log_every == 0 or t == max_steps
        # SIGTERM/SIGINT are acted on at a step boundary (with several processes, at a log step,
        # where they agree on it): log what is pending, save, return.
        stop = checkpoints is not None and checkpoints.stop_requested(log_due)
        log_due = log_due or stop
        epoch = order.epoch_at(t)
        crossed = math.floor(epoch) > math.floor(order.epoch_at(t - 1))
        eval_due = t % tc.eval_every == 0 or t == max_steps
        epoch_due = tc.epochs is not None and (crossed or t == max_steps)
        if log_due or eval_due or epoch_due:
            try:
                meter.count(guard.flush())  # the guard's one host read; it raises at a halt
            except TrainingHalted as e:
                bar.close()  # so the error is the last line on the console
                halt(e, checkpoints, max_steps)
        bar.update(1)

        if log_due:
            window = meter.window(accelerator)
            last = {"train/loss": window["train/loss"], "train/lr": lr, "train/grad_norm": window["train/grad_norm"],
                    "train/tokens_per_s": window["train/tokens_per_s"], "train/skipped_steps": guard.skipped}
            last["train/mfu"] = mfu(last["train/tokens_per_s"])
            tracker.log(last, t)
            bar.set_postfix(loss=f"{last['train/loss']:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{last['train/tokens_per_s']:.0f}", mfu=f"{last['train/mfu']:.1%}")
        if checkpoints is not None:  # saves only at log steps (save_every is a multiple of log_every)
            t_save = time.perf_counter()
            checkpoints.save_if_due(t, max_steps, stop)
            meter.exclude(time.perf_counter() - t_save)
        if eval_due:
            metrics = run_eval(t)
            last.update(metrics)
            if checkpoints is not None:
                checkpoints.evaluated(t, max_steps, metrics["eval/loss"])
            if not math.isfinite(metrics["eval/loss"]):
                bar.close()
                raise TrainingHalted(f"step {t}: eval/loss is {metrics['eval/loss']}: the weights no longer give "
                                     "finite outputs, which skipping updates cannot repair (optim.lr too high?)", t)
            evaluated_at = t
            if on_eval is not None:
                on_eval(t)
            meter.restart_clock()  # evaluation time is not training throughput
        if score_tasks is not None and (t % tasks_every == 0 or t == max_steps):
            last.update(run_tasks(t))
            meter.restart_clock()  # nor is scoring the tasks
        if epoch_due:
            if evaluated_at != t:
                metrics = evaluate(model, valid_blocks, tc.micro_batch_size, accelerator)
            ep = {"epoch/epoch": math.floor(epoch) if crossed else math.ceil(epoch),
                  "epoch/train_loss": meter.epoch_train_loss(accelerator), "epoch/test_loss": metrics["eval/sample_loss"]}
            tracker.log(ep, t)
            log.info("epoch %d: train loss %.4f, test loss %.4f", ep["epoch/epoch"], ep["epoch/train_loss"],
                     ep["epoch/test_loss"])
            meter.restart_clock()
        if stop:
            break
    bar.close()
    return last
