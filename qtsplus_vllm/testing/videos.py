"""Synthetic test videos: real mp4 files written with PyAV whose content changes over time."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np


def render_frames(frames: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """[frames, height, width, 3] uint8: a drifting colour gradient with two squares moving across it.

    ``size`` is (width, height). Every frame differs from the previous one and different regions
    differ from each other, so relevance scores are not all tied.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 200, size=3)
    colours = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    speeds = rng.uniform(0.5, 2.0, size=2)
    side = max(2, min(width, height) // 4)
    ys, xs = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        phase = t / max(frames, 1)
        grad = (xs / max(width - 1, 1))[..., None] * 60 + (ys / max(height - 1, 1))[..., None] * 40
        frame = np.clip(base + grad + 50 * np.sin(2 * np.pi * (phase + np.arange(3) / 3)), 0, 255)
        frame = frame.astype(np.uint8)
        for k in range(2):
            x0 = int((speeds[k] * t * side / 2 + k * width / 2) % max(width - side, 1))
            y0 = int((height - side) * (0.25 + 0.5 * k)) if height > side else 0
            frame[y0 : y0 + side, x0 : x0 + side] = colours[k]
        out[t] = frame
    return out


def make_video(
    path: str | os.PathLike,
    frames: int = 16,
    size: tuple[int, int] = (160, 120),
    fps: float = 4.0,
    seed: int = 0,
) -> Path:
    """Write ``frames`` frames of :func:`render_frames` as an H.264 mp4 at ``fps``; returns the path.

    ``size`` is (width, height), both even (yuv420p). Same arguments, same file content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_video_bytes(frames, size, fps, seed))
    return path


def make_video_bytes(
    frames: int = 16, size: tuple[int, int] = (160, 120), fps: float = 4.0, seed: int = 0
) -> bytes:
    """The bytes :func:`make_video` writes."""
    width, height = size
    if width % 2 or height % 2 or width < 2 or height < 2:
        raise ValueError(f"size must be even and >= 2 in both dimensions, got {size}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    pixels = render_frames(frames, size, seed)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=_as_rate(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # one thread and fixed options: the same inputs give the same bytes
        stream.codec_context.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for array in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _as_rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)
