"""The Qwen2.5-VL vision tower of a QTSplus checkpoint (transformers' implementation), torch only.

``VisionEncoder(pixel_values, grid_thw)`` returns the visual tokens X [M, D] in (t, h, w) order:
the ViT (window attention, 2-D RoPE, 2×2 patch merger) followed, when the checkpoint has one, by
the bias-free ``mm_projector`` mapping the ViT width to the LM hidden size D (DESIGN §2.2).

Attention. The ViT attends within windows (window blocks) and within temporal slices (full blocks):
packed variable-length sequences given by ``cu_seqlens``. transformers' SDPA path loops in Python
over them (one ``scaled_dot_product_attention`` per window: ~4,500 per window layer for a 10-minute
video). transformers hands ``cu_seqlens`` to the attention function in one call only when the
implementation's name contains "flash", so the exact kernels below are registered in its
``AttentionInterface`` under such names and run each layer in one call:

=================  ==========================================================  ===================
name               kernel                                                      runs on
=================  ==========================================================  ===================
``vllm_flash_attn`` vLLM's bundled flash-attention (``vllm.vllm_flash_attn``)   CUDA, fp16/bf16
``flash_attn``     the flash-attn package's ``flash_attn_varlen_func``         CUDA, fp16/bf16
``torch_varlen``   PyTorch's ``torch.nn.attention.varlen.varlen_attn``         CUDA, fp16/bf16
``sdpa_padded``    one SDPA call over the sequences padded to the longest,     any device, dtype
                   padding keys masked out (exact; ≤ 4× padding, else loop)
``sdpa``           transformers' SDPA path: one SDPA call per sequence         any device, dtype
=================  ==========================================================  ===================

``auto`` (the default) picks, on CUDA in fp16/bf16, the first of vllm_flash_attn, flash_attn,
torch_varlen that runs (a tiny probe call, cached), else sdpa_padded; on CUDA in fp32 sdpa_padded
(the flash kernels have no fp32); on the CPU and other devices sdpa (unchanged). The environment
variable ``QTSPLUS_VIT_ATTENTION`` (or ``VisionEncoder(..., attention=NAME)``) forces one; forcing a
kernel that cannot run on the device/dtype is an error, not a silent fallback.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from .checkpoint import CheckpointReader
from .config import PROJECTOR_KEY, VISION_PREFIX, CheckpointError, QTSplusConfig, resolve_vision_config
from .settings import settings, variable

ATTENTION_ENV = variable("vit_attention")  # QTSPLUS_VIT_ATTENTION, read through settings()
VARLEN_KERNELS = ("vllm_flash_attn", "flash_attn", "torch_varlen")  # auto's order on CUDA fp16/bf16
ATTENTION_CHOICES = ("auto", *VARLEN_KERNELS, "sdpa_padded", "sdpa")
HALF = (torch.float16, torch.bfloat16)
PADDING_LIMIT = 4  # sdpa_padded loops instead when padding would exceed this many times the tokens
# transformers' name for each implementation ("flash" in the name: one call per layer with cu_seqlens)
TRANSFORMERS_NAME = {name: f"qtsplus_flash_{name}" for name in (*VARLEN_KERNELS, "sdpa_padded")}
TRANSFORMERS_NAME["sdpa"] = "sdpa"


# ----------------------------------------------------------------------------- varlen kernels
# Each takes q, k, v [T, H, Dh] (packed sequences), cu_seqlens [N + 1] int32, max_seqlen and the
# softmax scale, and returns [T, H, Dh]; attention is non-causal within each sequence.


def _torch_varlen_fn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_attn_fn() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _vllm_flash_attn_fn() -> Callable | None:
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func, is_fa_version_supported
    except (ImportError, AttributeError, OSError):
        return None
    extra = {"fa_version": 3} if _safe(lambda: is_fa_version_supported(3)) else {}
    return functools.partial(flash_attn_varlen_func, **extra)


def _safe(fn: Callable) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False


@functools.cache
def _takes_scale(fn: Callable) -> bool:
    return "scale" in inspect.signature(fn).parameters


def _run_torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    fn = FN_GETTERS["torch_varlen"]()
    if _takes_scale(fn):
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    default = q.shape[-1] ** -0.5  # torch < 2.10 takes no scale: fold it into q when it differs
    if not math.isclose(scale, default, rel_tol=1e-6):
        q = q * (scale / default)
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _run_flash(name: str):
    def run(q, k, v, cu_seqlens, max_seqlen, scale):
        return FN_GETTERS[name]()(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            softmax_scale=scale,
            causal=False,
        )

    return run


def _sdpa_per_sequence(q, k, v, cu_seqlens, scale):
    """The loop transformers' SDPA path runs: one call per sequence (the fallback of sdpa_padded)."""
    bounds = cu_seqlens.tolist()
    parts = [
        F.scaled_dot_product_attention(q[None, :, s:e], k[None, :, s:e], v[None, :, s:e], scale=scale)[0]
        for s, e in zip(bounds[:-1], bounds[1:], strict=False)
        if e > s
    ]
    return torch.cat(parts, dim=1)


def _run_sdpa_padded(q, k, v, cu_seqlens, max_seqlen, scale):
    """One SDPA call over [N, H, Lmax, Dh]: each sequence padded to the longest, padded keys masked."""
    t, h, dh = q.shape
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [H, T, Dh]
    n = cu_seqlens.numel() - 1
    if n * max_seqlen > PADDING_LIMIT * max(t, 1):
        return _sdpa_per_sequence(q, k, v, cu_seqlens, scale).transpose(0, 1)
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    offsets = torch.arange(max_seqlen, device=q.device)
    valid = offsets[None, :] < lengths[:, None]  # [N, Lmax]
    index = (starts[:, None] + offsets[None, :]).clamp_(max=max(t - 1, 0))  # [N, Lmax] rows of q/k/v
    qp, kp, vp = (x[:, index].transpose(0, 1) for x in (q, k, v))  # [N, H, Lmax, Dh]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[valid]  # [T, H, Dh]: sequences are contiguous and in order


RUNNERS: dict[str, Callable] = {
    "torch_varlen": _run_torch_varlen,
    "flash_attn": _run_flash("flash_attn"),
    "vllm_flash_attn": _run_flash("vllm_flash_attn"),
    "sdpa_padded": _run_sdpa_padded,
}
FN_GETTERS = {
    "torch_varlen": _torch_varlen_fn,
    "flash_attn": _flash_attn_fn,
    "vllm_flash_attn": _vllm_flash_attn_fn,
}


def _attention_interface(name: str) -> Callable:
    """transformers' attention-function contract: query/key/value [1, H, T, Dh] -> ([1, T, H, Dh], None)."""

    def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None:  # a single sequence (called outside the vision tower)
            cu_seqlens = torch.tensor([0, query.shape[2]], dtype=torch.int32, device=query.device)
        max_seqlen = kwargs.get("max_length_q")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, Dh]
        out = RUNNERS[name](q, k, v, cu_seqlens.to(torch.int32), int(max_seqlen), float(scale))
        return out[None], None

    attention.__name__ = f"qtsplus_{name}_attention"
    return attention


for _name, _registered in TRANSFORMERS_NAME.items():
    if _registered != "sdpa":
        ALL_ATTENTION_FUNCTIONS.register(_registered, _attention_interface(_name))


# ----------------------------------------------------------------------------- selection


@functools.cache
def _probe(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when kernel ``name`` runs on device/dtype (a tiny call checked against SDPA), else why not."""
    if name in ("sdpa", "sdpa_padded"):
        return None
    if device.type != "cuda":
        return f"{name} needs CUDA (device is {device.type})"
    if dtype not in HALF:
        return f"{name} has no {str(dtype).removeprefix('torch.')} kernel (fp16/bf16 only)"
    if FN_GETTERS[name]() is None:
        return f"{name} is not installed"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(24, 2, 64, device=device, dtype=dtype, generator=gen) for _ in range(3))
        cu = torch.tensor([0, 7, 24], dtype=torch.int32, device=device)
        out = RUNNERS[name](q, k, v, cu, 17, 0.125)
        ref = _sdpa_per_sequence(*(x.transpose(0, 1) for x in (q, k, v)), cu, 0.125).transpose(0, 1)
        error = (out.float() - ref.float()).abs().max().item()
    except Exception as exc:  # wrong GPU architecture, missing symbols, ...
        return f"{name} failed a probe call: {type(exc).__name__}: {str(exc)[:200]}"
    if not error < 2e-2:
        return f"{name} disagrees with SDPA on a probe call (max abs error {error:.3g})"
    return None


def attention_unavailable(name: str, device: str | torch.device, dtype: torch.dtype) -> str | None:
    """Why attention implementation ``name`` cannot run on device/dtype, or None when it can."""
    if name not in ATTENTION_CHOICES or name == "auto":
        return f"unknown ViT attention {name!r}; choose one of {', '.join(ATTENTION_CHOICES)}"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return _probe(name, device, dtype)


def available_attention(device: str | torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    """Every implementation -> None (runs here) or the reason it does not."""
    return {name: attention_unavailable(name, device, dtype) for name in ATTENTION_CHOICES[1:]}


def pick_attention(device: str | torch.device, dtype: torch.dtype, requested: str | None = None) -> str:
    """The ViT attention for device/dtype: ``requested``; None or "auto": $QTSPLUS_VIT_ATTENTION if set, else
    the fastest exact kernel that runs here (module docstring)."""
    if requested in (None, "auto"):
        requested = settings().vit_attention
    requested = requested.strip().lower()
    device = torch.device(device)
    if requested != "auto":
        reason = attention_unavailable(requested, device, dtype)
        if reason is not None:
            raise ValueError(f"ViT attention {requested!r} cannot run here: {reason}")
        return requested
    if device.type != "cuda":
        return "sdpa"
    if dtype in HALF:
        for name in VARLEN_KERNELS:
            if attention_unavailable(name, device, dtype) is None:
                return name
    return "sdpa_padded"


def _attention_implementation(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """transformers' implementation to *construct* the tower with: always "sdpa" (checked at
    construction without loading anything); :class:`VisionEncoder` switches to :func:`pick_attention`'s
    choice once the weights are on their device."""
    return "sdpa"


# ----------------------------------------------------------------------------- the tower


class VisionEncoder(nn.Module):
    """Qwen2.5-VL ViT (+ optional projector): pixel_values [N, C·2·14·14], grid_thw [V, 3] -> [M, D].

    ``attention``: "auto" (default: :func:`pick_attention` for the weights' device and dtype, or
    $QTSPLUS_VIT_ATTENTION), one of :data:`ATTENTION_CHOICES`, or None to keep the tower's own.
    """

    def __init__(
        self,
        vit: Qwen2_5_VisionTransformerPretrainedModel,
        projector: nn.Linear | None = None,
        attention: str | None = "auto",
    ):
        super().__init__()
        self.vit = vit
        self.projector = projector
        if attention is not None:
            self.set_attention(attention)

    def set_attention(self, attention: str = "auto") -> str:
        """Switch the tower's attention implementation; returns the name chosen."""
        name = pick_attention(self.device, self.dtype, attention)
        # Set after construction, on the config every attention layer reads at call time (transformers
        # validates the name only when a model is constructed; ours is registered above).
        self.vit.config._attn_implementation = TRANSFORMERS_NAME[name]
        return name

    @property
    def attention(self) -> str:
        """The attention implementation in use (a name of :data:`ATTENTION_CHOICES`, or transformers')."""
        current = self.vit.config._attn_implementation
        return next((k for k, v in TRANSFORMERS_NAME.items() if v == current), current)

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        config: QTSplusConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        attention: str = "auto",
    ) -> VisionEncoder:
        """Build the tower from ``model.vision_tower.*`` (and ``model.mm_projector.weight``) only."""
        device = torch.device(device)
        dtype = dtype or reader.dtype()
        vision_config = resolve_vision_config(config, reader.shapes(VISION_PREFIX))
        vision_config._attn_implementation = _attention_implementation(device, dtype)
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
        return cls(vit, projector, attention=attention).eval().requires_grad_(False)

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
