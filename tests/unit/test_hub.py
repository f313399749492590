"""Hub ids resolve at start-up, completely or with an error naming what is missing (issue 18, item 7).

The caches here are built in the Hugging Face cache layout (``models--org--name/snapshots/<sha>``,
``refs/main``); downloads are replaced by a fake that serves files from a local "remote" directory and
records what was asked, so the tests see exactly which files a resolution fetches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qtsplus_vllm import hub
from qtsplus_vllm.checkpoint import INDEX_FILE, CheckpointReader, load_config, validate_checkpoint
from qtsplus_vllm.config import CheckpointError
from qtsplus_vllm.hub import download_dir_from_argv, resolve_hub_checkpoint
from qtsplus_vllm.testing import write_tiny_checkpoint

REPO = "org/qtsplus-tiny"
SHA = "0123456789abcdef0123456789abcdef01234567"
LM_SHARD, RUNTIME_SHARD = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    """A checkpoint whose LM layers sit in one shard and everything the runtime reads in another."""
    root = tmp_path_factory.mktemp("hub-remote")
    single = write_tiny_checkpoint(root / "single", seed=8)
    tensors = load_file(single / "model.safetensors")
    out = root / "sharded"
    shutil.copytree(single, out)
    (out / "model.safetensors").unlink()
    lm = {k: v for k, v in tensors.items() if k.startswith("model.layers.") or k == "lm_head.weight"}
    rest = {k: v for k, v in tensors.items() if k not in lm}
    save_file(lm, str(out / LM_SHARD), metadata={"format": "pt"})
    save_file(rest, str(out / RUNTIME_SHARD), metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(lm, LM_SHARD), **dict.fromkeys(rest, RUNTIME_SHARD)}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _snapshot(cache: Path, remote: Path, names) -> Path:
    base = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = base / "snapshots" / SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(remote / name, snapshot / name)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(SHA)
    return snapshot


def _metadata_names(remote: Path) -> list[str]:
    return [p.name for p in remote.iterdir() if p.suffix in (".json", ".jinja", ".txt")]


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """An empty default cache, offline; ``fetched`` records every download of the fake Hub."""
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _online(monkeypatch, remote: Path, default_cache: Path) -> list[str]:
    """Downloads served from ``remote`` into the cache given (or the default one); returns the log."""
    import huggingface_hub

    fetched: list[str] = []
    real_hf_hub_download = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def snapshot_download(
        repo_id, revision=None, allow_patterns=None, cache_dir=None, local_files_only=False
    ):
        assert repo_id == REPO and not local_files_only
        names = _metadata_names(remote)
        fetched.extend(names)
        return str(_snapshot(Path(cache_dir or default_cache), remote, names))

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, local_files_only=False):
        if local_files_only:
            return real_hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        if not (remote / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} is not in {repo_id}")
        fetched.append(filename)
        return str(_snapshot(Path(cache_dir or default_cache), remote, [filename]) / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return fetched


def _check_loadable(path: Path) -> None:
    reader = CheckpointReader(path)
    validate_checkpoint(load_config(path), reader)
    reader.load([hub.EMBED_KEY])  # what the runtime reads besides the ViT and selector


def test_online_fetches_only_the_shards_with_runtime_tensors(monkeypatch, hub_env, remote):
    fetched = _online(monkeypatch, remote, hub_env)
    path = resolve_hub_checkpoint(REPO)
    assert RUNTIME_SHARD in fetched and LM_SHARD not in fetched  # never every LM shard
    assert not (path / LM_SHARD).exists()
    _check_loadable(path)
    index = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    assert set(index.values()) == {RUNTIME_SHARD}


def test_offline_complete_snapshot_is_used_as_it_is(hub_env, remote):
    snapshot = _snapshot(hub_env, remote, [p.name for p in remote.iterdir()])
    assert resolve_hub_checkpoint(REPO) == snapshot
    _check_loadable(snapshot)


def test_offline_partial_snapshot_with_the_runtime_shard_works(hub_env, remote):
    """vLLM's engine may still be fetching LM shards: the runtime needs only its own."""
    _snapshot(hub_env, remote, [*_metadata_names(remote), RUNTIME_SHARD])
    path = resolve_hub_checkpoint(REPO)
    _check_loadable(path)


def test_offline_snapshot_without_weights_names_the_missing_shard(hub_env, remote):
    """Config and tokenizer cached (what vLLM fetches first), no weights: a start-up error, not a 400 per request."""
    _snapshot(hub_env, remote, _metadata_names(remote))
    with pytest.raises(CheckpointError, match=f"HF_HUB_OFFLINE.*{RUNTIME_SHARD}"):
        resolve_hub_checkpoint(REPO)


def test_offline_without_any_snapshot_is_a_clear_error(hub_env):
    with pytest.raises(CheckpointError, match=f"{REPO}.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_hub_checkpoint(REPO)


def test_download_dir_holds_the_weights_and_the_default_cache_the_config(hub_env, remote, tmp_path):
    """``--download-dir``: vLLM puts weights there, while config and tokenizer sit in the default cache."""
    download_dir = tmp_path / "download-dir"
    _snapshot(hub_env, remote, _metadata_names(remote))
    _snapshot(download_dir, remote, [INDEX_FILE, RUNTIME_SHARD, LM_SHARD])
    path = resolve_hub_checkpoint(REPO, download_dir=str(download_dir))
    _check_loadable(path)
    assert (path / RUNTIME_SHARD).resolve().is_relative_to(download_dir.resolve())


def test_online_downloads_go_to_the_download_dir(monkeypatch, hub_env, remote, tmp_path):
    download_dir = tmp_path / "download-dir"
    _online(monkeypatch, remote, hub_env)
    path = resolve_hub_checkpoint(REPO, download_dir=str(download_dir))
    _check_loadable(path)
    assert (path / RUNTIME_SHARD).resolve().is_relative_to(download_dir.resolve())


def test_an_unsharded_bin_checkpoint_is_fetched_whole(monkeypatch, hub_env, tmp_path):
    remote = write_tiny_checkpoint(tmp_path / "bin-remote", seed=8, weight_format="bin")
    fetched = _online(monkeypatch, remote, hub_env)
    path = resolve_hub_checkpoint(REPO)
    assert "pytorch_model.bin" in fetched
    _check_loadable(path)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../../outside.safetensors", "sub/../../x.safetensors"])
def test_an_index_naming_files_outside_the_checkpoint_is_refused(hub_env, remote, tmp_path, shard):
    hostile = tmp_path / "hostile"
    shutil.copytree(remote, hostile)
    index = json.loads((hostile / INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (hostile / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        CheckpointReader(hostile)
    _snapshot(hub_env, hostile, [p.name for p in hostile.iterdir()])
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        resolve_hub_checkpoint(REPO)


def test_a_fifo_named_by_an_index_is_never_opened(remote, tmp_path):
    import os

    hostile = tmp_path / "fifo"
    shutil.copytree(remote, hostile)
    (hostile / RUNTIME_SHARD).unlink()
    os.mkfifo(hostile / RUNTIME_SHARD)  # opening it would block for ever
    with pytest.raises(CheckpointError, match="do not exist"):
        CheckpointReader(hostile)


def test_download_dir_is_read_from_the_command_line():
    assert download_dir_from_argv(["vllm", "serve", "m", "--download-dir", "/d"]) == "/d"
    assert download_dir_from_argv(["vllm", "serve", "m", "--download-dir=/e"]) == "/e"
    assert download_dir_from_argv(["vllm", "serve", "m"]) is None
