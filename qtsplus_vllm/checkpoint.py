"""Reading QTSplus checkpoints by key prefix: safetensors or ``torch.save`` pickles, single or sharded.

Only the tensors asked for are read, so the vision tower and selector can be loaded without touching
the multi-GB LM weights: safetensors files are memory-mapped by safetensors, ``pytorch_model*.bin``
files (what the reference trainer's ``torch.save`` writes) by ``torch.load(mmap=True)``.

``.bin`` files are pickles. They are read with ``weights_only=True``, torch's restricted unpickler:
tensors, dicts, lists and plain numbers only, never a class or a function named by the file, so a
checkpoint cannot run code here; one that needs more is refused with :class:`CheckpointError`.
When a directory holds both formats, safetensors wins (as in vLLM's loader).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .config import (
    PROJECTOR_KEY,
    SELECTOR_PREFIX,
    VISION_PREFIX,
    CheckpointError,
    QTSplusConfig,
    resolve_vision_config,
)
from .layout import check_shard_name, peft_error, peft_tensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
# (file that marks the layout, weight format, sharded), in order of preference
LAYOUTS = (
    (INDEX_FILE, "safetensors", True),
    (SINGLE_FILE, "safetensors", False),
    (BIN_INDEX_FILE, "bin", True),
    (BIN_FILE, "bin", False),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_DTYPES = tuple(DTYPES.values())
# safetensors' dtype codes, which the metadata of both formats is reported in
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``torch.save`` file, memory-mapped, through torch's weights-only unpickler.

    Files in torch's zip format (every ``torch.save`` since 1.6) are memory-mapped: a tensor's bytes
    are read when it is used. The pre-1.6 legacy format cannot be mapped and is read whole (still
    weights-only). Raises CheckpointError for a file that is not a flat {name: tensor} dict, or that
    would need anything but tensors to unpickle.
    """
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as err:
        # torch's message is several paragraphs; the line naming the refused global is the useful one
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
        reason = next((line for line in lines if "global" in line.lower()), lines[0])
        raise CheckpointError(
            f"{file} holds pickled objects that are not tensors, which are never unpickled here "
            f"(torch.load weights_only=True refused it: {reason}); save a plain state dict "
            "or convert the checkpoint to safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {file} as a torch.save state dict: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict {{name: tensor}}")
    bad = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if bad:
        raise CheckpointError(
            f"{file} is not a flat state dict: entries that are not named tensors {bad[:10]}"
        )
    return obj


class CheckpointReader:
    """Index of the tensors of a checkpoint directory; loads them by name or prefix.

    >>> reader = CheckpointReader("/path/to/QTSplus-3B")
    >>> selector_sd = reader.load_prefix("model.qts_plus.selector.")   # keys without the prefix

    ``format`` is ``"safetensors"`` or ``"bin"``; ``sharded`` tells whether an index names the files.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.path}")
        layout = next(((f, fmt, sh) for f, fmt, sh in LAYOUTS if (self.path / f).is_file()), None)
        if layout is None:
            raise CheckpointError(
                f"no weights in {self.path}: none of {', '.join(f for f, _, _ in LAYOUTS)} is there"
            )
        marker, self.format, self.sharded = layout
        self._shapes: dict[str, list[int]] | None = None
        self._dtypes: dict[str, str] | None = None
        if self.sharded:
            index = self.path / marker
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a weight index (a weight_map): {err!r}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has a weight_map that is not an object")
            # shard names come from the (possibly downloaded) index: they must stay inside the checkpoint
            shards = {f: self.path / check_shard_name(index, f) for f in set(weight_map.values())}
            self._file_of = {k: shards[f] for k, f in weight_map.items()}
            # is_file() is false for a FIFO, a device or a directory: only regular files are opened
            absent = sorted({str(f) for f in self._file_of.values() if not f.is_file()})
            if absent:
                raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        elif self.format == "safetensors":
            single = self.path / SINGLE_FILE
            with safe_open(single, framework="pt") as f:
                self._file_of = {k: single for k in f.keys()}
        else:  # one pickle: its keys need one (memory-mapped) load, which gives the metadata too
            single = self.path / BIN_FILE
            state = load_bin(single)
            self._file_of = dict.fromkeys(state, single)
            self._shapes = {k: list(t.shape) for k, t in state.items()}
            self._dtypes = {k: DTYPE_CODES.get(t.dtype, str(t.dtype)) for k, t in state.items()}

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def files(self) -> dict[str, str]:
        """Tensor name -> the name of the file holding it (relative to the checkpoint directory)."""
        return {k: f.name for k, f in self._file_of.items()}

    def _read_metadata(self) -> None:
        shapes, dtypes = {}, {}
        for file, names in self._by_file(self._file_of).items():
            if self.format == "safetensors":
                with safe_open(file, framework="pt") as f:
                    for name in names:
                        sl = f.get_slice(name)
                        shapes[name] = list(sl.get_shape())
                        dtypes[name] = sl.get_dtype()
            else:
                state = self._bin_shard(file, names)
                for name in names:
                    shapes[name] = list(state[name].shape)
                    dtypes[name] = DTYPE_CODES.get(state[name].dtype, str(state[name].dtype))
                del state
        self._shapes, self._dtypes = shapes, dtypes

    def shapes(self, prefix: str = "", strip: bool = True) -> dict[str, list[int]]:
        """Shapes of the tensors under ``prefix`` (without reading their data)."""
        if self._shapes is None:
            self._read_metadata()
        return {
            (k[len(prefix) :] if strip else k): v for k, v in self._shapes.items() if k.startswith(prefix)
        }

    def dtype_codes(self, prefix: str = "", strip: bool = True) -> dict[str, str]:
        """safetensors dtype codes ("F32", "BF16", ...) of the tensors under ``prefix``, without their data."""
        if self._dtypes is None:
            self._read_metadata()
        return {
            (k[len(prefix) :] if strip else k): v for k, v in self._dtypes.items() if k.startswith(prefix)
        }

    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (bf16 / fp16 / fp32)."""
        names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
        found = {names.get(d) for d in self.dtype_codes().values()} - {None}
        if not found:
            raise CheckpointError(f"no bf16/fp16/fp32 tensors in {self.path}")
        return next(iter(found)) if len(found) == 1 else torch.float32

    @staticmethod
    def _by_file(file_of: dict[str, Path]) -> dict[Path, list[str]]:
        grouped: dict[Path, list[str]] = {}
        for name, file in file_of.items():
            grouped.setdefault(file, []).append(name)
        return grouped

    def _bin_shard(self, file: Path, names: list[str]) -> dict[str, torch.Tensor]:
        state = load_bin(file)
        absent = sorted(n for n in names if n not in state)
        if absent:
            raise CheckpointError(f"{file} lacks tensors that the index places there: {absent[:10]}")
        return state

    def iter_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for the named tensors, one at a time, each file opened (loaded) once.

        Tensors come grouped by file, in the order of first appearance in ``names``; each file's are in
        the order given. A ``.bin`` shard stays memory-mapped while its tensors are yielded.
        """
        names = list(names)
        unknown = [n for n in names if n not in self._file_of]
        if unknown:
            raise CheckpointError(f"checkpoint {self.path} has no tensors {unknown}")
        for file, group in self._by_file({n: self._file_of[n] for n in names}).items():
            if self.format == "safetensors":
                with safe_open(file, framework="pt", device="cpu") as f:
                    for name in group:
                        yield name, f.get_tensor(name)
            else:
                state = self._bin_shard(file, group)
                for name in group:
                    yield name, state[name]
                del state

    def load(
        self, names: Iterable[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read the named tensors (full key names)."""
        out = {}
        for name, t in self.iter_tensors(names):
            if t.dtype not in SUPPORTED_DTYPES:
                raise CheckpointError(f"{name} has unsupported dtype {t.dtype}")
            # a .bin tensor is a view of the memory-mapped file (and may share its storage with
            # others, e.g. tied weights): always copy, so nothing returned depends on the file
            out[name] = t.to(device=device, dtype=dtype or t.dtype, copy=self.format == "bin")
        return out

    def load_prefix(
        self, prefix: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix``, keyed by name with the prefix removed."""
        names = [k for k in self._file_of if k.startswith(prefix)]
        return {k[len(prefix) :]: v for k, v in self.load(names, dtype, device).items()}


def load_config(path: str | os.PathLike) -> QTSplusConfig:
    """Read config.json of a checkpoint into :class:`QTSplusConfig` and validate it."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no config.json in {path}")
    config = QTSplusConfig.from_pretrained(str(path))
    config.validate_qtsplus()
    return config


def expected_selector_shapes(config: QTSplusConfig) -> dict[str, list[int]]:
    """Every selector tensor the config implies (names without ``model.qts_plus.selector.``)."""
    d, h, hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    kv = hkv * (d // h)

    def block(prefix: str) -> dict[str, list[int]]:
        return {
            f"{prefix}q_norm.weight": [d],
            f"{prefix}kv_norm.weight": [d],
            f"{prefix}ffn_norm.weight": [d],
            f"{prefix}q_proj.weight": [d, d],
            f"{prefix}q_proj.bias": [d],
            f"{prefix}k_proj.weight": [kv, d],
            f"{prefix}k_proj.bias": [kv],
            f"{prefix}v_proj.weight": [kv, d],
            f"{prefix}v_proj.bias": [kv],
            f"{prefix}o_proj.weight": [d, d],
            f"{prefix}ffn.net.0.weight": [4 * d, d],
            f"{prefix}ffn.net.0.bias": [4 * d],
            f"{prefix}ffn.net.2.weight": [d, 4 * d],
            f"{prefix}ffn.net.2.bias": [d],
        }

    shapes: dict[str, list[int]] = {}
    for i in range(config.qts_plus_scoring_layers):
        shapes.update(block(f"scoring_layers.{i}."))
    shapes.update(
        {
            "budget.mlp.0.weight": [256, d + 3],
            "budget.mlp.0.bias": [256],
            "budget.mlp.2.weight": [1, 256],
            "budget.mlp.2.bias": [1],
        }
    )
    if config.qts_plus_reencode:
        for i in range(config.qts_plus_reencode_layers):
            shapes.update(block(f"reencode_layers.{i}.core."))
    return shapes


def check_shapes(expected: dict[str, list[int]], found: dict[str, list[int]], prefix: str) -> None:
    """Raise naming every missing tensor and every shape mismatch (full key names)."""
    missing = [prefix + k for k in expected if k not in found]
    wrong = [
        f"{prefix}{k}: checkpoint {found[k]} vs config {v}"
        for k, v in expected.items()
        if k in found and list(found[k]) != list(v)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if wrong:
        problems.append("shapes disagree with the config: " + "; ".join(wrong))
    if problems:
        raise CheckpointError("; ".join(problems))


def validate_checkpoint(config: QTSplusConfig, reader: CheckpointReader) -> None:
    """Check that the selector, vision tower and (optional) projector agree with the config.

    A LoRA state dict saved unmerged (PEFT names) is refused first, naming its tensors.
    """
    peft = peft_tensors(reader.shapes())
    if peft:
        raise peft_error(peft, f"the checkpoint {getattr(reader, 'path', '')}".rstrip())
    check_shapes(expected_selector_shapes(config), reader.shapes(SELECTOR_PREFIX), SELECTOR_PREFIX)
    vision = resolve_vision_config(config, reader.shapes(VISION_PREFIX))
    d = config.hidden_size
    if PROJECTOR_KEY in reader:
        check_shapes(
            {"weight": [d, vision.out_hidden_size]}, reader.shapes(PROJECTOR_KEY[:-6]), PROJECTOR_KEY[:-6]
        )
    elif vision.out_hidden_size != d:
        raise CheckpointError(
            f"vision tower output size {vision.out_hidden_size} ({VISION_PREFIX}merger.mlp.2.weight) differs "
            f"from hidden_size={d} and there is no {PROJECTOR_KEY} to map it"
        )
