"""What one in-flight video costs in memory, from the streamed media path's own bounds (issue 12).

A pure model (no allocation, no vLLM): every term is a shape the code allocates, taken from the same
functions the code uses (``decode_size``, ``target_size``, ``chunk_frames_for``, ``resize_batch_for``).
The section "Memory per in-flight video" of docs/long-videos.md is generated from :func:`request_memory` and
:func:`worst_case_request`, and ``tests/e2e/test_memory_bound.py`` checks the bound on a real server.

Where a request's bytes live, and for how long:

held for the whole request (every request in flight at once)
    ``encoded``   vLLM's copy of the encoded bytes (``MediaWithBytes.original_bytes``); our
                  ``EncodedVideo`` is a view of it and vLLM hashes it in place. A ``file://`` URL is
                  read once (1×E); an ``http(s)`` body is joined from its chunks (2×E while joining);
                  a ``data:`` URL is also held as base64 text, in the raw body and the parsed JSON
                  (1 + 2·4/3 ≈ 3.7×E).
    ``rows``      the n×D rows the processor returns, in ≤ 4 places: the processor's result, the
                  IPC message to the engine core, the engine core's processor cache (bounded by
                  ``--mm-processor-cache-gb``) and the model runner's encoder cache.
    ``features``  the [M, D] ViT features (model dtype), allocated once per video; the ViT-feature
                  cache keeps them after the request (bounded in total by ``QTSPLUS_FEATURE_CACHE_BYTES``).
    ``prepared``  decoded ahead in the loader (``QTSPLUS_PREPARE_IN_LOADER``; the model assumes every
                  video is, which ``auto`` never exceeds): the resized uint8 frames, T·3·h·w, from
                  the media thread until the processor has encoded them.

the loader's working set (every video being decoded ahead, in vLLM's media threads, at once)
    ``decoded_chunks`` of one resize batch each, the ``decoder`` and the ``resize`` batch below.

working set of the video being encoded (one per API server: ``SelectionRuntime.select`` holds the
runtime's lock from decode to selection, so the videos of one API server are encoded one at a time;
for a video decoded ahead only ``chunk_pixels``, ``vit`` and ``selector`` apply)
    ``decoded_chunks``  (QUEUE_CHUNKS + 2) chunks of c decoded RGB frames (Hd×Wd×3), c from
                        ``chunk_frames_for`` (≤ 96 MiB per chunk);
    ``decoder``         FFmpeg's frames at the *source* size (yuv420: 1.5 B/px): 16 references plus one
                        per frame thread, and the RGB conversion and its copy into the chunk;
    ``resize``          one resize batch (``resize_batch_for``): the contiguous uint8 batch, its float
                        copy, the horizontal pass and the output;
    ``chunk_pixels``    a chunk's resized float frames, the normalisation temporaries and the
                        patchified copy: 4 × c×3×h×w×4 B (the pixel_values alone: c×3×h×w×4 B);
    ``vit``             the ViT's activations for one chunk of P_c = c/2·(h/14)·(w/14) patches
                        (hidden states, qkv, the MLP's gate/up/act, the merger) plus the attention of
                        one temporal patch;
    ``selector``        the larger of the kv RMSNorm's fp32 temporaries (3×M×D×4 B) and the keys plus
                        the eager scoring's logits and softmax (2 × H/Hkv × L × M × 4 B per kv group),
                        plus the re-encode attention over the n kept rows (CPU: SDPA with GQA takes the
                        math path, ≈ 2.5 × H×n²×4 B; CUDA: fused kernels, n-linear).

The decode stages and the ViT run while the selector does not, so the processor's working set is
``decoded_chunks + decoder + max(resize + chunk_pixels, pixel_values + vit)`` (streamed) or
``max(chunk_pixels, vit)`` (decoded ahead), or the selector's, whichever is larger, on top of the
video's features. With N videos in flight on one API server:

    peak ≤ Σ_i (held_i + features_i + loader_i) + max_i processor_i

and per video ``request_memory(...).total`` (N = 1) bounds it: N videos take at most N times that.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from .limits import Limits
from .streaming import (
    CHUNK_BYTES,
    QUEUE_CHUNKS,
    RESIZE_BATCH,
    RESIZE_BYTES,
    chunk_frames_for,
    prepare_chunk_frames,
    resize_batch_for,
)
from .video import PreprocessConfig, VideoDecodeError, decode_size, target_size

MiB = 1 << 20
GiB = 1 << 30

SOURCE_COPIES = {"file": 1.0, "http": 2.0, "data": 1.0 + 2 * 4 / 3}
ROW_COPIES = 4  # processor result, IPC message, engine-core processor cache, encoder cache
DECODER_REFERENCE_FRAMES = 16  # H.264's largest decoded picture buffer
PIXEL_COPIES = 4  # resized float frames, two normalisation temporaries, the patchified copy
REENCODE_MATH_FACTOR = 2.5  # CPU SDPA (GQA, math path): scores + softmax + repeated K/V, measured 2.43
VIT_HIDDEN_TENSORS = 6  # residual, norm, attention output, merger input... (× P_c × Dv)
VIT_MLP_TENSORS = 3  # gate, up, act(gate)·up (× P_c × Iv)
VIT_QKV_TENSORS = 3
VIT_ATTENTION_FACTOR = 2  # scores and softmax of one sequence (a temporal patch), fp32


@dataclass(frozen=True)
class ModelShapes:
    """The shapes that size a video's memory (DESIGN §2): LM hidden D, selector heads H/Hkv, the ViT,
    nmax, and the selection runtime's dtype in bytes (its ViT activations, features and rows)."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    vit_hidden: int
    vit_intermediate: int
    vit_heads: int
    nmax: int
    dtype_bytes: int


# tiny: write_tiny_checkpoint's defaults, served in fp32 by the tests
TINY = ModelShapes("tiny", 128, 4, 2, 160, 96, 2, 256, 4)
# the released checkpoints (Qwen2.5-VL-3B/7B text + their ViT), bf16
QTSPLUS_3B = ModelShapes("3B", 2048, 16, 2, 1280, 3420, 16, 2560, 2)
QTSPLUS_7B = ModelShapes("7B", 3584, 28, 4, 1280, 3420, 16, 2560, 2)
MODELS = {m.name: m for m in (TINY, QTSPLUS_3B, QTSPLUS_7B)}
# the stated budget per request for the worst case the default QTSPLUS_* limits admit (CPU runtime,
# default processing settings): worst_case_request(model).total stays within it
WORST_CASE_BUDGET = {"tiny": 2 * GiB, "3B": 6 * GiB, "7B": 8 * GiB}
TABLE_BITRATES = {720: 2_500_000, 1080: 5_000_000}  # bits/s assumed for the docs table


@dataclass(frozen=True)
class RequestMemory:
    """The terms of one in-flight video, in bytes (module docstring), and the geometry they came from."""

    held: dict[str, int]
    features: int
    working: dict[str, int]
    decode_size: tuple[int, int]  # (width, height)
    resized: tuple[int, int]  # (height, width)
    kept_frames: int  # T, padded to even
    visual_tokens: int  # M
    selected: int  # n
    chunk_frames: int
    chunk_patches: int
    device_terms: tuple[str, ...] = field(default=())
    prepare: bool = True  # QTSPLUS_PREPARE_IN_LOADER: decoded and resized in a media thread
    encode: bool = False  # QTSPLUS_PREPARE_IN_LOADER=vit: decoded into the ViT in a media thread

    @property
    def held_bytes(self) -> int:
        return sum(self.held.values())

    @property
    def loader_bytes(self) -> int:
        """The media thread's working set while it decodes and resizes this video (0 when the
        processor decodes it): every video being loaded has its own, at the same time."""
        w = self.working
        if self.encode:  # the streamed path's working set, in the media thread
            return w["decoded_chunks"] + w["decoder"] + max(w["resize"] + w["chunk_pixels"], w["vit"])
        return w["decoded_chunks"] + w["decoder"] + w["resize"] if self.prepare else 0

    @property
    def processor_bytes(self) -> int:
        """The processor's working set for this video (one video at a time per API server)."""
        w = self.working
        if self.encode:  # the loader ran the ViT: the processor only selects
            return w["selector"]
        if self.prepare:
            encode = max(w["chunk_pixels"], w["vit"])
        else:
            encode = w["decoded_chunks"] + w["decoder"] + max(w["resize"] + w["chunk_pixels"], w["vit"])
        return max(encode, w["selector"])

    @property
    def working_bytes(self) -> int:
        """The larger of the two working sets (the video alone: loading ends before processing)."""
        return max(self.loader_bytes, self.processor_bytes)

    @property
    def total(self) -> int:
        """The video alone in flight: what it holds, its features and its working set."""
        return self.held_bytes + self.features + self.working_bytes

    def host_bytes(self) -> int:
        """Bytes in host memory (on a CUDA runtime the pixels, ViT, features and selector are not)."""
        if not self.device_terms:
            return self.total
        w = self.working
        held = sum(v for k, v in self.held.items() if k not in self.device_terms)
        return held + w["decoded_chunks"] + w["decoder"]


def vit_activation_bytes(patches: int, per_sequence: int, model: ModelShapes) -> int:
    """The ViT's live activations for ``patches`` patches whose longest attention sequence (one
    temporal patch, in full-attention blocks) is ``per_sequence`` patches."""
    b = model.dtype_bytes
    dense = (
        patches
        * b
        * (
            (VIT_HIDDEN_TENSORS + VIT_QKV_TENSORS) * model.vit_hidden
            + VIT_MLP_TENSORS * model.vit_intermediate
        )
    )
    attention = VIT_ATTENTION_FACTOR * model.vit_heads * per_sequence**2 * 4
    merged = patches // 4 * model.hidden * b
    return dense + attention + merged


def selector_bytes(m: int, n: int, question_tokens: int, model: ModelShapes, device: str = "cpu") -> int:
    """The selector's peak intermediates for M visual tokens, L question tokens and n kept rows."""
    d, h, hkv = model.hidden, model.heads, model.kv_heads
    dh = d // h
    norm = 3 * m * d * 4  # fp32 copy, normed, weight·normed (RMSNormFp32)
    scoring = (
        m * hkv * dh * model.dtype_bytes + m * dh * 4 + 2 * (h // hkv) * question_tokens * m * 4 + 12 * m
    )
    if device == "cpu":
        reencode = int(REENCODE_MATH_FACTOR * h * n * n * 4)
    else:
        reencode = 0
    reencode += n * (4 * d + 4 * d) * model.dtype_bytes  # q/k/v/out rows and the FFN's 4D
    return max(norm, scoring) + reencode


def request_memory(
    *,
    encoded_bytes: int,
    width: int,
    height: int,
    kept_frames: int,
    model: ModelShapes = TINY,
    question_tokens: int = 64,
    selected: int | None = None,
    preprocess: PreprocessConfig | None = None,
    limits: Limits | None = None,
    chunk_setting: int | None = None,
    decoder_threads: int = 3,
    source: str = "file",
    device: str = "cpu",
    prepare: bool = True,
    encode: bool = False,
    select: bool = True,
) -> RequestMemory:
    """The memory one in-flight video takes (module docstring), from its encoded size, its source
    frame size (width × height), the frames it keeps, the model and the settings.

    ``selected``: n (default the most it can be, min(nmax, M)). ``decoder_threads``: FFmpeg's frame
    threads (it uses cores + 1, at most 16). ``source``: ``file``, ``http`` or ``data`` (how many
    copies of the encoded bytes vLLM holds). ``device``: where the runtime runs (``cpu`` or ``cuda``).
    ``prepare``: ``QTSPLUS_PREPARE_IN_LOADER=1`` (the loader decodes and resizes). ``encode``:
    ``QTSPLUS_PREPARE_IN_LOADER=vit``, the server's default (the loader decodes the video as a stream
    into the ViT; nothing is held resized, each loading video has the streamed path's working set and
    the processor's is the selector's); it overrides ``prepare``. ``select=False``: the request turns
    the selection off (``qtsplus_select: false``): its rows are all M visual tokens (n = M) and no
    selector runs.
    """
    preprocess = preprocess or PreprocessConfig()
    limits = limits or Limits()
    t = kept_frames + kept_frames % 2
    wd, hd = decode_size(width, height, limits.decode_max_pixels)
    h, w = target_size(hd, wd, t, preprocess)
    p, f = preprocess.patch_size, preprocess.factor
    m = t // 2 * (h // f) * (w // f)
    if not select:
        n = m  # every ViT token is a row for the LM
    else:
        n = min(model.nmax, m) if selected is None else selected
    c = min(chunk_frames_for(hd, wd, chunk_setting, (h // p) * (w // p)), t)
    prepare = prepare and not encode
    decoded = min(prepare_chunk_frames(hd, wd), t) if prepare else c  # frames per decoded chunk
    batch = resize_batch_for(hd, wd)
    per_pair = (h // p) * (w // p)
    chunk_patches = c // 2 * per_pair
    frame_out = h * w * 3 * 4
    held = {
        "encoded": int(SOURCE_COPIES[source] * encoded_bytes),
        "rows": ROW_COPIES * n * model.hidden * model.dtype_bytes,
    }
    if prepare:  # the resized uint8 frames, from the loader until the processor is done
        held["prepared"] = t * 3 * h * w
    working = {
        "decoded_chunks": (QUEUE_CHUNKS + 2) * decoded * hd * wd * 3,
        "decoder": int((DECODER_REFERENCE_FRAMES + decoder_threads) * width * height * 1.5) + 2 * hd * wd * 3,
        "resize": batch * (hd * wd * 3 + hd * wd * 3 * 4 + hd * w * 3 * 4 + frame_out),
        "chunk_pixels": PIXEL_COPIES * c * frame_out,
        "vit": c * frame_out * model.dtype_bytes // 4 + vit_activation_bytes(chunk_patches, per_pair, model),
        "selector": selector_bytes(m, n, question_tokens, model, device) if select else 0,
    }
    return RequestMemory(
        held=held,
        features=m * model.hidden * model.dtype_bytes,
        working=working,
        decode_size=(wd, hd),
        resized=(h, w),
        kept_frames=t,
        visual_tokens=m,
        selected=n,
        chunk_frames=c,
        chunk_patches=chunk_patches,
        device_terms=() if device == "cpu" else ("rows",),
        prepare=prepare,
        encode=encode,
    )


def peak_bytes(requests: list[RequestMemory], api_servers: int = 1) -> int:
    """Peak memory over idle for these videos in flight at once on ``api_servers`` API servers: all
    that they hold, their features and their loaders' working sets (videos load in parallel), plus
    the largest processor working sets (one per API server)."""
    held = sum(r.held_bytes + r.features + r.loader_bytes for r in requests)
    working = sorted((r.processor_bytes for r in requests), reverse=True)[:api_servers]
    return held + sum(working)


def kept_frames_for(seconds: float, source_fps: float, fps: float = 1.0, max_frames: int = 768) -> int:
    """qwen-vl-utils' ``smart_nframes`` for the defaults (min 4 frames): the frames a video keeps."""
    total = max(1, round(seconds * source_fps))
    n = min(max(seconds * fps, 4), max_frames, total)
    return max(2, int(n) - int(n) % 2)


# -- what the limits admit -------------------------------------------------------------------------


def worst_case_request(
    model: ModelShapes,
    limits: Limits | None = None,
    preprocess: PreprocessConfig | None = None,
    source: str = "file",
    decoder_threads: int = 3,
    select: bool = True,
    encode: bool = False,
) -> RequestMemory:
    """An upper bound of :func:`request_memory` over every video the limits admit at these settings
    (``select=False``: for a request that turns the selection off — all M rows, no selector;
    ``encode``: the loader streams into the ViT, ``QTSPLUS_PREPARE_IN_LOADER=vit``).

    Each term at its own maximum: the encoded size ``QTSPLUS_MAX_VIDEO_BYTES``; the decoder at the
    largest source frame (``QTSPLUS_MAX_FRAME_PIXELS``); the chunk, resize and ViT terms at the largest
    decode size (``QTSPLUS_DECODE_MAX_PIXELS``, in four aspect ratios) with the most frames
    ``QTSPLUS_MAX_FRAMES`` and ``QTSPLUS_MAX_VIT_PATCHES`` allow; the features and the selector at
    M = ``QTSPLUS_MAX_VIT_PATCHES`` / 4 (reached by very wide, small frames), a question of
    ``QTSPLUS_MAX_QUESTION_TOKENS`` tokens and n = nmax. No single video reaches all of them at once.
    """
    limits = limits or Limits()
    preprocess = preprocess or PreprocessConfig()
    estimates = []
    for width, height in _candidate_sizes(limits, preprocess):
        t = _most_frames(width, height, limits, preprocess)
        if t is None:
            continue
        estimates.append(
            request_memory(
                encoded_bytes=limits.max_video_bytes,
                width=width,
                height=height,
                kept_frames=t,
                model=model,
                question_tokens=limits.max_question_tokens,
                preprocess=preprocess,
                limits=limits,
                decoder_threads=decoder_threads,
                source=source,
                select=select,
                encode=encode,
            )
        )
    top = max(estimates, key=lambda e: e.working_bytes)
    m = limits.max_vit_patches // preprocess.merge_size**2
    n = min(model.nmax, m) if select else m
    working = {k: max(e.working[k] for e in estimates) for k in top.working}
    if select:
        working["selector"] = max(
            working["selector"], selector_bytes(m, n, limits.max_question_tokens, model)
        )
    held = {k: max(e.held[k] for e in estimates) for k in top.held}
    held["rows"] = ROW_COPIES * n * model.hidden * model.dtype_bytes
    return replace(
        top,
        held=held,
        working=working,
        features=max(top.features, m * model.hidden * model.dtype_bytes),
        visual_tokens=max(top.visual_tokens, m),
        selected=n,
    )


def _candidate_sizes(
    limits: Limits, preprocess: PreprocessConfig | None = None, chunk_setting: int | None = None
) -> list[tuple[int, int]]:
    """Source sizes where a term peaks: the largest frame (the decoder), the largest frames whose
    chunk and resize batch still hold every frame of their settings, in four aspects, and the frame
    that resizing makes largest."""
    from .streaming import stream_chunk_frames

    full_chunk = CHUNK_BYTES // (3 * (chunk_setting or stream_chunk_frames()))
    sizes = set()
    full_batch = RESIZE_BYTES // (RESIZE_BATCH * 3 * 6)  # resize_batch_for's per-frame bytes
    for pixels in (limits.max_frame_pixels, min(full_chunk, limits.decode_max_pixels), full_batch):
        for aw, ah in ((16, 9), (4, 3), (1, 1), (21, 9)):
            k = math.isqrt(pixels // (aw * ah))
            sizes.add((aw * k - aw * k % 2, ah * k - ah * k % 2))
    sizes.add(_largest_resized_source(preprocess or PreprocessConfig()))
    return sorted(sizes)


@functools.cache
def _largest_resized_source(preprocess: PreprocessConfig) -> tuple[int, int]:
    """The small, very wide source frame that resizing makes largest: ``smart_resize`` scales it up to
    ``min_pixels`` and rounds both sides up to multiples of 28 (19×2432 → 56×3612 at the defaults)."""
    best, size = 0, (2, 2)
    for height in range(1, 65):
        for ratio in range(1, 201):
            width = height * ratio
            try:
                h, w = target_size(height, width, 2, preprocess)
            except (ValueError, VideoDecodeError):
                continue
            if h * w > best:
                best, size = h * w, (width, height)
    return size


def _most_frames(width: int, height: int, limits: Limits, preprocess: PreprocessConfig) -> int | None:
    """The most frames (even) a video of this frame size may keep within the frame and patch limits."""
    wd, hd = decode_size(width, height, limits.decode_max_pixels)
    t = limits.max_frames - limits.max_frames % 2
    while t >= 2:
        h, w = target_size(hd, wd, t, preprocess)
        if t // 2 * (h // preprocess.patch_size) * (w // preprocess.patch_size) <= limits.max_vit_patches:
            return t
        t -= 2
    return None


def budget_table(
    model: ModelShapes, resolutions=((1280, 720), (1920, 1080)), minutes=(10, 30, 60), bitrates=None
) -> list[dict]:
    """Rows of the docs table (docs/long-videos.md): a 30 fps video of each size and length at the default settings."""
    bitrates = bitrates or TABLE_BITRATES
    rows = []
    for width, height in resolutions:
        for length in minutes:
            seconds = 60.0 * length
            encoded = int(bitrates[height] * seconds / 8)
            estimate = request_memory(
                encoded_bytes=encoded,
                width=width,
                height=height,
                kept_frames=kept_frames_for(seconds, 30.0),
                model=model,
            )
            rows.append(
                {"resolution": f"{height}p", "minutes": length, "encoded": encoded, "estimate": estimate}
            )
    return rows


def readme_tables(limits: Limits | None = None) -> str:
    """The tables of docs/long-videos.md (section "Memory per in-flight video"), from this model."""
    limits = limits or Limits()
    lines = [
        "| video | min | model | encoded | M | held | features | working set | one video | 4 in flight |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("3B", "7B"):
        for row in budget_table(MODELS[name]):
            e = row["estimate"]
            over = " (413)" if row["encoded"] > limits.max_video_bytes else ""
            lines.append(
                f"| {row['resolution']} | {row['minutes']} | {name} | {row['encoded'] / MiB:,.0f} MiB{over} "
                f"| {e.visual_tokens:,} | {e.held_bytes / MiB:,.0f} MiB | {e.features / MiB:,.0f} MiB "
                f"| {e.working_bytes / MiB:,.0f} MiB | {e.total / GiB:.2f} GiB | {peak_bytes([e] * 4) / GiB:.2f} GiB |"
            )
    lines += [
        "",
        "| model | worst case per request | budget | of which: encoded | features | selector | decoder |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("tiny", "3B", "7B"):
        w = worst_case_request(MODELS[name], limits)
        lines.append(
            f"| {name} | {w.total / GiB:.2f} GiB | {WORST_CASE_BUDGET[name] / GiB:g} GiB "
            f"| {w.held['encoded'] / MiB:,.0f} MiB | {w.features / MiB:,.0f} MiB "
            f"| {w.working['selector'] / MiB:,.0f} MiB | {w.working['decoder'] / MiB:,.0f} MiB |"
        )
    return "\n".join(lines)


def with_setting(limits: Limits, **changes) -> Limits:
    """``limits`` with some fields changed (the unit tests' what-ifs)."""
    return replace(limits, **changes)


__all__ = [
    "CHUNK_BYTES",
    "GiB",
    "MODELS",
    "MiB",
    "QTSPLUS_3B",
    "QTSPLUS_7B",
    "TINY",
    "ModelShapes",
    "RequestMemory",
    "WORST_CASE_BUDGET",
    "budget_table",
    "readme_tables",
    "kept_frames_for",
    "peak_bytes",
    "request_memory",
    "selector_bytes",
    "vit_activation_bytes",
    "worst_case_request",
]
