"""Hub ids for models, tokenizers and datasets, resolved the Hugging Face way.

A value such as `model.pretrained_path` is a local directory or a Hub id (`org/name`).
An id goes through `huggingface_hub.snapshot_download`, the download `from_pretrained`
does file by file, so through the HF cache (`HF_HOME`, `HF_HUB_CACHE`) and
`HF_HUB_OFFLINE`; what is cached is not downloaded again. The result is a local snapshot
directory and its commit hash, which `from_pretrained` and `load_dataset` then read.
Datasets go the same way because `load_dataset("org/name")` in datasets 5.2, offline,
never looks in the hub cache: it only finds datasets it has already converted to Arrow. A run pins every id to that commit before step
1 (see `pin_hub_ids`), and the pinned config is what the run directory and every
checkpoint store, so a resume or an evaluate reads the same files.
"""
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import MissingPathError

log = logging.getLogger(__name__)

# org/name, or a bare canonical name such as gpt2; the Hub's own rules, a little looser.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Weights for other frameworks that torch never reads: not worth downloading.
NOT_TORCH = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "onnx/*", "*.tflite", "*.gguf", "coreml/*",
             "flax_model*", "tf_model*", "rust_model*", "*.mlmodel"]
SAFETENSORS_ONLY = ["pytorch_model*.bin"]
WEIGHTS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt"]
STALE_MARKER_S = 24 * 3600


class HubError(MissingPathError):
    """A Hub id that cannot be resolved: not reachable and not cached, unknown, or gated."""


@dataclass(frozen=True)
class Snapshot:
    path: Optional[Path]  # a local directory: the user's own, or a snapshot in the HF cache; None: streamed
    repo_id: Optional[str] = None  # None for a local directory
    commit: Optional[str] = None


def is_hub_id(value) -> bool:
    """A value that names no local path but has the shape of a Hub id."""
    return bool(value) and not Path(str(value)).expanduser().exists() and bool(HUB_ID.match(str(value)))


def is_commit(revision) -> bool:
    return bool(revision) and bool(COMMIT.match(str(revision)))


def hub_cache() -> Path:
    """The HF hub cache as the environment names it now.

    huggingface_hub reads HF_HOME and HF_HUB_CACHE once, at import; reading them per call
    (and passing cache_dir) gives the same answer for a launched run and lets a test point
    a process at a temporary cache.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(value: str, revision: Optional[str] = None, *, key: str, repo_type: str = "model",
            weights: bool = True, download: bool = True) -> Snapshot:
    """A local directory as it is, or the cached (else downloaded) snapshot of a Hub id.

    weights=False (a tokenizer) leaves a model repo's weight files out of the download.
    download=False (a streamed dataset) only pins the revision to its commit: nothing is
    downloaded, and the data is read over the network as it is used. Offline it is the cached
    snapshot, streamed from disk, as for any id.
    """
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return Snapshot(path.absolute())
    if not HUB_ID.match(str(value)):
        raise MissingPathError(f"{key}={value}: no such directory (and not a Hub id such as org/name)")
    if not download and not offline():
        return Snapshot(None, str(value), _remote_commit(value, revision, key, repo_type))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.file_download import repo_folder_name

    cache = hub_cache()
    at = f"@{revision}" if revision else ""
    # A pinned commit already in the cache needs no Hub call at all (every rank after the pin).
    folder = cache / repo_folder_name(repo_id=value, repo_type=repo_type)
    cached = is_commit(revision) and (folder / "snapshots" / revision).is_dir()
    skip = None
    if repo_type == "model" and not weights:
        skip = NOT_TORCH + WEIGHTS
    elif repo_type == "model":
        # From the cache, the completeness check must not ask for the .bin copies a download skipped.
        skip = NOT_TORCH + SAFETENSORS_ONLY if cached or offline() else _skip_weights(value, revision, cache)
    fetch = f"hf download {value}" + (f" --revision {revision}" if revision else "") + (
        f" --repo-type {repo_type}" if repo_type != "model" else "")
    try:
        folder = Path(snapshot_download(value, repo_type=repo_type, revision=revision, cache_dir=str(cache),
                                        ignore_patterns=skip, local_files_only=cached))
    except IncompleteSnapshotError as e:
        raise HubError(f"{key}={value}{at}: the snapshot in {e.snapshot_path} is incomplete (an interrupted "
                       f"download?); on a machine with a network run `{fetch}`") from None
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE=1" if offline() else "no network"
        raise HubError(f"{key}={value}{at}: the Hugging Face Hub is not reachable ({how}) and the id is not in "
                       f"the local cache {cache}; on a machine with a network run `{fetch}` (with HF_HOME set "
                       f"as here), or pass a local directory") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise HubError(f"{key}={value}{at}: {type(e).__name__} on the Hugging Face Hub (a typo, a private or "
                       f"gated {repo_type}: `hf auth login`); or pass a local directory") from None
    return Snapshot(folder, str(value), folder.name)


def _remote_commit(repo_id: str, revision: Optional[str], key: str, repo_type: str) -> str:
    if is_commit(revision):
        return revision
    at = f"@{revision}" if revision else ""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise HubError(f"{key}={repo_id}{at}: {type(e).__name__} on the Hugging Face Hub (a typo, a private or "
                       f"gated {repo_type}: `hf auth login`)") from None
    except OSError as e:  # no network
        raise HubError(f"{key}={repo_id}{at}: the Hugging Face Hub is not reachable ({e}); data.streaming=true "
                       f"needs it") from None


def _skip_weights(repo_id: str, revision: Optional[str], cache: Path) -> List[str]:
    """What not to download: other frameworks' weights, and the .bin copies when there are safetensors
    (from_pretrained reads the safetensors; many repos hold both, doubling the download)."""
    from huggingface_hub import snapshot_download

    try:
        files = [f.filename for f in snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                                       ignore_patterns=NOT_TORCH, dry_run=True)]
    except Exception:  # noqa: BLE001  (the download itself reports what is wrong)
        return NOT_TORCH
    return NOT_TORCH + (SAFETENSORS_ONLY if any(f.endswith(".safetensors") for f in files) else [])


# ------------------------------------------------------------------ pinning a run's ids

# (the value's key, its revision's key, the repo type); the model first, so a tokenizer
# from the same repo finds it in the cache.
REFS = (("model.pretrained_path", "model.revision", "model"),
        ("tokenizer.path", "tokenizer.revision", "model"),
        ("data.builder", "data.revision", "dataset"),
        ("data.valid_builder", "data.valid_revision", "dataset"))


def hub_refs(cfg, datasets: bool) -> List[Tuple[str, str, str]]:
    """The REFS whose value is a Hub id the run reads; the data's only if it reads dataset repos."""
    from omegaconf import OmegaConf

    return [ref for ref in REFS if is_hub_id(OmegaConf.select(cfg, ref[0], default=None))
            and (datasets or not ref[0].startswith("data."))]


def pin_hub_ids(cfg, accelerator, cache_root: Path, datasets: bool, previous=None, stream: bool = False) -> None:
    """Resolve every Hub id in `cfg` and set its revision to the snapshot's commit.

    The local main process of each machine downloads what is missing (with the Hub's
    progress bars); the others wait for it by polling, as for the token cache, so a long
    download cannot hit the process group's timeout. `previous` is the config an earlier
    launch of this run saved: an id it pinned keeps that commit, so a resume reads the
    same files even if the branch moved since.
    """
    from omegaconf import OmegaConf

    from .data.cache import build_once, read_meta

    refs = hub_refs(cfg, datasets)
    if not refs:
        return
    for key, rev_key, _ in refs:
        same = previous is not None and OmegaConf.select(previous, key, default=None) == OmegaConf.select(cfg, key)
        if same and OmegaConf.select(cfg, rev_key) is None:
            OmegaConf.update(cfg, rev_key, OmegaConf.select(previous, rev_key, default=None))
    launch = [f"{time.time_ns()}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(launch)

    def fetch(tmp: Path) -> dict:
        _remove_stale_markers(tmp.parent)
        commits, seen = {}, {}
        for key, rev_key, kind in refs:
            value, revision = OmegaConf.select(cfg, key), OmegaConf.select(cfg, rev_key)
            if (kind, value, revision) not in seen:  # a model's own tokenizer: one look-up
                seen[kind, value, revision] = resolve(value, revision, key=key, repo_type=kind,
                                                      weights=key != "tokenizer.path",
                                                      download=not (stream and kind == "dataset")).commit
            commits[key] = seen[kind, value, revision]
        return commits

    marker = build_once(Path(cache_root) / "hub" / f"{launch[0]}-{socket.gethostname()}", fetch,
                        accelerator.is_local_main_process)
    commits = read_meta(marker)
    for key, rev_key, _ in refs:
        OmegaConf.update(cfg, rev_key, commits[key])
        log.info("%s=%s: snapshot %s (from %s)", key, OmegaConf.select(cfg, key), commits[key], hub_cache())


def _remove_stale_markers(root: Path) -> None:
    # A launch's marker is read within moments of being written; a day later nobody waits for it.
    # Only markers (<launch time in ns>-<host>, as pin_hub_ids names them): cache_dir may be shared.
    for marker in root.iterdir():
        if not re.match(r"^\d{19}-", marker.name):
            continue
        try:
            if time.time() - marker.stat().st_mtime > STALE_MARKER_S:
                shutil.rmtree(marker, ignore_errors=True)
        except FileNotFoundError:  # another launch removed it first
            pass
