"""Cost-proportional benchmark checkpoints: FLOP counts of the real and the scaled-down models.

A tiny checkpoint makes the language model nearly free, so a served comparison on it says little
about what selection saves. The presets here (``3b-proportional``, ``7b-proportional``) scale the
ViT and the LM down from the released Qwen2.5-VL configs so that the *ratios* that decide the
serving trade-off are those of the real model at the benchmark's context lengths:

- ``lm_vit_ratio(S)``: the LM's prefill cost of a prompt of S tokens, per prompt token, over the
  ViT's cost per merged (visual) token. Real model: counted FLOPs; preset: measured seconds on the
  CPU it is served on (``benchmarks/bench_proportional.py``), counted FLOPs shown next to it;
- ``kv_vit_ratio``: the KV-cache bytes one token keeps (bf16 for the real model, fp32 as the CPU
  serves the preset) over the ViT's FLOPs per merged token.

Counted (one multiply-add = 2 FLOPs): every matmul of the ViT (patch embedding, qkv, projection,
SwiGLU MLP, merger MLP) and its attention (QKᵀ and AV within each window or temporal slice, at the
exact window sizes of the grid), every matmul of the LM (q/k/v/o, SwiGLU MLP) per token, causal
attention (token t attends to t keys: 2·t·H·Dh MACs per layer) and the final norm + lm_head for
the one position a prefill samples from. Not counted: norms, rotary embeddings, softmax,
activations, biases (each < 1 % here). The selector's cost is counted separately
(:func:`selector_flops`): < 0.2 % of the ViT's for the real models, < 1 % for the presets.

Contexts (:func:`benchmark_contexts`): 720p videos of 1, 5 and 10 minutes at the plugin's default
sampling (1 fps, max_pixels 360×420: a 16:9 frame becomes 280×504, 180 merged tokens per 2 frames),
all M tokens (selection off) or n = min(⌈ρ·M⌉, nmax) (selection on, ρ at both ends of its range),
plus :data:`qtsplus_vllm.sizing.TEXT_TOKENS` of template and question.

Selector settings are the reference training script's (``script/training_example.sh`` of
Siyou-Li/QTSplus): nmax 512, ρ 0.05…0.5, τ 0.5, 1 scoring layer, 2 re-encode layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# Reference training script (Siyou-Li/QTSplus script/training_example.sh): what the released
# checkpoints were trained with. The config default (and our tiny writer's field) is nmax 2560.
TRAINING_SELECTOR = dict(nmax=512, rho_min=0.05, rho_max=0.5, tau_s=0.5, scoring_layers=1, reencode_layers=2)
MINUTES = (1, 5, 10)
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class ViTShape:
    """The Qwen2.5-VL vision tower's cost-relevant shape (window attention, 2×2 patch merger)."""

    depth: int
    hidden: int
    intermediate: int
    heads: int
    out_hidden: int
    fullatt_blocks: tuple[int, ...]
    patch: int = 14
    temporal_patch: int = 2
    merge: int = 2
    window: int = 112  # pixels: 112 / 14 = 8 patches = 4 merged tokens a side
    in_channels: int = 3


@dataclass(frozen=True)
class LMShape:
    """A Qwen2 decoder (qkv bias, SwiGLU, RMSNorm); head dim = hidden / heads as vLLM's Qwen2 has it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_dim * dtype_bytes


@dataclass(frozen=True)
class Model:
    """A model whose costs are compared: LM, ViT, selector settings, the dtype it is served in."""

    name: str
    lm: LMShape
    vit: ViTShape
    dtype_bytes: int
    selector: dict = field(default_factory=lambda: dict(TRAINING_SELECTOR))


QWEN25_VIT = dict(depth=32, hidden=1280, intermediate=3420, heads=16, fullatt_blocks=(7, 15, 23, 31))
REAL = {
    "3B": Model("Qwen2.5-VL-3B (QTSplus-3B)", LMShape(2048, 36, 16, 2, 11008, 151936),
                ViTShape(**QWEN25_VIT, out_hidden=2048), BF16),
    "7B": Model("Qwen2.5-VL-7B (QTSplus-7B)", LMShape(3584, 28, 28, 4, 18944, 152064),
                ViTShape(**QWEN25_VIT, out_hidden=3584), BF16),
}  # fmt: skip


def _macs_to_flops(macs: float) -> float:
    return 2.0 * macs


def window_sizes(grid_h: int, grid_w: int, vit: ViTShape) -> list[int]:
    """Patches per attention window of one temporal slice (Qwen2.5-VL's windows on the merged grid)."""
    side = vit.window // vit.merge // vit.patch  # merged tokens per window side (4 for the release)
    mh, mw = grid_h // vit.merge, grid_w // vit.merge
    rows = [min(side, mh - i) for i in range(0, mh, side)]
    cols = [min(side, mw - j) for j in range(0, mw, side)]
    return [r * c * vit.merge**2 for r in rows for c in cols]


def vit_flops(vit: ViTShape, grid_t: int, grid_h: int, grid_w: int) -> dict:
    """FLOPs of the ViT on one video of ``grid_t × grid_h × grid_w`` patches, per component and per merged token."""
    patches = grid_t * grid_h * grid_w
    merged = patches // vit.merge**2
    h = vit.hidden
    full = sum(1 for i in vit.fullatt_blocks if i < vit.depth)
    windowed = vit.depth - full
    slice_patches = grid_h * grid_w
    windows = window_sizes(grid_h, grid_w, vit)
    parts = {
        "patch_embed": patches * vit.in_channels * vit.temporal_patch * vit.patch**2 * h,
        "attention_linear": vit.depth * patches * 4 * h * h,  # qkv (3h²) + proj (h²)
        "mlp": vit.depth * patches * 3 * h * vit.intermediate,  # gate, up, down
        # QKᵀ and AV: 2·s²·h MACs for a window (or slice) of s patches
        "window_attention": windowed * grid_t * sum(2 * s * s * h for s in windows),
        "full_attention": full * grid_t * 2 * slice_patches**2 * h,
        "merger": merged * ((vit.merge**2 * h) ** 2 + vit.merge**2 * h * vit.out_hidden),
    }
    flops = {k: _macs_to_flops(v) for k, v in parts.items()}
    total = sum(flops.values())
    return {"flops": flops, "total": total, "merged_tokens": merged, "per_merged_token": total / merged}


def lm_prefill_flops(lm: LMShape, tokens: int) -> dict:
    """FLOPs of a causal prefill of ``tokens`` tokens, per component and per token."""
    d, q, kv = lm.hidden, lm.heads * lm.head_dim, lm.kv_dim
    per_token_linear = lm.layers * (d * q + 2 * d * kv + q * d + 3 * d * lm.intermediate)
    parts = {
        "linear": tokens * per_token_linear,
        # token t (1-based) attends to t keys: QKᵀ and AV, t·q MACs each, per layer
        "attention": lm.layers * 2 * q * tokens * (tokens + 1) // 2,
        "lm_head": d * lm.vocab,  # the last position only
    }
    flops = {k: _macs_to_flops(v) for k, v in parts.items()}
    total = sum(flops.values())
    return {"flops": flops, "total": total, "tokens": tokens, "per_token": total / tokens}


def selector_flops(lm: LMShape, m: int, n: int, question: int, reencode_layers: int) -> dict:
    """FLOPs of the QTS+ selector: the scoring layer's K projection and scores over M rows, re-encode over n."""
    d, kv = lm.hidden, lm.kv_dim
    scoring = m * d * kv + lm.heads * question * m * lm.head_dim  # K projection, q·kᵀ
    # one re-encode layer on n rows: q/k/v/o projections, n² attention, FFN D→4D→D
    layer = n * (2 * d * d + 2 * d * kv) + 2 * n * n * d + n * 8 * d * d
    return {"scoring": _macs_to_flops(scoring), "reencode": _macs_to_flops(reencode_layers * layer)}


def video_grid(minutes: float) -> tuple[int, int, int]:
    """(T/2, H/14, W/14) of a 720p video of ``minutes`` at the plugin's default sampling."""
    from ..sizing import video_tokens  # noqa: F401  (same rule; imported for its dependencies)
    from ..video import PreprocessConfig, target_size

    seconds = minutes * 60
    frames = min(max(int(seconds * 1.0), 4), 768, int(seconds * 30))
    frames -= frames % 2
    h, w = target_size(720, 1280, frames, PreprocessConfig())
    return frames // 2, h // 14, w // 14


# video_grid(minutes) for MINUTES, for a machine without PyAV / qwen-vl-utils (which the sizing rule
# imports): the GPU suite's bare image. tests/unit/test_proportional.py checks they agree.
GRIDS_720P = {1: (30, 20, 36), 5: (150, 20, 36), 10: (300, 20, 36)}


def benchmark_contexts(
    selector: dict, text_tokens: int | None = None, grids: dict[float, tuple[int, int, int]] | None = None
) -> list[dict]:
    """Per video length: M, n at ρ_min and ρ_max, and the prompt lengths S with and without selection.

    ``grids`` (minutes -> (T/2, H/14, W/14)) and ``text_tokens`` replace :func:`video_grid` and
    :data:`qtsplus_vllm.sizing.TEXT_TOKENS`; given both, nothing of ``qtsplus_vllm.video`` is imported.
    """
    if text_tokens is None:
        from ..sizing import TEXT_TOKENS

        text_tokens = TEXT_TOKENS
    rows = []
    for minutes, (t, h, w) in (grids or {m: video_grid(m) for m in MINUTES}).items():
        m = t * (h // 2) * (w // 2)
        if grids is None:
            from ..sizing import video_tokens

            assert m == video_tokens(minutes * 60)
        n = {
            end: min(max(math.ceil(selector[end] * m), 1), selector["nmax"]) for end in ("rho_min", "rho_max")
        }
        rows.append(
            dict(minutes=minutes, grid=[t, h, w], m=m, n_rho_min=n["rho_min"], n_rho_max=n["rho_max"],
                 s_all=m + text_tokens, s_selected=n["rho_max"] + text_tokens)
        )  # fmt: skip
    return rows


def ratios(model: Model, text_tokens: int | None = None) -> dict:
    """The model's counted cost ratios at every benchmark context (see the module docstring)."""
    contexts = benchmark_contexts(model.selector, text_tokens)
    t, h, w = contexts[0]["grid"]  # the ViT's cost per merged token does not depend on T
    vit = vit_flops(model.vit, t, h, w)
    rows = []
    for c in contexts:
        for kind in ("selected", "all"):
            s = c[f"s_{kind}"]
            lm = lm_prefill_flops(model.lm, s)
            rows.append(
                dict(minutes=c["minutes"], context=kind, tokens=s, m=c["m"],
                     lm_flops_per_token=lm["per_token"], lm_flops=lm["flops"],
                     attention_share=lm["flops"]["attention"] / lm["total"],
                     lm_vit_ratio=lm["per_token"] / vit["per_merged_token"])
            )  # fmt: skip
    kv = model.lm.kv_bytes_per_token(model.dtype_bytes)
    sel = selector_flops(
        model.lm, contexts[-1]["m"], model.selector["nmax"], 16, model.selector["reencode_layers"]
    )
    return {
        "model": model.name,
        "lm": asdict(model.lm),
        "vit": asdict(model.vit),
        "selector": model.selector,
        "dtype_bytes": model.dtype_bytes,
        "vit_flops_per_merged_token": vit["per_merged_token"],
        "vit_flops_per_component": {k: v / vit["merged_tokens"] for k, v in vit["flops"].items()},
        "kv_bytes_per_token": kv,
        "kv_vit_ratio": kv / vit["per_merged_token"],
        "selector_share_of_vit_10min": sum(sel.values()) / (vit["per_merged_token"] * contexts[-1]["m"]),
        "contexts": rows,
    }


# ---------------------------------------------------------------------------------------- presets
# Keyword arguments of write_tiny_checkpoint. Chosen by measurement on the 2-core CPU they are served
# on (benchmarks/bench_proportional.py; results in benchmarks/results/proportional/).
_COMMON = dict(
    vision_config=True, tied=False, max_position_embeddings=128000,
    nmax=TRAINING_SELECTOR["nmax"], rho_min=TRAINING_SELECTOR["rho_min"], rho_max=TRAINING_SELECTOR["rho_max"],
    tau_s=TRAINING_SELECTOR["tau_s"], scoring_layers=TRAINING_SELECTOR["scoring_layers"],
    reencode_layers=TRAINING_SELECTOR["reencode_layers"],
)  # fmt: skip
PRESETS: dict[str, dict] = {
    "7b-proportional": dict(
        _COMMON, hidden=704, layers=1, heads=11, kv_heads=1, intermediate=34944,
        vision_depth=6, vision_hidden=240, vision_intermediate=640, vision_fullatt="5",
    ),
    "3b-proportional": dict(
        _COMMON, hidden=1024, layers=1, heads=16, kv_heads=1, intermediate=22592,
        vision_depth=6, vision_hidden=320, vision_intermediate=855, vision_fullatt="5",
    ),
}  # fmt: skip


def preset_model(name: str) -> Model:
    """The preset's shapes as a :class:`Model` (fp32, as the CPU serves it)."""
    kw = PRESETS[name]
    lm = LMShape(kw["hidden"], kw["layers"], kw["heads"], kw["kv_heads"], kw["intermediate"], vocab=512)
    vit = ViTShape(
        depth=kw["vision_depth"], hidden=kw["vision_hidden"], intermediate=kw["vision_intermediate"],
        heads=kw.get("vision_heads") or kw["vision_hidden"] // 80, out_hidden=kw["hidden"],
        fullatt_blocks=tuple(int(i) for i in kw["vision_fullatt"].split(",")) if kw.get("vision_fullatt") else (),
    )  # fmt: skip
    selector = dict(
        nmax=kw["nmax"], rho_min=kw["rho_min"], rho_max=kw["rho_max"], tau_s=kw["tau_s"],
        scoring_layers=kw["scoring_layers"], reencode_layers=kw["reencode_layers"],
    )  # fmt: skip
    return Model(name, lm, vit, FP32, selector)
