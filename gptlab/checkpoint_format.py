"""The checkpoint on disk: what it holds, how it is written atomically, read back and verified.

A checkpoint is a directory, `run_dir/checkpoints/step_0000100/`, holding Accelerate's
state (`model.safetensors`, `optimizer.bin`, `random_states_<rank>.pkl` for every
process, `scaler.pt` under fp16), the resolved `config.yaml`, the tokenizer's files, the
model's `config.json` and `generation_config.json`, and `trainer_state.json` (step, epoch,
best eval/loss, file sizes, layout). As in a Trainer's `checkpoint-N/`, the weights are
stored by the model's own parameter names, so `AutoModelForCausalLM.from_pretrained(ckpt)`
and `AutoTokenizer.from_pretrained(ckpt)` load it as it is. Under FSDP the layout is "sharded": the weights and optimizer state are
torch.distributed.checkpoint directories (`pytorch_model_fsdp_0/`, `optimizer_0/`) with one
file per process, each written by its own process; no process gathers the model.
With LoRA (model.lora.r > 0) `model.safetensors` and `optimizer.bin` hold the adapters
and their optimizer state only, and there is no `config.json` (a base without its weights
would load as random); `trainer_state.json` names the frozen base by path and hash (see
lora.py), and a resume against other base weights is refused. Sharded and LoRA
checkpoints become plain models with `python -m gptlab.export`.

A directory appears under its final name only once it is complete and on disk, and is
removed by renaming it first, so a kill at any moment never leaves one that looks valid.
When to save, what to keep and what to resume from is the run's policy: checkpoint.py.
"""
import json
import logging
import os
from collections import OrderedDict
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from .distributed import is_sharded
from .lora import is_peft, merged_copy, trainable_names
from .errors import CheckpointError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# 2: config and tokenizer files at the top, weights by the model's own names; 1 kept them in
# hf_config/ and tokenizer/, and its weights by the names of the launch's wrapper.
FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d+)$")


class BaseMismatchError(CheckpointError):
    """A LoRA checkpoint and this run disagree on the frozen base model: no older checkpoint can help."""


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir) -> list:
    """The run's step_* directories, oldest first. Temporary and superseded ones never match."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(ckpt) -> int:
    """The step of a step_* directory."""
    return int(_STEP_DIR.match(Path(ckpt).name).group(1))


# ---------------------------------------------------------------------------- save

WEIGHT_AVERAGE = "weight_average.safetensors"  # ema.WeightAverage, by parameter name


def save_checkpoint(accelerator, out_dir, *, step: int, model, cfg, tokenizer, trainer_state=None,
                    tensors=None) -> Path:
    """Write a complete checkpoint to `out_dir` atomically; every process must call it.
    `tensors` ({file name: {name: tensor}}) are written beside the weights, as safetensors.

    Everything goes to a temporary sibling that is renamed to `out_dir` only when it is
    complete and on disk, so a kill at any moment leaves the earlier checkpoints and never
    a directory that looks valid. A failed write (disk full, read-only) removes the
    temporary directory and raises CheckpointError on every process.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    main = accelerator.is_main_process
    what = f"could not save checkpoint {out_dir} (earlier checkpoints are untouched)"

    def start():
        if main:
            remove_dir(tmp)
            tmp.mkdir(parents=True)

    def finish():
        if not main:
            return
        OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
        for name, values in (tensors or {}).items():
            save_file(values, str(tmp / name))
        tokenizer.save_pretrained(str(tmp))
        unwrapped = accelerator.unwrap_model(model)
        if not is_peft(unwrapped):
            unwrapped.config.save_pretrained(str(tmp))
            unwrapped.generation_config.save_pretrained(str(tmp))
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        state = {"format": FORMAT_VERSION, "step": step, **(trainer_state or {}), "files": files,
                 "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # Written last: a directory without it is never a checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        _fsync_tree(tmp)
        _replace_dir(tmp, out_dir)

    try:
        on_every_process(accelerator, what, start)
        on_every_process(accelerator, what, lambda: accelerator.save_state(str(tmp), safe_serialization=True))
        on_every_process(accelerator, what, finish)
    except CheckpointError:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


EXPORT_MARKER = "gptlab_export.json"  # in every export gptlab writes: the only kind of directory it replaces


def check_export_destination(out_dir) -> None:
    """An export goes where nothing is, into an empty directory, or over an export gptlab wrote:
    never over anything else (a typo such as OUT=outputs or OUT=~ must not wipe it)."""
    out = Path(out_dir).expanduser()
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a directory to export into")
    if (out / EXPORT_MARKER).is_file() or not any(out.iterdir()):
        return
    raise CheckpointError(f"{out} exists and is not an export gptlab wrote (it has no {EXPORT_MARKER}): refusing to "
                          f"replace it; give a new or empty directory")


def export_hf(model, tokenizer, out_dir: Path) -> Path:
    """save_pretrained (safetensors) plus the tokenizer, loadable by from_pretrained and pipeline().

    LoRA adapters are merged into the weights (of a copy), so the export needs no peft.
    Written to a temporary directory and renamed, like a checkpoint; it replaces only an
    empty directory or an earlier export (check_export_destination).
    """
    out_dir = Path(out_dir).expanduser()
    check_export_destination(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    remove_dir(tmp)
    (merged_copy(model) if is_peft(model) else model).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "gptlab", "at": datetime.now(timezone.utc).isoformat(
        timespec="seconds")}) + "\n")
    _fsync_tree(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def update_trainer_state(ckpt, values: dict) -> None:
    """Add `values` to a complete checkpoint's trainer_state.json, replacing the file atomically."""
    path = Path(ckpt) / STATE_FILE
    tmp = path.with_name(f".tmp-{STATE_FILE}")
    tmp.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=1) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------- load

def read_trainer_state(ckpt) -> dict:
    """trainer_state.json, after checking that every file it lists is there at its recorded size."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no {STATE_FILE}, so it is not a complete checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable: {e}") from e
    for rel, size in state.get("files", {}).items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: {rel} has {path.stat().st_size} bytes instead of {size} (truncated?)")
    return state


def layout(model) -> str:
    return "sharded" if is_sharded(model) else "full"


def check_lora_base(ckpt, state: dict, lora_base) -> None:
    """A LoRA checkpoint resumes only onto the base it was trained on, and only as LoRA."""
    saved = state.get("lora")
    if saved is None and lora_base is None:
        return
    if saved is None or lora_base is None:
        raise BaseMismatchError(f"{ckpt} {'holds LoRA adapters only' if saved else 'holds a full model'}, but "
                                f"this run has model.lora.r={'0' if saved else lora_base['r']}: resume it with "
                                f"the same model.lora settings")
    if saved["base_sha256"] != lora_base["base_sha256"]:
        raise BaseMismatchError(f"{ckpt} holds LoRA adapters for the base model {saved['base_path']} "
                                f"(weights sha256 {saved['base_sha256'][:12]}), but this run's base "
                                f"{lora_base['base_path']} hashes to {lora_base['base_sha256'][:12]}: resume "
                                f"with the same model.pretrained_path (and unchanged weights)")


def load_checkpoint(accelerator, ckpt, model=None, lora_base=None) -> dict:
    """Restore model, optimizer, scaler and this process's RNG states; return trainer_state.json.

    With LoRA (`lora_base`, this run's base reference, and the prepared `model`) only the
    adapters are read: the frozen base weights are already in place and must be the checkpoint's.
    """
    state = read_trainer_state(ckpt)
    have, want = state.get("layout", "full"), layout(model)
    if have != want:
        raise CheckpointError(f"{ckpt} holds {have} weights and this run is {want} ("
                              f"{'an FSDP launch' if want == 'sharded' else 'not FSDP'}): resume it with the launch "
                              f"that wrote it, or export it (python -m gptlab.export) and fine-tune from there")
    check_lora_base(ckpt, state, lora_base)
    if state.get("world_size") == accelerator.num_processes:
        from accelerate.utils import load
        # Accelerate only logs a failed RNG restore, and an exact resume needs it: fail here instead.
        load(Path(ckpt) / f"random_states_{accelerator.process_index}.pkl")  # weights_only=True
    if have == "sharded":
        accelerator.load_state(str(ckpt))  # torch.distributed.checkpoint, each process its own shards
        return state
    # By the model's own names, into the unwrapped model: a checkpoint written under DDP resumes
    # on one process too (format 1 stored DDP's "module." names).
    weights = {strip_wrappers(k): v for k, v in load_file(str(Path(ckpt) / "model.safetensors")).items()}
    inner = accelerator.unwrap_model(model)
    if lora_base is None:
        load_weights(inner, weights, ckpt)
    else:  # the frozen base is already in place and is the checkpoint's: only the adapters are read
        load_adapters(inner, weights, ckpt)
    # Then the optimizer, RNG states and scaler (torch.load, weights_only=True); the weights are in.
    skip_weights = accelerator.register_load_state_pre_hook(lambda models, _input_dir: models.clear())
    try:
        accelerator.load_state(str(ckpt))
    finally:
        skip_weights.remove()
    return state


def load_adapters(model, adapters: dict, ckpt) -> None:
    """A checkpoint's LoRA adapters into `model` (its base already in place), if they are the
    adapters its model.lora settings make."""
    expected = set(trainable_names(model))
    if set(adapters) != expected:
        raise CheckpointError(f"{ckpt}: its adapters do not match the model.lora settings: missing "
                              f"{sorted(expected - set(adapters))[:3]}, "
                              f"unexpected {sorted(set(adapters) - expected)[:3]}")
    model.load_state_dict(adapters, strict=False)


def load_weights(model, weights: dict, ckpt) -> None:
    """A full state dict into `model`, by name; tied weights (GPT-2's LM head is the token
    embedding) are stored once, and anything else missing or unexpected is an error."""
    params = model.state_dict()
    unexpected = sorted(set(weights) - set(params))
    loaded = {params[k].data_ptr() for k in weights if k in params}
    missing = sorted(k for k in set(params) - set(weights) if params[k].data_ptr() not in loaded)
    if unexpected or missing:
        raise CheckpointError(f"{ckpt}: the weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict(weights, strict=False)


def part_dir(ckpt, name: str) -> Path:
    """Where a checkpoint keeps the model config (name "hf_config") or the tokenizer ("tokenizer"):
    at its top, or in that subdirectory for format 1."""
    return Path(ckpt) / name if (Path(ckpt) / name).is_dir() else Path(ckpt)


def by_model_names(_models, weights, _output_dir) -> None:
    """accelerate save_state pre-hook: store the weights by the model's own parameter names (DDP's
    "module." dropped), the names from_pretrained and every other reader look for."""
    for i, state in enumerate(weights):  # an OrderedDict, which accelerate de-duplicates (tied weights)
        weights[i] = OrderedDict((strip_wrappers(k), v) for k, v in state.items())


def strip_wrappers(key: str) -> str:
    # Accelerate saves the prepared model: DDP adds "module.", torch.compile "_orig_mod.".
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def find_checkpoint(path) -> Path:
    """A checkpoint directory, or the latest complete checkpoint of a run directory."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    if path.name == "checkpoints":
        path = path.parent
    for ckpt in reversed(list_checkpoints(path)):
        try:
            read_trainer_state(ckpt)
            return ckpt
        except CheckpointError as e:
            log.warning("skipping %s", e)
    raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with a complete checkpoint")


# ---------------------------------------------------------------------------- across processes

def all_true(accelerator, ok: bool) -> bool:
    """Whether `ok` holds on every process; every process gets the same answer."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([float(ok)], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes


def on_every_process(accelerator, what: str, fn) -> None:
    """Run fn here; if it failed on any process, raise CheckpointError on all of them (none hangs)."""
    err = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (reported with its message below)
        err = e
    if not all_true(accelerator, err is None):
        raise CheckpointError(f"{what}: {err if err is not None else 'failed on another process'}") from err


# ---------------------------------------------------------------------------- atomic files

def link_copy(src: Path, dst: Path) -> None:
    """dst becomes a copy of src made of hard links (no extra disk), replaced atomically."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    remove_dir(tmp)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:  # a filesystem without hard links
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    _fsync_tree(tmp)
    _replace_dir(tmp, dst)


def _replace_dir(tmp: Path, dst: Path) -> None:
    if dst.exists():
        trash = dst.with_name(f".trash-{dst.name}")
        remove_dir(trash)
        dst.rename(trash)
        tmp.rename(dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(dst)
    _fsync_dir(dst.parent)


def remove_dir(path: Path) -> None:
    """Delete a directory by renaming it first, so a kill half-way never leaves a partial copy of its name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}")
    if trash != path:
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
    shutil.rmtree(trash)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(p)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

