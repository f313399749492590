"""The reference's frame resize, bit for bit, at a fraction of its cost (CPU, uint8 frames).

qwen-vl-utils resizes each frame with ``torchvision.transforms.functional.resize(frames, size,
BICUBIC, antialias=True)`` on uint8 frames: torchvision converts them to float32, ATen's separable
antialiased kernel (``separable_upsample_generic_Nd_kernel_impl``, ``aten/src/ATen/native/cpu/
UpSampleKernel.cpp``) resamples the last dimension (width) and then the one before (height), and the
result is clamped to [0, 255] and rounded half to even (``torch.round``) back to uint8. ATen's float
kernel is scalar and walks a TensorIterator per output value: tens of ms of one core per 720p frame.

This module computes the same values with two banded passes compiled by numba (which vLLM itself
depends on), vectorised across rows; :func:`resize_uint8` returns ``None`` where it does not apply
(no numba, not a CPU uint8 tensor, a build whose arithmetic is not reproduced) and the caller then
runs torchvision. Everything that decides the values is taken from ATen or checked against it:

* **Windows** (``xmin``, ``xsize`` of each output, per axis): ATen's formula in its precisions —
  ``scale = float(in) / out``, ``support = 2·scale`` (bicubic, downscaling; 2 when upscaling),
  ``center = float(scale · (i + 0.5))``, ``xmin = max(int(center − support + 0.5), 0)``,
  ``xsize = min(int(center + support + 0.5), in) − xmin``, at most ``2·ceil(support) + 1``.
* **Weights**: ATen's own, read back from the kernel as its response to unit impulses (one output
  of a single-axis resize of a one-hot row is exactly ``1·w``), so whichever way the build computes
  the a = −0.5 cubic and the normalisation (x86 wheels contract it into FMAs), they are its weights.
* **Accumulation order and rounding**: ATen sums a window in order, ``acc = x₀·w₀; acc += xₖ·wₖ``,
  in float32. As compiled in the x86 wheels (AVX2 and AVX-512 kernels), the loop handles four taps
  at a time with rounded products and rounded sums, and the remaining ``(xsize − 1) % 4`` taps as
  fused multiply-adds (one rounding each); a build without FMA rounds every step. Both variants are
  implemented (exact FMAs through ``llvm.fma``); the first use checks which one reproduces
  torchvision on random frames and disables this path if none does, and every (source, target)
  size pair's tables are checked against ATen on random rows (both passes) before they are used.
* **Layout**: frames are read channels-last ([T, H, W, 3], what the decoder produces; a channels-last
  view costs no copy), the width pass transposes tiles of rows so that both passes run over
  contiguous rows, and the height pass writes the rounded uint8 [T, 3, h, w] directly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_VARIANTS = ("fma4", "plain")  # accumulation schemes (see the module docstring), most likely first


@dataclass(frozen=True)
class AxisTable:
    """One axis of a (source, target) size pair: each output's window and ATen's weights."""

    starts: np.ndarray  # int64 [out]: xmin
    sizes: np.ndarray  # int64 [out]: xsize (taps summed, zero weights included)
    weights: np.ndarray  # float32 [out, max_taps]: ATen's normalised weights, zero past xsize

    def plain_steps(self, variant: str) -> np.ndarray:
        """How many taps after the first are summed with a rounded product and a rounded sum (the rest
        are fused multiply-adds)."""
        if variant == "plain":
            return np.maximum(self.sizes - 1, 0)
        return (np.maximum(self.sizes - 1, 0) // 4) * 4


def _windows(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """ATen's ``_compute_indices_min_size_weights_aa`` windows for bicubic (interp_size 4), float32."""
    f32, f64 = np.float32, np.float64
    scale = f32(f32(in_size) / f32(out_size))  # area_pixel_compute_scale<float>
    support = f32(f64(2.0) * f64(scale)) if scale >= 1.0 else f32(2.0)
    max_taps = int(math.ceil(support)) * 2 + 1
    i = np.arange(out_size, dtype=np.float64)
    center = (f64(scale) * (i + 0.5)).astype(np.float32)  # double product, stored as float
    lo = (center - support).astype(np.float64) + 0.5  # float difference, double sum
    hi = (center + support).astype(np.float64) + 0.5
    xmin = np.maximum(np.trunc(lo).astype(np.int64), 0)  # static_cast<int64_t> truncates
    xsize = np.minimum(np.trunc(hi).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, max_taps)
    xmin = np.minimum(xmin, in_size - 1)  # an empty window (never seen) must still index the input
    return xmin, xsize, max_taps


def _aten_weights(in_size: int, out_size: int) -> np.ndarray:
    """ATen's float32 weights as a dense [out, in] matrix: its resize of one-hot rows along one axis."""
    dense = np.empty((out_size, in_size), np.float32)
    chunk = max(1, (1 << 22) // max(1, in_size))  # impulses per call: about 16 MB of float32 input
    with torch.no_grad():
        for first in range(0, in_size, chunk):
            n = min(chunk, in_size - first)
            eye = torch.zeros(n, in_size, dtype=torch.float32)
            eye[torch.arange(n), torch.arange(first, first + n)] = 1.0
            out = F.interpolate(
                eye.view(n, 1, 1, in_size),
                size=(1, out_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
            dense[:, first : first + n] = out.view(n, out_size).T.numpy()
    return dense


@functools.lru_cache(maxsize=64)
def axis_table(in_size: int, out_size: int) -> AxisTable:
    """The window and weights of every output of one axis resized from ``in_size`` to ``out_size``
    (an identity table when the sizes are equal: ATen skips that pass, and ``x·1`` is exact)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"cannot resize an axis of {in_size} to {out_size}")
    if in_size == out_size:
        return AxisTable(
            np.arange(out_size, dtype=np.int64),
            np.ones(out_size, np.int64),
            np.ones((out_size, 1), np.float32),
        )
    starts, sizes, max_taps = _windows(in_size, out_size)
    dense = _aten_weights(in_size, out_size)
    weights = np.zeros((out_size, max_taps), np.float32)
    for j in range(out_size):
        s, n = int(starts[j]), int(sizes[j])
        weights[j, :n] = dense[j, s : s + n]
        outside = dense[j].copy()
        outside[s : s + n] = 0.0
        if outside.any():
            raise AssertionError(f"ATen weights outside the window of output {j} ({in_size} -> {out_size})")
    return AxisTable(starts, sizes, weights)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The two compiled passes (:mod:`qtsplus_vllm._resize_kernels`: numba is imported and the
    kernels compiled, or loaded from numba's cache, on first use), or None without numba."""
    try:  # numba comes with vLLM; without it the caller keeps torchvision's path
        from . import _resize_kernels
    except ImportError:  # pragma: no cover - exercised only where numba is missing
        return None
    return _resize_kernels.width_pass, _resize_kernels.height_pass


_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """Threads that run the (GIL-free) passes on parts of a batch, as many as torch's intra-op threads."""
    global _POOL, _POOL_WORKERS, _POOL_PID
    with _POOL_LOCK:
        # a forked child inherits the pool object but not its threads: it makes its own
        if _POOL is None or _POOL_WORKERS < workers or _POOL_PID != os.getpid():
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qtsplus-resize")
            _POOL_WORKERS, _POOL_PID = workers, os.getpid()
        return _POOL


def _resize_nhwc(
    frames: np.ndarray, size: tuple[int, int], variant: str, threads: int | None = None
) -> np.ndarray:
    """uint8 [T, H, W, C] (C-contiguous) -> uint8 [T, C, h, w]: both passes, no checks, on ``threads``
    threads (default: torch's intra-op thread count): whole frames each when they divide evenly,
    otherwise bands of rows of every frame, the width pass's then the height pass's."""
    t, height, width, nc = frames.shape
    h, w = size
    across, down = axis_table(width, w), axis_table(height, h)
    width_pass, height_pass = _kernels()
    across_plain, down_plain = across.plain_steps(variant), down.plain_steps(variant)
    out = np.empty((t, nc, h, w), np.uint8)

    def run(first: int, last: int) -> None:
        tmp = np.empty((last - first, height, w, nc), np.float32)
        width_pass(frames[first:last], across.starts, across.sizes, across_plain, across.weights, tmp)
        height_pass(tmp, down.starts, down.sizes, down_plain, down.weights, out[first:last])

    threads = max(1, threads if threads is not None else torch.get_num_threads())
    if threads == 1:
        run(0, t)
        return out
    pool = _pool(threads)
    if t % threads == 0:
        per = t // threads
        for job in [pool.submit(run, i, i + per) for i in range(0, t, per)]:
            job.result()
        return out
    tmp = np.empty((t, height, w, nc), np.float32)

    def across_band(i: int, y0: int, y1: int) -> None:
        src, dst = frames[i : i + 1, y0:y1], tmp[i : i + 1, y0:y1]
        width_pass(src, across.starts, across.sizes, across_plain, across.weights, dst)

    def down_band(i: int, r0: int, r1: int) -> None:
        table = down.starts[r0:r1], down.sizes[r0:r1], down_plain[r0:r1], down.weights[r0:r1]
        height_pass(tmp[i : i + 1], *table, out[i : i + 1, :, r0:r1])

    for band, rows in ((across_band, height), (down_band, h)):  # every width band before any height band
        cuts = np.linspace(0, rows, threads + 1).round().astype(int)
        spans = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
        for job in [pool.submit(band, i, a, b) for i in range(t) for a, b in spans]:
            job.result()
    return out


def _reference(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """What qwen-vl-utils computes: torchvision's float bicubic with antialiasing, clamped and rounded."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    return tvf.resize(
        frames.contiguous(), list(size), interpolation=InterpolationMode.BICUBIC, antialias=True
    )


_PROBES = (((37, 53), (28, 56)), ((61, 130), (28, 56)), ((121, 75), (56, 28)), ((240, 427), (112, 196)))


@functools.lru_cache(maxsize=1)
def variant() -> str | None:
    """The accumulation scheme that reproduces this torch build (checked on random frames), or None."""
    if _kernels() is None:
        logger.info("numba is not installed: frames are resized by torchvision (exact, slower)")
        return None
    gen = torch.Generator().manual_seed(20)
    probes = [
        (torch.randint(0, 256, (2, 3, *src), dtype=torch.uint8, generator=gen), dst) for src, dst in _PROBES
    ]
    for name in _VARIANTS:
        if all(
            torch.equal(
                torch.from_numpy(_resize_nhwc(x.permute(0, 2, 3, 1).contiguous().numpy(), dst, name)),
                _reference(x, dst),
            )
            for x, dst in probes
        ):
            return name
    logger.warning(
        "the fast exact resize does not reproduce this torch build's bicubic kernel: frames are resized "
        "by torchvision (exact, slower)"
    )
    return None


_verified: dict[tuple[int, int], bool] = {}
_verified_lock = threading.Lock()


def _axis_verified(in_size: int, out_size: int, name: str) -> bool:
    """Both passes of one axis pair equal ATen's on random rows: the width pass's float32 values, the
    height pass's (on float rows) after clamping and rounding."""
    key = (in_size, out_size)
    with _verified_lock:
        if key in _verified:
            return _verified[key]
    try:
        table = axis_table(in_size, out_size)
    except AssertionError as err:  # ATen's weights outside the windows computed for them
        logger.warning(
            "the fast exact resize cannot resize %d -> %d (%s): torchvision resizes it",
            in_size,
            out_size,
            err,
        )
        with _verified_lock:
            _verified[key] = False
        return False
    plain = table.plain_steps(name)
    gen = torch.Generator().manual_seed(in_size * 7919 + out_size)
    rows = torch.randint(0, 256, (1, 4, in_size, 3), dtype=torch.uint8, generator=gen)
    width_pass, height_pass = _kernels()
    ours = np.empty((1, 4, out_size, 3), np.float32)
    width_pass(rows.numpy(), table.starts, table.sizes, plain, table.weights, ours)
    theirs = F.interpolate(
        rows.permute(0, 3, 1, 2).float(),
        size=(4, out_size),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    ok = in_size == out_size or torch.equal(torch.from_numpy(ours).permute(0, 3, 1, 2), theirs)
    # the height pass on float input, compared after rounding as the frames will be
    cols = torch.rand((1, in_size, 4, 3), generator=gen) * 300.0 - 20.0
    down = np.empty((1, 3, out_size, 4), np.uint8)
    height_pass(cols.numpy(), table.starts, table.sizes, plain, table.weights, down)
    ref = F.interpolate(
        cols.permute(0, 3, 1, 2).contiguous(),
        size=(out_size, 4),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    ok = ok and (
        in_size == out_size or torch.equal(torch.from_numpy(down), ref.clamp(0, 255).round().to(torch.uint8))
    )
    if not ok:
        logger.warning(
            "the fast exact resize does not match ATen for %d -> %d: torchvision resizes it",
            in_size,
            out_size,
        )
    with _verified_lock:
        _verified[key] = ok
    return ok


_DISABLED = 0


@contextlib.contextmanager
def disabled():
    """Within it (process-wide), :func:`resize_uint8` declines and torchvision resizes: for
    comparisons of the two paths."""
    global _DISABLED
    _DISABLED += 1
    try:
        yield
    finally:
        _DISABLED -= 1


def resize_uint8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
    """[T, C, H, W] uint8 on the CPU -> [T, C, h, w] uint8, equal to :func:`_reference` (torchvision's
    float bicubic with antialiasing, clamped and rounded half to even); ``None`` where this path does
    not apply, for the caller to run torchvision. Channels-last frames (a permuted [T, H, W, C] array,
    as decoded) are read without a copy."""
    if frames.ndim != 4 or frames.dtype != torch.uint8 or frames.device.type != "cpu" or frames.numel() == 0:
        return None
    if _DISABLED:
        return None
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        return None
    name = variant()
    if name is None:
        return None
    height, width = frames.shape[2], frames.shape[3]
    if not (_axis_verified(width, w, name) and _axis_verified(height, h, name)):
        return None
    nhwc = frames.permute(0, 2, 3, 1)
    if not nhwc.is_contiguous():
        nhwc = nhwc.contiguous()
    return torch.from_numpy(_resize_nhwc(nhwc.numpy(), (h, w), name))
