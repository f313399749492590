"""What a QTSplus checkpoint directory holds, for the start-up report and the checks made on it.

QTSplus checkpoints come in several layouts (docs/checkpoints.md): what the reference trainer's
``_save`` writes (``pytorch_model.bin``, ``"architectures": ["Qwen2_5_VLTextForCausalLM"]``, the
processor files of its ``Qwen2_5_VLVisionProcessor``, a ``training_args.bin`` pickle), the same after
its demo converted the weights to ``model.safetensors``, repositories post-processed for remote code
(``auto_map`` + ``*.py`` files), and this project's writer. All are served the same way: by
``model_type``, with our model class, our video loader and our sampling rules. Nothing here imports,
executes or unpickles anything from the directory: JSON files and file names only.

LoRA checkpoints (the trainer with ``--lora_enable True`` saves the PEFT model's state dict) are
refused: merging needs the adapters' scaling, ``lora_alpha / r``, and ``lora_alpha`` is recorded
only inside ``training_args.bin``, a pickle this project never loads (:func:`peft_tensors`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .config import ARCHITECTURE, CheckpointError

# The file names of weights a reader may open (safetensors / torch.save, single or sharded)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Pickles a trainer leaves beside the weights: never opened by this project (vLLM skips them too)
TRAINING_PICKLES = (
    "training_args.bin",
    "optimizer.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
)
REFERENCE_LM_ARCHITECTURE = "Qwen2_5_VLTextForCausalLM"  # what the reference trainer's config.json says
# Markers of a PEFT (LoRA) state dict: get_peft_model wraps the model, each adapted Linear keeps its
# weight under ``base_layer`` and adds ``lora_A`` / ``lora_B``
PEFT_PREFIX = "base_model.model."
PEFT_MARKERS = (
    ".base_layer.",
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude",
)


def peft_tensors(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that only a PEFT (LoRA) state dict has, sorted."""
    return sorted(n for n in names if n.startswith(PEFT_PREFIX) or any(m in n for m in PEFT_MARKERS))


def peft_error(found: list[str], where: str) -> CheckpointError:
    """The start-up error for a checkpoint saved with LoRA adapters that were not merged."""
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    return CheckpointError(
        f"{where} holds a LoRA (PEFT) state dict that was saved unmerged ({len(found)} tensors such as "
        f"{shown}). QTSplus serving needs plain weights, and the adapters' scale lora_alpha / r is only "
        "recorded in training_args.bin, a pickle that is never loaded here. Merge the adapters first: in "
        "the training code, model = model.merge_and_unload() on the PEFT model, then save its "
        "state_dict() (keys without 'base_model.model.', no '.base_layer.', no lora_A/lora_B); or "
        "compute W = W_base + (lora_alpha / r) * lora_B @ lora_A for every adapted layer yourself"
    )


def check_shard_name(index: Path, name: object) -> str:
    """A shard file name from a weight index, refused unless it stays inside the checkpoint.

    A Hub repository controls its index: an absolute name or one with ``..`` would make the API
    server open any local file (a FIFO there blocks the runtime load for ever).
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index} names a shard that is not a file name: {name!r}")
    parts = Path(name).parts
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or "\\" in name:
        raise CheckpointError(
            f"{index} names the shard {name!r}, which is outside the checkpoint directory: shard names "
            "must be relative paths inside it (no absolute paths, no '..')"
        )
    return name


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class CheckpointLayout:
    """Facts about a checkpoint directory, from its JSON files and file names (module docstring)."""

    path: Path
    kind: str  # "reference trainer output", "remote-code repository" or "plain"
    architectures: list[str]  # as config.json names them (served by model_type whatever they are)
    weights: str  # e.g. "pytorch_model.bin", "model.safetensors", "3 safetensors shards"
    tied: bool
    lm_head_saved: bool | None  # None: unknown (no index and not opened)
    remote_code: list[str] = field(default_factory=list)  # auto_map entries and *.py files: ignored
    pickles: list[str] = field(default_factory=list)  # training pickles beside the weights: never loaded
    video_processor: str | None = None  # "Qwen2VLVideoProcessor (video_preprocessor_config.json)": ignored
    processor_class: str | None = None
    checkpoint_dtype: str | None = None

    def describe(self) -> list[str]:
        """The facts as short ``key: value`` phrases for the start-up log line."""
        archs = self.architectures or ["(none)"]
        head = "tied" if self.tied else "untied"
        if self.tied and self.lm_head_saved:
            head += " (lm_head.weight is saved too and equals the embeddings)"
        parts = [
            f"layout: {self.kind}",
            f"architectures in config.json: {archs} -> served as {ARCHITECTURE} (by model_type)",
            f"weights: {self.weights}" + (f" ({self.checkpoint_dtype})" if self.checkpoint_dtype else ""),
            f"head: {head}",
        ]
        if self.remote_code:
            parts.append(f"remote code ignored (never imported): {', '.join(self.remote_code)}")
        if self.pickles:
            parts.append(f"pickles never loaded: {', '.join(self.pickles)}")
        if self.video_processor:
            parts.append(f"video processor named by the checkpoint ignored: {self.video_processor}")
        return parts


def _weights(path: Path) -> tuple[str, list[str] | None]:
    """A phrase for the weight files and, where an index lists them, every tensor name."""
    for index, kind in (
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "bin"),
    ):
        if (path / index).is_file():
            weight_map = _json(path / index).get("weight_map") or {}
            shards = sorted(set(map(str, weight_map.values())))
            return f"{len(shards)} {kind} shard(s) listed by {index}", list(weight_map)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return single, None
    return "none found", None


def inspect_layout(path: str | Path, names: Iterable[str] | None = None) -> CheckpointLayout:
    """Read what :class:`CheckpointLayout` reports from a checkpoint directory.

    ``names``: the tensor names, when the caller already has them (a reader opened the weights);
    otherwise they come from an index if there is one.
    """
    path = Path(path)
    config = _json(path / "config.json")
    weights, listed = _weights(path)
    names = list(names) if names is not None else listed
    remote = [f"auto_map.{key}" for key in sorted(config.get("auto_map") or {})]
    remote += sorted(p.name for p in path.glob("*.py"))
    pickles = sorted(name for name in TRAINING_PICKLES if (path / name).exists())
    pickles += sorted(
        p.name for p in path.glob("*.bin") if p.name not in pickles and not p.name.startswith("pytorch_model")
    )
    video_processor = None
    for file in ("video_preprocessor_config.json", "preprocessor_config.json"):
        named = _json(path / file).get("video_processor_type")
        if named:
            video_processor = f"{named} ({file})"
            break
    processor_class = _json(path / "preprocessor_config.json").get("processor_class")
    architectures = [str(a) for a in config.get("architectures") or []]
    if "training_args.bin" in pickles or (architectures == [REFERENCE_LM_ARCHITECTURE] and not remote):
        kind = "reference trainer output"
    elif remote:
        kind = "remote-code repository"
    else:
        kind = "plain"
    return CheckpointLayout(
        path=path,
        kind=kind,
        architectures=architectures,
        weights=weights,
        tied=bool(config.get("tie_word_embeddings", False)),
        lm_head_saved=None if names is None else "lm_head.weight" in names,
        remote_code=remote,
        pickles=pickles,
        video_processor=video_processor,
        processor_class=processor_class,
        checkpoint_dtype=config.get("dtype") or config.get("torch_dtype"),
    )
