"""The QTSplus checkpoint config (`model_type` ``qts_plus_qwen2_5_vl_causal_lm``).

config.json of a released checkpoint is a Qwen2.5-VL *text* config plus the QTS+ fields below.
Registering this class with ``AutoConfig`` means no remote code is ever needed. The vision tower's
own hyper-parameters are often absent: :func:`resolve_vision_config` takes them from a
``vision_config`` dict when present, else infers them from the weight shapes.

Dimension letters used in this package: M visual tokens, n kept tokens, L question tokens,
D LM hidden size, H attention heads, Hkv key/value heads, Dh = D / H.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from transformers import AutoConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

MODEL_TYPE = "qts_plus_qwen2_5_vl_causal_lm"
ARCHITECTURE = "QTSplusQwen2_5_VLTextForCausalLM"

# Key prefixes inside the checkpoint (DESIGN §3).
VISION_PREFIX = "model.vision_tower."
SELECTOR_PREFIX = "model.qts_plus.selector."
PROJECTOR_KEY = "model.mm_projector.weight"

# Qwen2.5-VL ViT defaults used when the checkpoint carries no vision_config.
VIT_HEAD_DIM = 80
VIT_DEFAULTS = dict(
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=112,
    in_channels=3,
    hidden_act="silu",
    fullatt_block_indexes=[7, 15, 23, 31],
)


class CheckpointError(ValueError):
    """A checkpoint is inconsistent or incomplete; the message names the offending keys/values."""


class QTSplusConfig(Qwen2_5_VLTextConfig):
    """Qwen2.5-VL text config + the QTS+ selector fields of the released checkpoints.

    Training-only fields (``lambda_t/m/s``, ``qts_plus_tau_s``) and the trainer-machine path
    ``pretrain_vision_model`` are kept for round-tripping and never used for inference.
    """

    model_type = MODEL_TYPE

    vision_tower: str = "qwen2_5_vl_vision"
    enable_qts_plus: bool = True
    vision_embed_size: int | None = None
    vision_tower_embed_size: int | None = None
    qts_plus_tau_s: float = 0.1
    qts_plus_nmax: int = 2560
    qts_plus_rho_min: float = 0.05
    qts_plus_rho_max: float = 0.5
    qts_plus_reencode: bool = True
    qts_plus_scoring_layers: int = 1
    qts_plus_reencode_layers: int = 1
    qts_plus_n_heads: int | None = None
    lambda_t: float = 1.0
    lambda_m: float = 1.7
    lambda_s: float = 0.05
    pretrain_vision_model: str | None = None
    vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Serve by model_type, whatever the file's "architectures" says: the reference trainer saves
        # the name of the LM it started from ("Qwen2_5_VLTextForCausalLM"), a post-processed repo may
        # keep either name or none. vLLM picks the model class from this attribute, so every QTSplus
        # config names our class; the name the file gave is kept for the start-up report.
        if getattr(self, "checkpoint_architectures", None) is None:
            self.checkpoint_architectures = list(self.architectures) if self.architectures else []
        self.architectures = [ARCHITECTURE]

    def validate_qtsplus(self) -> None:
        """Raise :class:`CheckpointError` naming every inconsistent field."""
        problems = []
        d, h, hkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if h <= 0 or d % h:
            problems.append(f"hidden_size={d} is not divisible by num_attention_heads={h}")
        elif hkv <= 0 or h % hkv:
            problems.append(f"num_attention_heads={h} is not divisible by num_key_value_heads={hkv}")
        if self.qts_plus_n_heads not in (None, h):
            problems.append(
                f"qts_plus_n_heads={self.qts_plus_n_heads} differs from num_attention_heads={h} "
                "(the selector uses the LM head count)"
            )
        if self.vision_embed_size not in (None, d):
            problems.append(f"vision_embed_size={self.vision_embed_size} differs from hidden_size={d}")
        if not 0.0 <= self.qts_plus_rho_min <= self.qts_plus_rho_max <= 1.0:
            problems.append(
                f"need 0 <= qts_plus_rho_min ({self.qts_plus_rho_min}) <= qts_plus_rho_max "
                f"({self.qts_plus_rho_max}) <= 1"
            )
        if self.qts_plus_nmax < 1:
            problems.append(f"qts_plus_nmax={self.qts_plus_nmax} must be >= 1")
        for name in ("qts_plus_scoring_layers", "qts_plus_reencode_layers"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.vision_tower != "qwen2_5_vl_vision":
            problems.append(f"vision_tower={self.vision_tower!r} is not supported (only 'qwen2_5_vl_vision')")
        if problems:
            raise CheckpointError("inconsistent QTSplus config: " + "; ".join(problems))


def register_config() -> None:
    """Make ``AutoConfig`` resolve our model_type without remote code (idempotent)."""
    AutoConfig.register(MODEL_TYPE, QTSplusConfig, exist_ok=True)


register_config()


def _block_count(keys: Sequence[str]) -> int:
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))):
        raise CheckpointError(f"vision tower block indices are not contiguous: {sorted(blocks)}")
    return len(blocks)


def resolve_vision_config(
    config: QTSplusConfig, shapes: Mapping[str, Sequence[int]]
) -> Qwen2_5_VLVisionConfig:
    """The vision tower's config, from ``config.vision_config`` or inferred from weight shapes.

    ``shapes`` maps vision-tower key names *without* the ``model.vision_tower.`` prefix to their
    shapes (e.g. ``patch_embed.proj.weight`` -> [hidden, 3, 2, 14, 14]). Either way the result is
    checked against the shapes, so a mismatch raises :class:`CheckpointError`.
    """
    required = ["patch_embed.proj.weight", "merger.mlp.2.weight", "merger.ln_q.weight"]
    missing = [VISION_PREFIX + k for k in required if k not in shapes]
    if missing:
        raise CheckpointError(f"checkpoint is missing vision tower tensors: {missing}")
    depth = _block_count(list(shapes))
    if depth == 0:
        raise CheckpointError(f"checkpoint has no vision tower blocks ({VISION_PREFIX}blocks.*)")
    patch_w = list(shapes["patch_embed.proj.weight"])  # [hidden, C, tp, p, p]
    inferred = dict(
        depth=depth,
        hidden_size=patch_w[0],
        in_channels=patch_w[1],
        temporal_patch_size=patch_w[2],
        patch_size=patch_w[3],
        out_hidden_size=list(shapes["merger.mlp.2.weight"])[0],
        intermediate_size=list(shapes["blocks.0.mlp.gate_proj.weight"])[0]
        if "blocks.0.mlp.gate_proj.weight" in shapes
        else None,
    )
    if config.vision_config:
        values = {**VIT_DEFAULTS, **dict(config.vision_config)}
        for key in ("depth", "hidden_size", "out_hidden_size", "intermediate_size", "patch_size"):
            if key in values and inferred.get(key) is not None and values[key] != inferred[key]:
                raise CheckpointError(
                    f"vision_config.{key}={values[key]} disagrees with the weights ({inferred[key]}, "
                    f"from {VISION_PREFIX}{'blocks.*' if key == 'depth' else key})"
                )
        values.setdefault(
            "num_heads", values.get("num_attention_heads", values["hidden_size"] // VIT_HEAD_DIM)
        )
        values.pop("num_attention_heads", None)
    else:
        if inferred["intermediate_size"] is None:
            raise CheckpointError(f"checkpoint is missing {VISION_PREFIX}blocks.0.mlp.gate_proj.weight")
        hidden = inferred["hidden_size"]
        head_dim = VIT_HEAD_DIM if hidden % VIT_HEAD_DIM == 0 else None
        if head_dim is None:
            raise CheckpointError(
                f"cannot infer vision heads: {VISION_PREFIX}patch_embed.proj.weight gives hidden size "
                f"{hidden}, not a multiple of the Qwen2.5-VL head dim {VIT_HEAD_DIM}; add a vision_config"
            )
        values = {**VIT_DEFAULTS, **inferred, "num_heads": hidden // head_dim}
        values["fullatt_block_indexes"] = [i for i in VIT_DEFAULTS["fullatt_block_indexes"] if i < depth]
    if values["hidden_size"] % values["num_heads"]:
        raise CheckpointError(
            f"vision hidden_size={values['hidden_size']} is not divisible by num_heads={values['num_heads']}"
        )
    allowed = (
        set(Qwen2_5_VLVisionConfig.__dataclass_fields__)
        if hasattr(Qwen2_5_VLVisionConfig, "__dataclass_fields__")
        else None
    )
    if allowed:
        values = {k: v for k, v in values.items() if k in allowed}
    return Qwen2_5_VLVisionConfig(**values)
