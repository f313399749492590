"""Reading QTSplus checkpoints: safetensors, single file or sharded, by key prefix.

Only the tensors asked for are read (safetensors memory-maps the files), so the vision tower and
selector can be loaded without touching the multi-GB LM weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
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

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED_DTYPES = tuple(DTYPES.values())


class CheckpointReader:
    """Index of the tensors of a checkpoint directory; loads them by name or prefix.

    >>> reader = CheckpointReader("/path/to/QTSplus-3B")
    >>> selector_sd = reader.load_prefix("model.qts_plus.selector.")   # keys without the prefix
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.path}")
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: self.path / f for k, f in weight_map.items()}
            absent = sorted({str(f) for f in self._file_of.values() if not f.is_file()})
            if absent:
                raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        elif (self.path / SINGLE_FILE).is_file():
            single = self.path / SINGLE_FILE
            with safe_open(single, framework="pt") as f:
                self._file_of = {k: single for k in f.keys()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
        self._shapes: dict[str, list[int]] | None = None
        self._dtypes: dict[str, str] | None = None

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _read_metadata(self) -> None:
        shapes, dtypes = {}, {}
        for file, names in self._by_file(self._file_of).items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    sl = f.get_slice(name)
                    shapes[name] = list(sl.get_shape())
                    dtypes[name] = sl.get_dtype()
        self._shapes, self._dtypes = shapes, dtypes

    def shapes(self, prefix: str = "", strip: bool = True) -> dict[str, list[int]]:
        """Shapes of the tensors under ``prefix`` (without reading their data)."""
        if self._shapes is None:
            self._read_metadata()
        return {
            (k[len(prefix) :] if strip else k): v for k, v in self._shapes.items() if k.startswith(prefix)
        }

    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (bf16 / fp16 / fp32)."""
        if self._dtypes is None:
            self._read_metadata()
        names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
        found = {names.get(d) for d in self._dtypes.values()} - {None}
        if not found:
            raise CheckpointError(f"no bf16/fp16/fp32 tensors in {self.path}")
        return next(iter(found)) if len(found) == 1 else torch.float32

    @staticmethod
    def _by_file(file_of: dict[str, Path]) -> dict[Path, list[str]]:
        grouped: dict[Path, list[str]] = {}
        for name, file in file_of.items():
            grouped.setdefault(file, []).append(name)
        return grouped

    def load(
        self, names: Iterable[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Read the named tensors (full key names)."""
        names = list(names)
        unknown = [n for n in names if n not in self._file_of]
        if unknown:
            raise CheckpointError(f"checkpoint {self.path} has no tensors {unknown}")
        out = {}
        for file, group in self._by_file({n: self._file_of[n] for n in names}).items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in group:
                    t = f.get_tensor(name)
                    if t.dtype not in SUPPORTED_DTYPES:
                        raise CheckpointError(f"{name} has unsupported dtype {t.dtype}")
                    out[name] = t.to(device=device, dtype=dtype or t.dtype)
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
    """Check that the selector, vision tower and (optional) projector agree with the config."""
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
