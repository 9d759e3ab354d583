"""The training loop, nothing else: micro-steps, accumulate, clip, step, log, evaluate."""
import logging
import math
import time
from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .evaluate import evaluate
from .flops import MFU
from .footprint import log_state_bytes
from .guards import StepGuard, TrainingHalted, halt
from .model import forward_loss
from .optim import make_schedule, set_lr, step_unless

log = logging.getLogger(__name__)


def train(model, optimizer, loss_fn, order, train_blocks, valid_blocks, cfg, accelerator, tracker,
          max_steps: int, start_step: int = 0, checkpoints=None, on_eval=None) -> dict:
    tc = cfg.trainer
    schedule = make_schedule(cfg.optim, cfg.scheduler, max_steps)
    device = accelerator.device
    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
    last = {}
    mfu = MFU(accelerator.unwrap_model(model), train_blocks.block_size, device, accelerator.num_processes,
              tc.peak_flops, accelerator.mixed_precision)
    guard = StepGuard.from_config(tc, accelerator)

    # Running sums stay on the device: reading them forces a host sync, so we do it
    # only when logging, evaluating or saving (and per step for a host-side guard).
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)
    kept, tokens, t_window = 0, 0, time.perf_counter()
    # With trainer.epochs, each epoch's mean train loss and the test loss at its end.
    epoch_loss_sum = torch.zeros((), device=device)
    epoch_steps, evaluated_at = 0, None
    sized = None  # the training state's bytes per process, logged after the first update

    if tc.eval_on_start and start_step == 0:  # the untrained model's loss and samples, as step 0
        metrics = evaluate(model, valid_blocks, tc.micro_batch_size, accelerator)
        tracker.log({k: metrics[k] for k in ("eval/loss", "eval/perplexity")}, 0)
        log.info("step 0: eval/loss %.4f, perplexity %.2f", metrics["eval/loss"], metrics["eval/perplexity"])
        if on_eval is not None:
            on_eval(0)

    model.train()
    bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    for step in range(start_step, max_steps):
        t = step + 1  # the optimizer step being taken, 1-based as logged
        lr = schedule(t)
        set_lr(optimizer, lr)

        micro = order.micro_batches(step)
        everyone = order.step_batches(step)
        # This process's share of the step's denominator (targets, samples or weights): the
        # loss is Σ w·CE / (denominator of every micro-batch of every process), so k
        # micro-batches of b equal one batch of k*b, and W processes equal one.
        z = sum(loss_fn.denominator(train_blocks, ids) for ids in everyone) / accelerator.num_processes
        tokens += sum(train_blocks.n_tokens(ids) for ids in everyone)
        step_loss = torch.zeros((), device=device)
        for i, ids in enumerate(micro):
            x = train_blocks.batch(ids)  # (B, T)
            # From pinned memory the copy runs asynchronously, behind the GPU's work.
            x = (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-step.
            sync = i == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():  # the fused LM head and loss run outside the model's forward
                    loss = forward_loss(model, x, loss_fn, z)
                accelerator.backward(loss)
            step_loss += loss.detach()
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        if isinstance(norm, DTensor):  # FSDP2: the norm over every shard, as a plain tensor on each rank
            norm = norm.full_tensor()
        log_due = t % tc.log_every == 0 or t == max_steps
        # SIGTERM/SIGINT are acted on at a step boundary (with several processes, at a log step,
        # where they agree on it): log what is pending, save, return.
        stop = checkpoints is not None and checkpoints.stop_requested(log_due)
        log_due = log_due or stop
        epoch = order.epoch_at(t)
        crossed = math.floor(epoch) > math.floor(order.epoch_at(t - 1))
        eval_due = t % tc.eval_every == 0 or t == max_steps
        epoch_due = tc.epochs is not None and (crossed or t == max_steps)
        try:
            reject = guard.check(step_loss, norm, t)  # decided on the device: the host does not wait
            step_unless(optimizer, reject)  # rejected, the weights and the optimizer state stay as they were
            if accelerator.scaler is not None:  # fp16: its scale, from the overflow unscale_ found
                accelerator.scaler.update()
            loss_sum += torch.where(reject, 0.0, step_loss)
            norm_sum += torch.where(reject, 0.0, norm.detach().float())
            epoch_loss_sum += torch.where(reject, 0.0, step_loss)
            if not sized:  # gradients and moments exist now, before zero_grad
                sized = log_state_bytes(model, optimizer, accelerator.num_processes)
            # Checkpoints are saved only at log steps (save_every is a multiple of log_every).
            if log_due or eval_due or epoch_due:
                taken = guard.flush()  # the guard's one host read; it raises at a halt
                kept += taken
                epoch_steps += taken
        except TrainingHalted as e:
            bar.close()  # so the error is the last line on the console
            halt(e, checkpoints, max_steps)
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)

        if log_due:
            # Averages over the updates taken: skipped steps are left out.
            loss_avg = accelerator.reduce(loss_sum, reduction="mean").item() / kept if kept else math.nan
            elapsed = time.perf_counter() - t_window
            last = {
                "train/loss": loss_avg,
                "train/lr": lr,
                "train/grad_norm": norm_sum.item() / kept if kept else math.nan,
                "train/tokens_per_s": tokens / elapsed,
                "train/skipped_steps": guard.skipped,
            }
            last["train/mfu"] = mfu(last["train/tokens_per_s"])
            tracker.log(last, t)
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", tok_s=f"{last['train/tokens_per_s']:.0f}",
                            mfu=f"{last['train/mfu']:.1%}")
            loss_sum.zero_()
            norm_sum.zero_()
            kept, tokens, t_window = 0, 0, time.perf_counter()

        if checkpoints is not None:
            t_save = time.perf_counter()
            checkpoints.save_if_due(t, max_steps, stop)
            t_window += time.perf_counter() - t_save  # saving is not training throughput
        if eval_due:
            metrics = evaluate(model, valid_blocks, tc.micro_batch_size, accelerator)
            tracker.log({k: metrics[k] for k in ("eval/loss", "eval/perplexity")}, t)
            log.info("step %d: eval/loss %.4f, perplexity %.2f", t, metrics["eval/loss"], metrics["eval/perplexity"])
            last.update(metrics)
            eval_loss = metrics["eval/loss"]
            if checkpoints is not None:
                checkpoints.evaluated(t, max_steps, eval_loss)
            if not math.isfinite(eval_loss):
                bar.close()
                raise TrainingHalted(f"step {t}: eval/loss is {eval_loss}: the weights no longer give finite "
                                     "outputs, which skipping updates cannot repair (optim.lr too high?)", t)
            evaluated_at = t
            if on_eval is not None:
                on_eval(t)
            t_window = time.perf_counter()  # evaluation time is not training throughput

        if epoch_due:
            if evaluated_at != t:
                metrics = evaluate(model, valid_blocks, tc.micro_batch_size, accelerator)
            ep = {"epoch/epoch": math.floor(epoch) if crossed else math.ceil(epoch),
                  "epoch/train_loss": (accelerator.reduce(epoch_loss_sum, reduction="mean").item() / epoch_steps
                                       if epoch_steps else math.nan),
                  "epoch/test_loss": metrics["eval/sample_loss"]}
            tracker.log(ep, t)
            log.info("epoch %d: train loss %.4f, test loss %.4f", ep["epoch/epoch"], ep["epoch/train_loss"],
                     ep["epoch/test_loss"])
            epoch_loss_sum.zero_()
            epoch_steps = 0
            t_window = time.perf_counter()
        if stop:
            break
    bar.close()
    return last
