"""The run's checkpoint policy: when to save, what to keep, what to resume from, when to stop.

`plan_run_dir` checks the checkpoint and resume options before any work. `Checkpoints`
saves every `trainer.save_every` steps, at the end and on SIGTERM/SIGINT, keeps the newest
`trainer.keep_last` plus the best eval/loss, and on `resume=auto` (or a path) loads the
newest checkpoint that loads, moving newer ones aside as superseded. A resume on another
process count with the same global batch continues elastically.
The data loader's position is the step itself: the training order is a pure function of
(seed, optimizer step), see data/blocks.py TrainOrder, so nothing else is needed to
continue mid-epoch. What a checkpoint holds and how it is written: checkpoint_format.py.
"""
import json
import logging
import math
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from .checkpoint_format import (STATE_FILE, WEIGHT_AVERAGE, BaseMismatchError, all_true, by_model_names,
                                check_export_destination, checkpoint_dir, layout, link_copy, list_checkpoints,
                                load_checkpoint, on_every_process, remove_dir, save_checkpoint, step_of,
                                update_trainer_state)
from .lora import only_trainable
from .preemption import StopSignals
from .errors import CheckpointError, ConfigError, MissingPathError

log = logging.getLogger(__name__)

DATA_POSITION = ("the training order is a pure function of (seed, optimizer step): "
                 "resuming at step s reads exactly the blocks the uninterrupted run reads from s on")
# Settings that may change between a run and its resumption without a warning.
_FREE_TO_CHANGE = {"resume", "run_dir", "cache_dir",
                   "trainer.grad_accum"}  # derived per launch; the global batch is checked instead


def plan_run_dir(cfg):
    """Check the checkpoint and resume options before any work; return the run_dir to use."""
    tc = cfg.trainer
    if tc.save_every < 0:
        raise ConfigError(f"trainer.save_every={tc.save_every}: use a number of steps, or 0 to save only at the end")
    if tc.keep_last is not None and tc.keep_last < 1:
        raise ConfigError(f"trainer.keep_last={tc.keep_last}: keep at least 1 checkpoint, or null to keep all")
    if tc.save_every and tc.save_every % tc.log_every:
        raise ConfigError(f"trainer.save_every={tc.save_every} must be a multiple of trainer.log_every="
                          f"{tc.log_every}, so a resumed run logs train/loss over the same steps")
    run_dir = cfg.run_dir
    if cfg.resume == "auto":
        if not run_dir:
            raise ConfigError("resume=auto continues the run in run_dir: set run_dir=PATH")
    elif cfg.resume:
        ckpt = Path(cfg.resume).expanduser().absolute()
        if not ckpt.is_dir():
            raise MissingPathError(f"resume={cfg.resume}: no such checkpoint directory")
        if not run_dir:
            if ckpt.parent.name != "checkpoints":
                raise ConfigError(f"resume={cfg.resume} is not inside a run's checkpoints/: set run_dir=PATH")
            run_dir = str(ckpt.parent.parent)
    elif run_dir and list_checkpoints(Path(run_dir).expanduser()):
        raise ConfigError(f"run_dir={run_dir} already holds checkpoints: pass resume=auto to continue "
                          f"that run, or choose another run_dir")
    if run_dir:  # the end of the run replaces run_dir/final: only ever an export of its own
        try:
            check_export_destination(Path(run_dir).expanduser() / "final")
        except CheckpointError as e:
            raise ConfigError(f"run_dir={run_dir}: {e}") from None
    return run_dir


class _SharedTensorNote(logging.Filter):
    # Accelerate warns on every save that GPT-2's tied LM head is stored once; that is expected.
    def filter(self, record):
        return "Removed shared tensor" not in record.getMessage()


def _quiet_accelerate() -> None:
    """Accelerate logs each file of each save at INFO; gptlab logs one line per checkpoint."""
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(name).setLevel(logging.WARNING)
    other = logging.getLogger("accelerate.utils.other")
    if not any(isinstance(f, _SharedTensorNote) for f in other.filters):
        other.addFilter(_SharedTensorNote())


class Checkpoints:
    """When to save, what to keep, what to resume from, and when to stop, for one run.

    step_* directories are pruned to the newest `trainer.keep_last`; `checkpoints/best/`
    holds the checkpoint with the lowest eval/loss so far and is only ever replaced by a
    better one.
    """

    def __init__(self, accelerator, run_dir, cfg, model, optimizer, tokenizer, order, plan, lora_base=None, ema=None):
        self.acc, self.cfg, self.model, self.tokenizer, self.order = accelerator, cfg, model, tokenizer, order
        self.ema = ema  # ema.WeightAverage: saved beside the weights, restored on resume
        self.plan = plan  # data.blocks.BatchPlan: the global batch a checkpoint records and a resume checks
        self.optimizer = optimizer
        self.lora_base = lora_base  # {"r", "base_path", "base_sha256"} of a LoRA run, else None
        if lora_base is not None:
            accelerator.register_save_state_pre_hook(only_trainable)  # by the wrapped names, so first
        accelerator.register_save_state_pre_hook(by_model_names)
        self.root = Path(run_dir) / "checkpoints"
        self.save_every, self.keep_last = cfg.trainer.save_every, cfg.trainer.keep_last
        self.best = None  # {"step": s, "eval/loss": x}
        self.latest = None
        self.stopped = None  # the signal's name once a stop was agreed
        self.signals = StopSignals(accelerator)
        _quiet_accelerate()

    # -- the loop's hooks

    def stop_requested(self, log_step: bool) -> bool:
        """Whether any process got SIGTERM/SIGINT; every process gets the same answer."""
        if self.signals.requested(log_step):
            self.stopped = self.signals.received or "a signal to another process"
            log.warning("stop requested (%s): saving a checkpoint and stopping", self.stopped)
            return True
        return False

    def save_if_due(self, step: int, max_steps: int, stop: bool = False) -> None:
        """Save every save_every steps, at max_steps and on stop; before the step's evaluation, so
        an evaluation that fails (out of memory) loses nothing."""
        if stop or step == max_steps or (self.save_every and step % self.save_every == 0):
            self.latest = self.save(checkpoint_dir(self.root.parent, step), step, max_steps)
            self._prune()

    def evaluated(self, step: int, max_steps: int, eval_loss: float) -> None:
        """Record the step's eval/loss in the checkpoint just saved, and keep best/ the best so far."""
        improved = math.isfinite(eval_loss) and (self.best is None or eval_loss < self.best["eval/loss"])
        if improved:
            self.best = {"step": step, "eval/loss": eval_loss}
        saved = self.latest if self.latest is not None and step_of(self.latest) == step else None
        if saved is not None:
            on_every_process(self.acc, f"could not record eval/loss in {saved}", lambda: self.acc.is_main_process and
                             update_trainer_state(saved, {"eval/loss": eval_loss, "best": self.best}))
        if improved:
            if saved is None:
                self.save(self.root / "best", step, max_steps, eval_loss)
            else:
                on_every_process(self.acc, f"could not copy {saved} to {self.root / 'best'}",
                                  lambda: self.acc.is_main_process and link_copy(saved, self.root / "best"))

    def save(self, out_dir, step: int, max_steps: int, eval_loss=None) -> Path:
        state = {
            "max_steps": max_steps,
            "epoch": self.order.epoch_at(step),
            "world_size": self.acc.num_processes,
            "layout": layout(self.model),
            "data_position": {"optimizer_step": step, "seed": self.cfg.seed,
                              "global_batch": self.plan.global_batch, "micro_batch": self.plan.micro,
                              "how": DATA_POSITION},
            "eval/loss": eval_loss,
            "best": self.best,
            **({"lora": self.lora_base} if self.lora_base else {}),
        }
        out = save_checkpoint(self.acc, out_dir, step=step, model=self.model, cfg=self.cfg,
                              tokenizer=self.tokenizer, trainer_state=state,
                              tensors={WEIGHT_AVERAGE: self.ema.state_dict()} if self.ema is not None else None)
        log.info("saved checkpoint %s", out)
        return out

    def _prune(self) -> None:
        if not self.acc.is_main_process or self.keep_last is None:
            return
        for old in list_checkpoints(self.root.parent)[:-self.keep_last]:
            if not (old / STATE_FILE).is_file():  # a step_* directory gptlab did not write: not its to delete
                continue
            try:
                remove_dir(old)
            except OSError as e:
                log.warning("could not remove old checkpoint %s: %s", old, e)

    # -- resume

    def resume(self, spec) -> int:
        """Load the checkpoint `spec` names (None, "auto" or a path); return the step to start from."""
        if not spec:
            return 0
        auto = spec == "auto"
        candidates = list(reversed(list_checkpoints(self.root.parent))) if auto else [Path(spec).expanduser()]
        if not candidates:
            log.info("resume=auto: no checkpoint in %s yet, starting at step 0", self.root)
            self._supersede_after(0)
            return 0
        configured = _hyperparameters(self.optimizer)  # from this run's config, before the checkpoint's replace them
        for ckpt in candidates:
            err = None
            try:
                state = load_checkpoint(self.acc, ckpt, self.model, self.lora_base)
            except BaseMismatchError as e:
                raise CheckpointError(f"resume={spec}: {e}") from None
            except Exception as e:  # noqa: BLE001  (truncated or missing files raise many types)
                err = e
            if all_true(self.acc, err is None):
                break
            reason = err if err is not None else "it failed to load on another process"
            if not auto:
                raise CheckpointError(f"resume={spec}: cannot load {ckpt}: {reason}") from err
            log.warning("checkpoint %s failed to load (%s); falling back to the previous one", ckpt.name, reason)
        else:
            raise CheckpointError(f"resume=auto: none of the {len(candidates)} checkpoints in {self.root} "
                                  f"loads (reasons above)")
        step, self.best = state["step"], state.get("best")
        if self.ema is not None:
            self._load_weight_average(ckpt)
        self._check_global_batch(ckpt, state)
        self._check_batch_warmup(ckpt, state, step)
        # The moments are the checkpoint's; the hyperparameters (LR scales, betas, eps, weight
        # decays, momentum) this run's, as its config says: load_state_dict restored the saved ones.
        for group, values in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(values)
        self._warn_differences(ckpt, state)
        if state.get("world_size") != self.acc.num_processes:
            self._continue_elastic(ckpt, state, step)
        self._supersede_after(step)
        log.info("resumed from %s: step %d, epoch %.2f, best eval/loss %s", ckpt, step, state.get("epoch", 0.0),
                 self.best and f"{self.best['eval/loss']:.4f} at step {self.best['step']}")
        return step

    def _load_weight_average(self, ckpt) -> None:
        path = Path(ckpt) / WEIGHT_AVERAGE
        if not path.is_file():
            raise CheckpointError(f"{ckpt} holds no weight average, and this run has trainer.ema_decay="
                                  f"{self.ema.decay}: resume it with trainer.ema_decay=0, or start a new run_dir")
        try:
            self.ema.load_state_dict(load_file(str(path)))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None

    def _check_global_batch(self, ckpt, state) -> None:
        """The data order and the optimizer's trajectory continue only with the same global batch."""
        then, p = state.get("data_position", {}).get("global_batch"), self.plan
        if then is not None and then != p.global_batch:
            raise ConfigError(f"resume: {ckpt} was trained with a global batch of {then} sequences, this run's is "
                              f"{p.global_batch} (micro {p.micro} x accum {p.accum} x {p.processes} process(es)); set trainer.global_batch_size={then} to "
                              f"continue it (grad_accum is derived), or start a new run_dir for another batch")

    def _check_batch_warmup(self, ckpt, state, step: int) -> None:
        """Inside the batch warmup a step reads the first sequences of each micro batch, so
        which sequences those are depends on the micro batch size: it must stay the same."""
        then, p = state.get("data_position", {}).get("micro_batch"), self.plan
        if step < self.order.warmup_steps and then is not None and then != p.micro:
            raise ConfigError(f"resume: {ckpt} is at step {step}, inside the batch warmup (trainer.batch_warmup_steps="
                              f"{self.order.warmup_steps}), which reads the first sequences of each micro batch of "
                              f"{then}; this run's is {p.micro}: resume with trainer.micro_batch_size={then}")

    def _continue_elastic(self, ckpt, state, step: int) -> None:
        """Another process count, same global batch: same data, weights, optimizer and schedule.

        Per-process RNG streams have no counterpart on another count, and Accelerate would
        restore rank r's stream where the checkpoint has one and silently keep the fresh one
        elsewhere; every rank is re-seeded from (seed, step, rank) instead, so the run stays
        reproducible.
        """
        from accelerate.utils import set_seed

        set_seed(self.cfg.seed + 1_000_003 * step, device_specific=True)
        log.info("elastic resume: %s was written by %s process(es), this run has %d; same global batch, so the "
                 "same data order; model, optimizer and schedule restored, RNG re-seeded from (seed, step, rank)",
                 ckpt, state.get("world_size"), self.acc.num_processes)
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()):
            log.warning("dropout is on: its masks cannot match the uninterrupted run's on another process count, "
                        "so the resumed curve agrees with it statistically, not exactly; continuing")

    def _warn_differences(self, ckpt, state) -> None:
        try:
            then = _flatten(OmegaConf.to_container(OmegaConf.load(Path(ckpt) / "config.yaml"), resolve=True))
        except OSError:
            return
        now = _flatten(OmegaConf.to_container(self.cfg, resolve=True))
        changed = [k for k in sorted(set(then) | set(now)) if k not in _FREE_TO_CHANGE and then.get(k) != now.get(k)]
        applied = [f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in changed if k.startswith("optim.")]
        others = [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed if not k.startswith("optim.")]
        if applied:
            log.info("resume: this run's optimizer settings apply, the moments are the checkpoint's: %s",
                     ", ".join(applied))
        if others:
            log.warning("resuming with settings that differ from the checkpoint's: %s", "; ".join(others))

    def _supersede_after(self, step: int) -> None:
        """Checkpoints newer than the resume point belong to a history that no longer continues."""
        if not self.acc.is_main_process:
            return
        newer = [c for c in list_checkpoints(self.root.parent) if step_of(c) > step]
        best = self.root / "best"
        try:
            if json.loads((best / STATE_FILE).read_text())["step"] > step:
                newer.append(best)
        except (OSError, ValueError, KeyError):
            pass
        for c in newer:
            aside = c.with_name(c.name + ".superseded")
            remove_dir(aside)
            c.rename(aside)
            log.warning("moved %s (newer than the resume point, step %d) aside to %s", c, step, aside.name)
        # What a kill during a save or a prune left behind.
        for leftover in self.root.glob(".t*-*") if self.root.is_dir() else []:
            if leftover.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(leftover, ignore_errors=True)


def _hyperparameters(optimizer) -> list:
    """Each param group's settings but its parameters and its LR (which the loop sets every step)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out
