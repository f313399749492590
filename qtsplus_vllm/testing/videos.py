"""Synthetic test videos: real mp4 files written with PyAV whose content changes over time."""

from __future__ import annotations

import io
import math
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


def texture_frames(count: int, size: tuple[int, int], seed: int = 0):
    """A smooth random texture panning slowly, a slow hue drift and three squares moving across it
    (every frame differs everywhere; compresses like camera content at about 1 Mbit/s for 720p and is
    the most expensive of the kinds to decode)."""
    import torch

    width, height = size
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, height // 20 + 2, width // 20 + 2)))
    smooth = torch.nn.functional.interpolate(coarse, size=(2 * height, 2 * width), mode="bicubic")
    texture = smooth[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy().copy()
    side = max(8, min(width, height) // 6)
    colours = rng.integers(0, 256, size=(3, 3), dtype=np.uint8)
    speeds = rng.uniform(1.0, 6.0, size=(3, 2))
    for t in range(count):
        dx, dy = int(t * 1.5) % width, int(t * 0.7) % height
        frame = texture[dy : dy + height, dx : dx + width].copy()
        frame[..., 0] += np.uint8(int(30 * (1 + math.sin(2 * math.pi * t / 1800))))
        for k in range(3):
            x0 = int(speeds[k, 0] * t) % max(width - side, 1)
            y0 = int(speeds[k, 1] * t) % max(height - side, 1)
            frame[y0 : y0 + side, x0 : x0 + side] = colours[k]
        yield frame


def smooth_frames(count: int, size: tuple[int, int], seed: int = 0):
    """Low motion, cheap to decode (lectures, dashcams at night, surveillance): a static two-axis colour
    gradient whose brightness drifts slowly, and one block moving across it."""
    width, height = size
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    base = np.stack([40 + 150 * xs + 0 * ys, 60 + 120 * ys + 0 * xs, 200 - 100 * xs * ys], axis=-1)
    side = max(8, min(width, height) // 8)
    colour = rng.integers(0, 256, size=3, dtype=np.uint8)
    shades: dict[int, np.ndarray] = {}  # the brightness drifts in steps of 0.5 %: one image per step
    for t in range(count):
        step = round(20 * math.sin(2 * math.pi * t / 3600))
        if step not in shades:
            shades[step] = np.clip(base * (1.0 + step / 200), 0, 255).astype(np.uint8)
        frame = shades[step].copy()
        x0 = int(2 * t) % max(width - side, 1)
        y0 = (height - side) // 2
        frame[y0 : y0 + side, x0 : x0 + side] = colour
        yield frame


def screen_frames(count: int, size: tuple[int, int], seed: int = 0):
    """A screen recording: a white page of dark text-like runs on a grey window bar, scrolled by a few
    lines every 4 s, a blinking cursor and a pointer moving now and then; most frames repeat the last
    one almost exactly."""
    width, height = size
    rng = np.random.default_rng(seed)
    line, margin = max(6, height // 40), max(4, width // 30)
    page_lines = 4 * (height // line)
    page = np.full((page_lines * line, width, 3), 250, dtype=np.uint8)
    for row in range(page_lines):
        x = margin
        while x < width - margin:
            word = int(rng.integers(line, 6 * line))
            if x + word > width - margin or rng.random() < 0.08:
                break
            page[row * line + 2 : row * line + line - 2, x : x + word] = rng.integers(10, 80)
            x += word + line // 2
    bar = max(8, height // 24)
    pointer = max(4, height // 60)
    for t in range(count):
        scroll = (t // 120) * 3 * line % (page.shape[0] - height)
        frame = page[scroll : scroll + height].copy()
        frame[:bar] = (60, 64, 72)
        if (t // 15) % 2 == 0:  # the cursor blinks twice a second at 30 fps
            frame[bar + line : bar + 2 * line - 2, margin - 3 : margin - 1] = 0
        px = margin + (t // 45) * 37 % max(width - 2 * margin, 1)
        py = bar + (t // 45) * 23 % max(height - bar - pointer, 1)
        frame[py : py + pointer, px : px + pointer] = (200, 30, 30)
        yield frame


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
    buffer = io.BytesIO()
    # one thread and fixed options: the same inputs give the same bytes
    encode_h264(buffer, render_frames(frames, size, seed), size, fps,
                {"crf": "18", "preset": "veryfast", "threads": "1"}, container_format="mp4")  # fmt: skip
    return buffer.getvalue()


def encode_h264(target, frames, size: tuple[int, int], fps: float, options: dict[str, str],
                container_format: str | None = None) -> None:  # fmt: skip
    """Encode uint8 RGB frames [H, W, 3] (any iterable) as yuv420p H.264 with x264 ``options`` into
    ``target``: a path (container from its extension) or a binary file object (give ``container_format``)."""
    width, height = size
    opened = str(target) if isinstance(target, str | os.PathLike) else target
    with av.open(opened, mode="w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=_as_rate(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = options
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _as_rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def write_texture_clip(
    path: str | os.PathLike,
    seconds: int = 10,
    size: tuple[int, int] = (1280, 720),
    fps: int = 30,
    seed: int = 0,
) -> Path:
    """A real-size H.264 clip (x264 ultrafast, CRF 23, a keyframe every 2 s): a smooth random texture
    panning under three moving squares — content an encoder cannot compress to nothing."""
    import torch

    width, height = size
    path = Path(path)
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, height // 20 + 2, width // 20 + 2)))
    smooth = torch.nn.functional.interpolate(coarse, size=(2 * height, 2 * width), mode="bilinear")
    texture = smooth[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy().copy()
    side = height // 6
    colours = rng.integers(0, 256, size=(3, 3), dtype=np.uint8)
    speeds = rng.uniform(1.0, 6.0, size=(3, 2))

    def frames():
        for t in range(seconds * fps):
            dx, dy = (3 * t) % width, t % height
            frame = texture[dy : dy + height, dx : dx + width].copy()
            for k in range(3):
                x0 = int(speeds[k, 0] * t) % (width - side)
                y0 = int(speeds[k, 1] * t) % (height - side)
                frame[y0 : y0 + side, x0 : x0 + side] = colours[k]
            yield frame

    encode_h264(path, frames(), size, fps, {"crf": "23", "preset": "ultrafast", "g": str(2 * fps)})
    return path


def repeat_clip(clip: str | os.PathLike, path: str | os.PathLike, seconds: float) -> Path:
    """``clip`` repeated to about ``seconds`` by remuxing its packets with shifted timestamps (no
    re-encoding; a clip that starts with a keyframe decodes on its own in every repetition), so a
    long real-size video costs seconds to make while the server still decodes every frame."""
    path = Path(path)
    with av.open(str(clip)) as source:
        stream = source.streams.video[0]
        packets = [
            (bytes(p), p.pts, p.dts, p.is_keyframe, p.duration) for p in source.demux(stream) if p.size
        ]
        base = min(p[1] for p in packets)
        span = max(p[1] for p in packets) + packets[-1][4] - base
        clip_seconds = float(span * stream.time_base)
        with av.open(str(path), mode="w") as out:
            target = out.add_stream_from_template(stream)
            for rep in range(max(1, round(seconds / clip_seconds))):
                for data, pts, dts, key, duration in packets:
                    packet = av.Packet(data)
                    packet.pts, packet.dts = pts + rep * span, dts + rep * span
                    packet.is_keyframe, packet.duration = key, duration
                    packet.time_base, packet.stream = stream.time_base, target
                    out.mux(packet)
    return path


CONTENT_KINDS = {"texture": texture_frames, "smooth": smooth_frames, "screen": screen_frames}
"""The media benchmark's content kinds (``benchmarks/bench_media.py --content``), by name."""


def write_content_clip(
    path: str | os.PathLike,
    content: str,
    seconds: int = 10,
    size: tuple[int, int] = (1280, 720),
    fps: int = 30,
    seed: int = 0,
) -> Path:
    """``seconds`` of a content kind (:data:`CONTENT_KINDS`) encoded the way ``bench_media.py`` encodes
    its videos (x264 ``veryfast``, CRF 23, a keyframe every 2 s): the first ``seconds × fps`` frames
    of the media benchmark's video of that kind and seed."""
    path = Path(path)
    encode_h264(path, CONTENT_KINDS[content](seconds * fps, size, seed), size, fps,
                {"crf": "23", "preset": "veryfast", "g": str(2 * fps)})  # fmt: skip
    return path


def make_long_video(
    path: str | os.PathLike,
    seconds: float,
    size: tuple[int, int] = (1280, 720),
    fps: int = 30,
    seed: int = 0,
    clip_seconds: int = 10,
    content: str = "texture",
) -> Path:
    """A distinct real-size video of about ``seconds``: a ``clip_seconds`` clip (own seed) repeated by
    remuxing. Its bytes differ per seed, so no cache answers one video for another.

    ``content``: ``texture`` (:func:`write_texture_clip`), or ``smooth`` / ``screen``, the media
    benchmark's kinds (:func:`write_content_clip`). The content repeats every ``clip_seconds``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clip = path.with_name(path.stem + ".clip.mp4")
    clip_s = min(clip_seconds, max(1, round(seconds)))
    if content == "texture":
        write_texture_clip(clip, clip_s, size, fps, seed)
    elif content in CONTENT_KINDS:
        write_content_clip(clip, content, clip_s, size, fps, seed)
    else:
        raise ValueError(f"content must be texture, smooth or screen, got {content!r}")
    try:
        return repeat_clip(clip, path, seconds)
    finally:
        clip.unlink(missing_ok=True)
