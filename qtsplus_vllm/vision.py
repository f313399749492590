"""The Qwen2.5-VL vision tower of a QTSplus checkpoint (transformers' implementation), torch only.

``VisionEncoder(pixel_values, grid_thw)`` returns the visual tokens X [M, D] in (t, h, w) order:
the ViT (window attention, 2-D RoPE, 2×2 patch merger) followed, when the checkpoint has one, by
the bias-free ``mm_projector`` mapping the ViT width to the LM hidden size D (DESIGN §2.2).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from .checkpoint import CheckpointReader
from .config import PROJECTOR_KEY, VISION_PREFIX, CheckpointError, QTSplusConfig, resolve_vision_config


def _attention_implementation(device: torch.device) -> str:
    """flash-attn on CUDA when it is installed (varlen windows without a Python loop), else SDPA."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


class VisionEncoder(nn.Module):
    """Qwen2.5-VL ViT (+ optional projector): pixel_values [N, C·2·14·14], grid_thw [V, 3] -> [M, D]."""

    def __init__(self, vit: Qwen2_5_VisionTransformerPretrainedModel, projector: nn.Linear | None = None):
        super().__init__()
        self.vit = vit
        self.projector = projector

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        config: QTSplusConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> VisionEncoder:
        """Build the tower from ``model.vision_tower.*`` (and ``model.mm_projector.weight``) only."""
        device = torch.device(device)
        dtype = dtype or reader.dtype()
        vision_config = resolve_vision_config(config, reader.shapes(VISION_PREFIX))
        vision_config._attn_implementation = _attention_implementation(device)
        # Build on the meta device (no random init of a ~0.7B-parameter tower), then take the weights.
        with torch.device("meta"):
            vit = Qwen2_5_VisionTransformerPretrainedModel(vision_config)
        weights = reader.load_prefix(VISION_PREFIX, dtype=dtype, device=device)
        own = set(vit.state_dict())
        missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
        if missing or unexpected:
            raise CheckpointError(
                f"vision tower tensors do not match a Qwen2.5-VL ViT of depth {vision_config.depth}: "
                f"missing {[VISION_PREFIX + k for k in missing]}, unexpected {[VISION_PREFIX + k for k in unexpected]}"
            )
        vit.load_state_dict(weights, strict=True, assign=True)
        # The rotary inverse frequencies are a non-persistent buffer created on meta: rebuild it.
        with torch.device(device):
            vit.rotary_pos_emb = type(vit.rotary_pos_emb)(vision_config)
        projector = None
        if PROJECTOR_KEY in reader:
            w = reader.load([PROJECTOR_KEY], dtype=dtype, device=device)[PROJECTOR_KEY]  # [D, Dv]
            projector = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            projector.weight = nn.Parameter(w, requires_grad=False)
        return cls(vit, projector).eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vit.patch_embed.proj.weight.device

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Visual tokens [M, D] for pixel_values [N, C·tp·p·p] and grid_thw [V, 3] (rows of all V items)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        grid_thw = grid_thw.to(device=self.device)
        x = self.vit(pixel_values, grid_thw=grid_thw).pooler_output  # [M, Dv]
        return self.projector(x) if self.projector is not None else x
