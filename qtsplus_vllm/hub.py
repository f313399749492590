"""A Hugging Face Hub id -> a local checkpoint directory with what the selection runtime reads.

The API server's selection runtime needs config.json, the tokenizer files and only some tensors: the
vision tower, the selector, the optional projector and the token embeddings. vLLM's engine fetches
the LM weights itself (to ``--download-dir`` when given, else the Hugging Face cache). This module
resolves a repo id once, when the server starts:

1. the small files (``*.json``, ``*.jinja``, ``*.txt``) from the local cache, or from the Hub
   unless ``HF_HUB_OFFLINE`` is set;
2. the weight index, which says which shards hold the tensors above, and only those shards (or the
   single weight file of an unsharded checkpoint) — never every LM shard;
3. a missing file is an error naming it (offline, or a partial snapshot), raised at start-up.

When the snapshot holds every shard its index names, it is used as it is; otherwise (some LM shards
not fetched, or files split between ``--download-dir`` and the default cache) a private directory of
symbolic links is made with an index that lists only the fetched shards' tensors, so a reader never
looks for the absent ones. The caller resolves once per process (``runtime.resolve_model_dir``): a request never downloads.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from .config import PROJECTOR_KEY, SELECTOR_PREFIX, VISION_PREFIX, CheckpointError
from .layout import check_shard_name

logger = logging.getLogger(__name__)

EMBED_KEY = "model.embed_tokens.weight"
# What the selection runtime reads from a checkpoint
RUNTIME_PREFIXES = (VISION_PREFIX, SELECTOR_PREFIX, PROJECTOR_KEY, EMBED_KEY)
METADATA_PATTERNS = ["*.json", "*.jinja", "*.txt"]
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # safetensors first, as vLLM
SINGLES = ("model.safetensors", "pytorch_model.bin")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_dir_from_argv(argv: list[str] | None = None) -> str | None:
    """``--download-dir`` of the ``vllm serve`` command line (API-server processes inherit it).

    The multimodal processor is given the model config only, which does not carry the load config.
    """
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        for flag in ("--download-dir", "--download_dir"):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def _cache(cache: str | None) -> dict[str, str]:
    """``cache_dir`` for huggingface_hub, only when one is set (else its own default, read per call)."""
    return {"cache_dir": cache} if cache else {}


def _local_file(repo: str, name: str, revision: str | None, caches: list[str | None]) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for cache in caches:
        try:
            return Path(
                hf_hub_download(repo, name, revision=revision, local_files_only=True, **_cache(cache))
            )
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError, OSError):
            continue
    return None


def _metadata_snapshot(repo: str, revision: str | None, caches: list[str | None]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not offline():
        # one listing of the repo, then only the small files this cache lacks
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=METADATA_PATTERNS, **_cache(caches[0]))
        )
    for cache in caches:
        try:
            path = Path(
                snapshot_download(
                    repo,
                    revision=revision,
                    allow_patterns=METADATA_PATTERNS,
                    local_files_only=True,
                    **_cache(cache),
                )
            )
        except LocalEntryNotFoundError:
            continue
        if (path / "config.json").is_file():
            return path
    where = ", ".join(str(c) if c else "the Hugging Face cache" for c in caches)
    raise CheckpointError(
        f"{repo} (revision {revision or 'main'}) is not in {where} with a config.json, and HF_HUB_OFFLINE "
        "is set: download the checkpoint first (huggingface-cli download) or serve a local directory"
    )


def _needed_files(repo: str, snapshot: Path) -> tuple[list[str], dict[str, str] | None, str | None]:
    """(weight files the runtime needs, the index's weight_map or None, the index's name or None)."""
    for index in INDEXES:
        if (snapshot / index).is_file():
            try:
                weight_map = json.loads((snapshot / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{repo}: {index} is not a weight index: {err!r}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{repo}: {index} has a weight_map that is not an object")
            for name in set(weight_map.values()):
                check_shard_name(Path(repo) / index, name)
            needed = sorted({f for k, f in weight_map.items() if k.startswith(RUNTIME_PREFIXES)})
            missing = [
                p
                for p in (VISION_PREFIX, SELECTOR_PREFIX, EMBED_KEY)
                if not any(k.startswith(p) for k in weight_map)
            ]
            if missing:
                raise CheckpointError(
                    f"{repo}: {index} lists no tensors under {missing}: not a QTSplus checkpoint"
                )
            return needed, weight_map, index
    return [], None, None


def _fetch(repo: str, name: str, revision: str | None, caches: list[str | None]) -> Path | None:
    found = _local_file(repo, name, revision, caches)
    if found is not None or offline():
        return found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        logger.info("QTSplus: fetching %s of %s for the ViT and selector", name, repo)
        return Path(hf_hub_download(repo, name, revision=revision, **_cache(caches[0])))
    except EntryNotFoundError:
        return None


def _linked_directory(
    snapshot: Path, files: dict[str, Path], index: str | None, weight_map: dict | None
) -> Path:
    """A private directory: links to the snapshot's small files and to ``files``, and a reduced index."""
    out = Path(tempfile.mkdtemp(prefix="qtsplus-checkpoint-"))
    atexit.register(shutil.rmtree, out, True)
    for item in snapshot.iterdir():
        if item.is_file() and item.suffix in (".json", ".jinja", ".txt") and item.name not in INDEXES:
            (out / item.name).symlink_to(item.resolve())
    for name, path in files.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())
    if index is not None and weight_map is not None:
        kept = {k: f for k, f in weight_map.items() if f in files}
        (out / index).write_text(json.dumps({"metadata": {}, "weight_map": kept}))
    return out


def resolve_hub_checkpoint(repo: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local directory holding what the selection runtime reads for Hub id ``repo`` (module docstring).

    Raises :class:`~qtsplus_vllm.config.CheckpointError` naming what is missing, or what the Hub said.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return _resolve(repo, revision, download_dir)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot resolve the checkpoint {repo!r} (revision {revision or 'main'}) for the ViT and selector: "
            f"{type(err).__name__}: {reason}. Check the id and the network, or serve a local directory"
        ) from err


def _resolve(repo: str, revision: str | None, download_dir: str | None) -> Path:
    caches = [download_dir, None] if download_dir else [None]
    snapshot = _metadata_snapshot(repo, revision, caches)
    needed, weight_map, index = _needed_files(repo, snapshot)
    files: dict[str, Path] = {}
    missing: list[str] = []
    if weight_map is None:  # one weight file: safetensors wins, as in vLLM
        for single in SINGLES:
            path = _fetch(repo, single, revision, caches)
            if path is not None:
                files[single] = path
                break
        else:
            missing.append(" or ".join(SINGLES) + " (or a weight index)")
    else:
        for name in needed:
            path = _fetch(repo, name, revision, caches)
            if path is None:
                missing.append(name)
            else:
                files[name] = path
    if missing:
        hint = " (HF_HUB_OFFLINE is set)" if offline() else ""
        raise CheckpointError(
            f"{repo} (revision {revision or 'main'}): the files that hold the ViT and selector tensors "
            f"are missing{hint}: {missing}; download the whole checkpoint or serve a local directory"
        )
    complete = all((snapshot / name).is_file() for name in files) and (
        weight_map is None or all((snapshot / f).is_file() for f in set(weight_map.values()))
    )
    return snapshot if complete else _linked_directory(snapshot, files, index, weight_map)
