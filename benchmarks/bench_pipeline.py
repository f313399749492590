"""Stage-by-stage latency of answering one question about a long video, with and without QTS+.

Random weights at a model's real shape (``--model tiny | 3B | 7B``), built from this package's own
modules (nothing is downloaded, vLLM is never imported). For one generated video it times, each as
the median of ``--iters`` runs after ``--warmup`` runs (CUDA events + synchronize on a GPU,
``time.perf_counter`` on the CPU):

1. ``decode_sampling``  PyAV decode of an H.264 mp4 of the chosen length at ``--source-fps`` and the
   qwen-vl-utils frame sampling (``qtsplus_vllm.video.decode_video``, CPU). The file is a 2 s clip of
   ``qtsplus_vllm.testing.videos.make_video`` looped by stream copy (a keyframe every 2 s, like
   streaming encoders). With ``--decode-minutes`` < ``--minutes`` a shorter file is decoded and the
   time scaled linearly by minutes / decoded minutes (every source frame is decoded, so the cost is
   linear in length); the frames passed on are then the decoded ones repeated to the full count.
2. ``preprocess``  ``preprocess_frames`` on ``--device``: host-to-device copy of the uint8 frames,
   qwen-vl-utils resize (max_pixels 360x420: a 16:9 frame becomes 280x504, M = T/2 * 10 * 18),
   CLIP normalisation, patchify.
3. ``vit``  ``qtsplus_vllm.vision.VisionEncoder`` around transformers' Qwen2.5-VL vision model (window
   attention; flash_attention_2 when flash-attn is installed on CUDA, else SDPA, as serving picks it)
   over the whole video in one call, as the serving runtime does. ``--vit-chunk-groups K`` runs it K
   temporal groups (2 frames each) at a time instead: the output is identical because neither its
   window attention nor its full-attention blocks cross temporal groups; only peak memory changes.
4. ``selector``  ``QTSplusSelector.select`` (1 scoring + 1 re-encode layer at the LM's D, nmax 2560,
   rho 0.05..0.5; the fused Triton scoring on CUDA when Triton is installed) on the ViT output and
   ``--question-tokens`` question embeddings. Random weights predict no real keep ratio, so rho is
   forced with ``--rho`` (default 0.5 = rho_max, the largest budget the selector can give: an upper
   bound on n, i.e. the ratios below are conservative for selection); ``--rho head`` keeps the
   random budget head's rho. n = min(max(ceil(rho * M), 1), nmax); for M >= 51,200 every rho gives n = nmax.
5. ``prefill_selected`` / ``prefill_all``  a random-weight Qwen2 decoder (fused qkv with bias, RoPE,
   causal SDPA with GQA, SwiGLU, RMSNorm; K/V written to a cache) over n resp. M visual rows plus
   ``--prompt-tokens`` text rows, then the final norm and lm_head on the last row (the first token).
6. ``decode_token_selected`` / ``decode_token_all``  one greedy decode step at context n (resp. M) +
   prompt tokens: embedding, every layer against the KV cache, lm_head, argmax; median over
   ``--decode-steps`` steps. Eager torch (no CUDA graphs): vLLM's decode is somewhat faster.
7. KV-cache bytes = 2 * layers * Hkv * Dh * tokens * dtype bytes, for n vs M (and with the prompt).

LM stages time ``--lm-layers`` materialised layers (default: all on CUDA, 2 on CPU) and scale the
layer time linearly to the full depth (``layers_timed`` / ``layers_total`` in the JSON); the
final norm + lm_head is timed separately and added once. Derived:

    TTFT_selected = decode_sampling + preprocess + vit + selector + prefill_selected
    TTFT_all      = decode_sampling + preprocess + vit + prefill_all       (no selector)
    follow-up     = selector + prefill_selected   (same video, ViT output cached, new question)

Not modelled: moving the rows between processes, scheduling, the no-selection server reusing the
video's KV for a follow-up through prefix caching (the selected video is re-selected per question).

    python benchmarks/bench_pipeline.py --model 7B --minutes 10              # GPU (bf16)
    python benchmarks/bench_pipeline.py --model tiny --minutes 1 --device cpu  # CPU (fp32)

Needs the package importable (``pip install -e . --no-deps`` next to torch, transformers, av,
qwen-vl-utils, torchvision; Triton optional). Writes one JSON file under benchmarks/results/
(machine, versions, git sha, exact command, settings, all samples) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

import qtsplus_vllm
from qtsplus_vllm.config import VIT_DEFAULTS
from qtsplus_vllm.selector import QTSplusSelector, use_triton
from qtsplus_vllm.testing.videos import make_video
from qtsplus_vllm.video import (
    PreprocessConfig,
    SamplingConfig,
    VisionInputs,
    decode_video,
    preprocess_frames,
    sample_frame_indices,
)
from qtsplus_vllm.vision import VisionEncoder, _attention_implementation

RESULTS = Path(__file__).resolve().parent / "results"
CLIP_SECONDS = 2.0
RMS_EPS = 1e-6
ROPE_THETA = 1e6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LMShape:
    hidden: int  # D
    layers: int
    heads: int  # H
    kv_heads: int  # Hkv
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:  # Dh
        return self.hidden // self.heads


QWEN25_VIT = dict(
    depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, fullatt_block_indexes=[7, 15, 23, 31]
)
MODELS = {
    # tiny = write_tiny_checkpoint's defaults (vocab: its 470 tokens rounded up to 64)
    "tiny": (
        LMShape(128, 2, 4, 2, 256, 512),
        dict(
            depth=2,
            hidden_size=160,
            num_heads=2,
            intermediate_size=96,
            fullatt_block_indexes=[],
            out_hidden_size=128,
        ),
    ),
    "3B": (LMShape(2048, 36, 16, 2, 11008, 151936), dict(QWEN25_VIT, out_hidden_size=2048)),
    "7B": (LMShape(3584, 28, 28, 4, 18944, 152064), dict(QWEN25_VIT, out_hidden_size=3584)),
}
VIT_FIXED = {k: v for k, v in VIT_DEFAULTS.items() if k != "fullatt_block_indexes"}  # per model above
SELECTOR = dict(nmax=2560, rho_min=0.05, rho_max=0.5, scoring_layers=1, reencode_layers=1)


# ----------------------------------------------------------------------------- timing


def measure(fn, device: torch.device, warmup: int, iters: int, desc: str) -> list[float]:
    """Milliseconds of ``iters`` calls of ``fn()`` after ``warmup`` calls (CUDA events on a GPU)."""
    samples = []
    with tqdm(total=warmup + iters, desc=desc, unit="run", leave=False, file=sys.stderr) as bar:
        for i in range(warmup + iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize(device)
                ms = start.elapsed_time(stop)
            else:
                clock = time.perf_counter()
                fn()
                ms = (time.perf_counter() - clock) * 1e3
            if i >= warmup:
                samples.append(ms)
            bar.update()
    return samples


class StageLog:
    """Per-stage medians, samples and (CUDA) peak memory, printed as each stage finishes."""

    def __init__(self, device: torch.device):
        self.device, self.stages, self.tracking = device, {}, False

    @contextlib.contextmanager
    def peak_memory(self):
        """Stages added inside record the device's peak allocated memory since entering."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tracking = True
        try:
            yield
        finally:
            self.tracking = False

    def add(self, name: str, median_ms: float, **extra) -> None:
        entry = {"median_ms": median_ms, **extra}
        if self.device.type == "cuda" and self.tracking:
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.stages[name] = entry
        tqdm.write(f"{name:>22}: {median_ms:10.2f} ms", file=sys.stderr)


# ----------------------------------------------------------------------------- video


def write_looped_video(path: Path, minutes: float, source_fps: float, size: tuple[int, int]) -> float:
    """An mp4 of at least ``minutes``: a 2 s clip repeated by stream copy. Returns its length in minutes."""
    clip = make_video(path.with_suffix(".clip.mp4"), round(CLIP_SECONDS * source_fps), size, source_fps)
    repeats = max(1, math.ceil(minutes * 60 / CLIP_SECONDS))
    with av.open(str(clip)) as src, av.open(str(path), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        packets = [p for p in src.demux(stream) if p.size > 0]
        span = max(p.pts + p.duration for p in packets) - min(p.pts for p in packets)  # in time_base
        for r in range(repeats):
            for p in packets:  # shifted timestamps, same bytes: no re-encoding
                dup = av.Packet(bytes(p))
                dup.pts, dup.dts, dup.duration = p.pts + r * span, p.dts + r * span, p.duration
                dup.is_keyframe, dup.time_base, dup.stream = p.is_keyframe, p.time_base, out
                dst.mux(dup)
        return float(repeats * span * stream.time_base) / 60


def sampled_frames(minutes: float, source_fps: float, fps: float) -> int:
    """T: frames qwen-vl-utils keeps from a video of ``minutes`` (fps rule, 4..768 frames, even)."""
    return len(sample_frame_indices(round(minutes * 60 * source_fps), source_fps, SamplingConfig(fps=fps)))


# ----------------------------------------------------------------------------- models


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm weights 1, biases 0, other weights ~ N(0, 1/fan_in): activations stay O(1) through depth."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0 if "norm" in name or "ln_" in name else 0.0)
        else:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
    return module


def build_vit(spec: dict, device: torch.device, dtype: torch.dtype, seed: int) -> VisionEncoder:
    """The Qwen2.5-VL ViT at ``spec`` with random weights (built on meta, materialised on device)."""
    config = Qwen2_5_VLVisionConfig(**spec, **VIT_FIXED)
    # as serving picks it; flash-attn has no fp32 kernels
    config._attn_implementation = _attention_implementation(device) if dtype != torch.float32 else "sdpa"
    with torch.device("meta"):
        vit = Qwen2_5_VisionTransformerPretrainedModel(config)
    vit = randomize_(vit.to_empty(device=device).to(dtype), seed)
    with torch.device(device):  # the fp32 rotary buffer was created on meta: rebuild it
        vit.rotary_pos_emb = type(vit.rotary_pos_emb)(config)
    return VisionEncoder(vit).eval().requires_grad_(False)


def encode_video(encoder: VisionEncoder, pixel_values: torch.Tensor, grid_thw: torch.Tensor, chunk: int):
    """X [M, D] in (t, h, w) order; ``chunk`` > 0: ``chunk`` temporal groups per ViT call (same X)."""
    t, h, w = (int(v) for v in grid_thw[0])
    if chunk <= 0 or chunk >= t:
        return encoder(pixel_values, grid_thw)
    rows = h * w  # patches per temporal group; pixel_values rows are t-major
    parts = []
    for start in range(0, t, chunk):
        k = min(chunk, t - start)
        grid = torch.tensor([[k, h, w]], dtype=grid_thw.dtype, device=grid_thw.device)
        parts.append(encoder(pixel_values[start * rows : (start + k) * rows], grid))
    return torch.cat(parts)


def build_selector(lm: LMShape, device: torch.device, dtype: torch.dtype, seed: int) -> QTSplusSelector:
    with torch.device("meta"):
        selector = QTSplusSelector(lm.hidden, lm.heads, lm.kv_heads, **SELECTOR)
    return randomize_(selector.to_empty(device=device).to(dtype), seed).eval()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half form): x [T, heads, Dh], cos/sin [T, 1, Dh]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def pick_attention(device: torch.device, dtype: torch.dtype, lm: LMShape) -> tuple[object, bool]:
    """(SDPA backend, expand K/V heads) for the LM: on CUDA the first fused kernel that runs causal GQA.

    The math backend would materialise [H, S, S] (hundreds of GB at S = 54k), so it is never allowed.
    On the CPU, SDPA's default (a flash kernel, native GQA) is used.
    """
    if device.type != "cuda":
        return None, False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, lm.heads, 64, lm.head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, lm.kv_heads, 64, lm.head_dim, device=device, dtype=dtype)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for expand in (False, True):
            try:
                with warnings.catch_warnings(), sdpa_kernel([backend]):
                    warnings.simplefilter("ignore")
                    causal_attention(q, kv, kv, expand)
                    F.scaled_dot_product_attention(
                        q[:, :, :1].reshape(1, lm.kv_heads, -1, lm.head_dim), kv, kv
                    )
                return backend, expand
            except RuntimeError:
                continue
    raise RuntimeError(f"no fused SDPA kernel runs causal GQA attention in {dtype} on {device}")


def causal_attention(q, k, v, expand: bool) -> torch.Tensor:
    """q [1, H, S, Dh], k/v [1, Hkv, S, Dh] -> [1, H, S, Dh], causal."""
    if expand:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)


class RandomQwen2:
    """A Qwen2 decoder (the Qwen2.5-VL text model) with random weights: ``timed`` layers, a KV cache
    of ``positions`` tokens, final norm and lm_head. Weights are fused as vLLM fuses them (qkv,
    gate_up). Positions are plain 1-D (DESIGN §2.8)."""

    def __init__(self, shape: LMShape, timed: int, positions: int, device, dtype, seed: int):
        self.shape, self.device = shape, device
        self.layer_scale = shape.layers / timed  # timed layers -> full depth
        d, dh, f = shape.hidden, shape.head_dim, shape.intermediate
        self.qkv_sizes = [shape.heads * dh, shape.kv_heads * dh, shape.kv_heads * dh]
        g = torch.Generator(device=device).manual_seed(seed)

        def w(rows: int, cols: int) -> torch.Tensor:
            return torch.randn(rows, cols, device=device, dtype=dtype, generator=g) * cols**-0.5

        ones = torch.ones(d, device=device, dtype=dtype)
        self.layers = [
            dict(
                qkv=w(sum(self.qkv_sizes), d),
                qkv_bias=torch.zeros(sum(self.qkv_sizes), device=device, dtype=dtype),
                o=w(d, shape.heads * dh),
                gate_up=w(2 * f, d),
                down=w(d, f),
            )
            for _ in range(timed)
        ]
        self.norm = ones
        self.lm_head = w(shape.vocab, d)  # also the (tied) embedding table of the decode step
        cache = (timed, shape.kv_heads, positions, dh)
        self.k_cache = torch.randn(cache, device=device, dtype=dtype, generator=g)
        self.v_cache = torch.randn(cache, device=device, dtype=dtype, generator=g)
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, dh, 2, device=device, dtype=torch.float32) / dh)
        angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv)
        self.cos = torch.cat([angles.cos()] * 2, -1).to(dtype)[:, None]  # [P, 1, Dh]
        self.sin = torch.cat([angles.sin()] * 2, -1).to(dtype)[:, None]
        self.backend, self.expand_kv = pick_attention(device, dtype, shape)

    def _attention_kernels(self):
        if self.backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([self.backend])

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), self.norm, RMS_EPS), layer["gate_up"]).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, layer["down"])

    def _qkv(self, x: torch.Tensor, layer: dict, start: int):
        """x [T, D] at positions start.. -> q [T, H, Dh], k/v [T, Hkv, Dh] (RoPE applied)."""
        s, dh = x.shape[0], self.shape.head_dim
        hs = F.rms_norm(x, (x.shape[-1],), self.norm, RMS_EPS)
        q, k, v = F.linear(hs, layer["qkv"], layer["qkv_bias"]).split(self.qkv_sizes, -1)
        cos, sin = self.cos[start : start + s], self.sin[start : start + s]
        q, k = rotate(q.view(s, -1, dh), cos, sin), rotate(k.view(s, -1, dh), cos, sin)
        return q, k, v.view(s, -1, dh)

    @torch.inference_mode()
    def prefill_layers(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, D] (positions 0..S-1) -> [S, D] after the timed layers; K/V written to the cache."""
        s = x.shape[0]
        with self._attention_kernels():
            for i, layer in enumerate(self.layers):
                q, k, v = self._qkv(x, layer, 0)
                self.k_cache[i, :, :s] = k.transpose(0, 1)
                self.v_cache[i, :, :s] = v.transpose(0, 1)
                a = causal_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), self.expand_kv)
                x = x + F.linear(a[0].transpose(0, 1).reshape(s, -1), layer["o"])
                x = self._mlp(x, layer)
        return x

    @torch.inference_mode()
    def decode_layers(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """One token id (0-d) at position ``pos`` against the cached 0..pos-1 -> hidden [1, D]."""
        x = self.lm_head[token][None]
        hkv, dh = self.shape.kv_heads, self.shape.head_dim
        with self._attention_kernels():
            for i, layer in enumerate(self.layers):
                q, k, v = self._qkv(x, layer, pos)
                self.k_cache[i, :, pos], self.v_cache[i, :, pos] = k[0], v[0]
                # GQA for one query token: the H query heads as [Hkv, H/Hkv] rows, no K/V copies
                a = F.scaled_dot_product_attention(
                    q.view(1, hkv, -1, dh),
                    self.k_cache[i, None, :, : pos + 1],
                    self.v_cache[i, None, :, : pos + 1],
                )
                x = x + F.linear(a.reshape(1, -1), layer["o"])
                x = self._mlp(x, layer)
        return x

    @torch.inference_mode()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy next token (0-d) from the last row of x [T, D]: final norm, lm_head, argmax."""
        return F.linear(F.rms_norm(x[-1:], (x.shape[-1],), self.norm, RMS_EPS), self.lm_head)[0].argmax()


# ----------------------------------------------------------------------------- the pipeline


def time_decode(args: argparse.Namespace, log: StageLog) -> np.ndarray:
    """Stage 1 on the CPU: write the video, time decode + sampling -> frames [T, H, W, 3] uint8."""
    sampling = SamplingConfig(fps=args.fps)
    with tempfile.TemporaryDirectory(prefix="qtsplus-bench-") as tmp:
        path = Path(tmp) / "video.mp4"
        tqdm.write(f"writing a {args.decode_minutes:g} min {args.width}x{args.height} video", file=sys.stderr)
        file_minutes = write_looped_video(
            path, args.decode_minutes, args.source_fps, (args.width, args.height)
        )
        cpu = torch.device("cpu")
        samples = measure(lambda: decode_video(path, sampling), cpu, args.warmup, args.iters, "decode")
        decoded = decode_video(path, sampling)
    scale = args.minutes / file_minutes
    log.add(
        "decode_sampling",
        statistics.median(samples) * scale,
        samples_ms=samples,
        decoded_minutes=file_minutes,
        decoded_source_frames=decoded.total_frames,
        scale=scale,
    )
    frame_count = sampled_frames(args.minutes, args.source_fps, args.fps)
    return decoded.frames[np.arange(frame_count) % len(decoded.frames)]


def time_preprocess(frames: np.ndarray, args, log: StageLog, device, dtype) -> VisionInputs:
    """Stage 2: resize / normalise / patchify on the device."""
    config = PreprocessConfig(max_pixels=args.max_pixels)
    with log.peak_memory():
        run = lambda: preprocess_frames(frames, config, device=device, dtype=dtype)  # noqa: E731
        samples = measure(run, device, args.warmup, args.iters, "preprocess")
        inputs = run()
        log.add("preprocess", statistics.median(samples), samples_ms=samples)
    return inputs


def time_vit(inputs: VisionInputs, args, log: StageLog, device, dtype) -> tuple[torch.Tensor, str]:
    """Stage 3: X [M, D] and the ViT's attention implementation."""
    encoder = build_vit(MODELS[args.model][1], device, dtype, args.seed)
    with log.peak_memory():
        run = lambda: encode_video(encoder, inputs.pixel_values, inputs.grid_thw, args.vit_chunk_groups)  # noqa: E731
        samples = measure(run, device, args.warmup, args.iters, "vit")
        x = run()
        log.add("vit", statistics.median(samples), samples_ms=samples)
    return x, encoder.vit.config._attn_implementation


def time_selector(x: torch.Tensor, args, log: StageLog, device, dtype) -> dict:
    """Stage 4: n and rho (forced, or the random budget head's) of QTSplusSelector.select on X."""
    lm_shape = MODELS[args.model][0]
    selector = build_selector(lm_shape, device, dtype, args.seed + 1)
    g = torch.Generator(device=device).manual_seed(args.seed + 2)
    q = torch.randn(args.question_tokens, lm_shape.hidden, device=device, dtype=dtype, generator=g) * 0.02
    head = selector.select(x, q)
    rho = head.rho if args.rho == "head" else float(args.rho)
    with log.peak_memory():
        run = lambda: selector.select(x, q, rho_bounds=(rho, rho))  # noqa: E731
        samples = measure(run, device, args.warmup, args.iters, "selector")
        n = run().n
        log.add("selector", statistics.median(samples), samples_ms=samples)
    impl = "triton" if use_triton(device) else "torch"
    source = "budget head" if args.rho == "head" else "forced"
    return dict(n=n, rho=rho, rho_source=source, rho_head=head.rho, n_head=head.n, selector_impl=impl)


def time_prefill(lm: RandomQwen2, label: str, s: int, args, log: StageLog) -> None:
    """Stage 5: prefill of s rows (positions 0..s-1) and the first token; layer time scaled to full depth."""
    g = torch.Generator(device=lm.device).manual_seed(args.seed + 4)
    rows = torch.randn(s, lm.shape.hidden, device=lm.device, dtype=lm.lm_head.dtype, generator=g)  # [S, D]
    with log.peak_memory():
        layers = measure(
            lambda: lm.prefill_layers(rows), lm.device, args.warmup, args.iters, f"prefill {label}"
        )
        head = measure(lambda: lm.head(rows), lm.device, args.warmup, args.iters, f"head {label}")
        log.add(
            f"prefill_{label}",
            statistics.median(layers) * lm.layer_scale + statistics.median(head),
            tokens=s,
            samples_ms=layers,
            head_samples_ms=head,
        )


def time_decode_token(lm: RandomQwen2, label: str, s: int, args, log: StageLog) -> None:
    """Stage 6: one greedy decode step at context s (positions s, s+1, ...); layer time scaled."""
    token, positions = torch.tensor(0, device=lm.device), iter(range(s, s + args.warmup + args.decode_steps))
    hidden = lm.decode_layers(token, s)
    with log.peak_memory():
        step = lambda: lm.decode_layers(token, next(positions))  # noqa: E731
        layers = measure(step, lm.device, args.warmup, args.decode_steps, f"decode {label}")
        head = measure(
            lambda: lm.head(hidden), lm.device, args.warmup, args.decode_steps, f"decode head {label}"
        )
        log.add(
            f"decode_token_{label}",
            statistics.median(layers) * lm.layer_scale + statistics.median(head),
            context=s,
            samples_ms=layers,
            head_samples_ms=head,
        )


def run_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """All stages in serving order; returns the measured part of the result."""
    lm_shape = MODELS[args.model][0]
    log = StageLog(device)
    frames = time_decode(args, log)
    inputs = time_preprocess(frames, args, log, device, dtype)
    del frames
    x, vit_attention = time_vit(inputs, args, log, device, dtype)
    t, h, w = (int(v) for v in inputs.grid_thw[0])
    video = dict(frames_sampled=inputs.num_frames, resized_hw=list(inputs.resized_size), grid_thw=[t, h, w])
    m = video["M"] = inputs.num_visual_tokens
    del inputs
    video.update(time_selector(x, args, log, device, dtype))
    n = video["n"]
    del x

    # (5) prefill and (6) decode per token, n vs M visual rows + the prompt's text rows
    lengths = {"selected": n + args.prompt_tokens, "all": m + args.prompt_tokens}
    positions = lengths["all"] + args.warmup + args.decode_steps + 1
    lm = RandomQwen2(lm_shape, args.lm_layers, positions, device, dtype, args.seed + 3)
    for label, s in lengths.items():
        time_prefill(lm, label, s, args, log)
        time_decode_token(lm, label, s, args, log)
    lm_attention = "cpu-default" if lm.backend is None else getattr(lm.backend, "name", str(lm.backend))
    lm_attention += " (K/V heads expanded)" if lm.expand_kv else " (native GQA)"
    del lm

    # (7) KV cache
    per_token = 2 * lm_shape.layers * lm_shape.kv_heads * lm_shape.head_dim * dtype.itemsize
    kv = {
        "bytes_per_token": per_token,
        "visual_selected": per_token * n,
        "visual_all": per_token * m,
        "prompt_selected": per_token * lengths["selected"],
        "prompt_all": per_token * lengths["all"],
    }
    return dict(
        video=video,
        implementations=dict(
            vit_attention=vit_attention, lm_attention=lm_attention, selector=video.pop("selector_impl")
        ),
        layers_timed=args.lm_layers,
        layers_total=lm_shape.layers,
        stages=log.stages,
        kv_cache=kv,
        derived=derive(log.stages, kv),
    )


def derive(stages: dict, kv: dict) -> dict:
    """TTFTs with and without selection, the follow-up question, and their ratios."""
    ms = {name: stage["median_ms"] for name, stage in stages.items()}
    shared = ms["decode_sampling"] + ms["preprocess"] + ms["vit"]
    ttft_selected = shared + ms["selector"] + ms["prefill_selected"]
    ttft_all = shared + ms["prefill_all"]
    followup = ms["selector"] + ms["prefill_selected"]
    return dict(
        ttft_selected_ms=ttft_selected,
        ttft_all_ms=ttft_all,
        followup_selected_ms=followup,
        ttft_ratio_selected_over_all=ttft_selected / ttft_all,
        followup_over_cold=followup / ttft_selected,
        prefill_ratio_selected_over_all=ms["prefill_selected"] / ms["prefill_all"],
        decode_token_ratio_selected_over_all=ms["decode_token_selected"] / ms["decode_token_all"],
        kv_ratio_selected_over_all=kv["visual_selected"] / kv["visual_all"],
    )


# ----------------------------------------------------------------------------- record


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),  # other work on the machine skews CPU timings
    }
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "qtsplus_vllm": qtsplus_vllm.__version__}
    for name in (
        "torch",
        "transformers",
        "triton",
        "pytorch-triton",
        "flash-attn",
        "av",
        "torchvision",
        "qwen-vl-utils",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def git_state() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.check_output(["git", *cmd], cwd=Path(__file__).parent, text=True).strip()

    try:
        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": "unknown", "git_dirty": None}


def print_table(result: dict) -> None:
    video, stages, derived = result["video"], result["stages"], result["derived"]
    s = result["settings"]
    print(
        f"\n{s['model']} on {result['machine'].get('gpu') or result['machine'].get('cpu', 'cpu')} ({s['dtype']}): "
        f"{s['minutes']:g} min at {s['fps']:g} fps -> T={video['frames_sampled']} frames "
        f"{video['resized_hw'][0]}x{video['resized_hw'][1]}, M={video['M']}, n={video['n']} (rho={video['rho']:.3f}); "
        f"LM layers timed {result['layers_timed']}/{result['layers_total']}"
    )
    print(f"{'stage':<24}{'median ms':>12}  note")
    notes = {
        "decode_sampling": f"x{stages['decode_sampling']['scale']:.2f} of a {stages['decode_sampling']['decoded_minutes']:g} min decode",
        "prefill_selected": f"{stages['prefill_selected']['tokens']} tokens",
        "prefill_all": f"{stages['prefill_all']['tokens']} tokens",
        "decode_token_selected": f"context {stages['decode_token_selected']['context']}",
        "decode_token_all": f"context {stages['decode_token_all']['context']}",
    }
    for name, stage in stages.items():
        peak = f"  peak {stage['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in stage else ""
        print(f"{name:<24}{stage['median_ms']:>12.2f}  {notes.get(name, '')}{peak}")
    kv = result["kv_cache"]
    print(
        f"{'KV cache visual n / M':<24}{kv['visual_selected'] / 2**20:>9.1f} MiB / {kv['visual_all'] / 2**20:.1f} MiB"
    )
    print(f"{'TTFT selected':<24}{derived['ttft_selected_ms']:>12.2f}")
    print(f"{'TTFT all tokens':<24}{derived['ttft_all_ms']:>12.2f}")
    print(f"{'follow-up selected':<24}{derived['followup_selected_ms']:>12.2f}  ViT output cached")
    print(
        f"ratios: TTFT sel/all {derived['ttft_ratio_selected_over_all']:.3f}, follow-up/cold "
        f"{derived['followup_over_cold']:.3f}, prefill n/M {derived['prefill_ratio_selected_over_all']:.3f}, "
        f"decode/token {derived['decode_token_ratio_selected_over_all']:.3f}, KV {derived['kv_ratio_selected_over_all']:.3f}"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), help="shapes (default: 7B on CUDA, tiny on CPU)")
    p.add_argument("--minutes", type=float, help="video length (default 10; --quick 0.5)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (qwen-vl-utils rule)")
    p.add_argument("--source-fps", type=float, default=30.0, help="frame rate of the generated video")
    p.add_argument("--height", type=int, help="source frame height (default 720; --quick 360)")
    p.add_argument("--width", type=int, help="source frame width (default 1280; --quick 640)")
    p.add_argument("--max-pixels", type=int, default=360 * 420, help="resize bound per frame")
    p.add_argument(
        "--decode-minutes",
        type=float,
        help="decode this much and scale (default: all on CUDA, <= 0.25 on CPU)",
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, help="timed runs per stage (default 5 on CUDA, 3 on CPU; --quick 1)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 1; --quick 0)")
    p.add_argument("--decode-steps", type=int, help="timed decode steps (default 16; --quick 4)")
    p.add_argument(
        "--lm-layers", type=int, help="LM layers timed, scaled to full depth (default: all on CUDA, 2 on CPU)"
    )
    p.add_argument("--rho", default="0.5", help="forced keep ratio in (0, 1], or 'head' (random budget head)")
    p.add_argument(
        "--prompt-tokens", type=int, default=64, help="text tokens of the prompt besides the video"
    )
    p.add_argument("--question-tokens", type=int, default=16, help="L: question tokens the selector reads")
    p.add_argument("--vit-chunk-groups", type=int, default=0, help="temporal groups per ViT call; 0 = all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 0.5 min, 360x640, 1 iteration, no warm-up"
    )
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/pipeline-...json)")
    args = p.parse_args(argv)

    on_cuda = torch.device(args.device).type == "cuda"
    quick = args.quick
    defaults = dict(
        model="7B" if on_cuda else "tiny",
        minutes=0.5 if quick else 10.0,
        height=360 if quick else 720,
        width=640 if quick else 1280,
        dtype="bf16" if on_cuda else "fp32",
        iters=1 if quick else 5 if on_cuda else 3,
        warmup=0 if quick else 1,
        decode_steps=4 if quick else 16,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    layers_total = MODELS[args.model][0].layers
    if args.lm_layers is None:
        args.lm_layers = layers_total if on_cuda else min(2, layers_total)
    if args.decode_minutes is None:
        args.decode_minutes = args.minutes if on_cuda else min(args.minutes, 0.25)

    problems = []
    for key in ("minutes", "fps", "source_fps", "decode_minutes"):
        value = getattr(args, key)
        if not (value > 0 and math.isfinite(value)):
            problems.append(f"--{key.replace('_', '-')} must be a positive number, got {value}")
    if args.decode_minutes > args.minutes:
        problems.append(f"--decode-minutes {args.decode_minutes} exceeds --minutes {args.minutes}")
    for key, low in (("height", 2), ("width", 2), ("iters", 1), ("warmup", 0), ("decode_steps", 1),
                     ("prompt_tokens", 0), ("question_tokens", 1), ("vit_chunk_groups", 0), ("max_pixels", 1)):  # fmt: skip
        if getattr(args, key) < low:
            problems.append(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    if args.height % 2 or args.width % 2:
        problems.append(f"--height/--width must be even (yuv420p), got {args.height}x{args.width}")
    if not 1 <= args.lm_layers <= layers_total:
        problems.append(f"--lm-layers must be in [1, {layers_total}] for {args.model}, got {args.lm_layers}")
    if args.rho != "head":
        try:
            rho = float(args.rho)
        except ValueError:
            rho = math.nan
        if not 0 < rho <= 1:
            problems.append(f"--rho must be a number in (0, 1] or 'head', got {args.rho!r}")
        args.rho = rho
    if on_cuda and not torch.cuda.is_available():
        problems.append(f"--device {args.device} but CUDA is not available")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    clock, load_before = time.perf_counter(), os.getloadavg()
    measured = run_pipeline(args, device, dtype)
    lm_shape, vit_spec = MODELS[args.model]
    result = {
        "benchmark": "pipeline",
        "command": shlex.join(["python", "benchmarks/bench_pipeline.py", *argv]),
        **git_state(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(device), "load_average_at_start": load_before},
        "versions": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": {"lm": asdict(lm_shape), "vit": {**vit_spec, **VIT_FIXED}, "selector": SELECTOR},
        **measured,
        "wall_s": time.perf_counter() - clock,
    }
    minutes = f"{args.minutes:g}".replace(".", "p")
    out = (
        args.out
        or RESULTS / f"pipeline-{args.model}-{minutes}min-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
