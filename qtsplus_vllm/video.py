"""Video decoding, frame sampling and Qwen2.5-VL preprocessing (torch + PyAV, no vLLM).

The pipeline of DESIGN §2.1, in three verbs:

1. :func:`decode_video` — PyAV decodes the file; the frames to keep are chosen with qwen-vl-utils'
   ``smart_nframes`` (fps, min/max frames, even count) at ``linspace(0, total - 1, n).round()``.
2. :func:`resize_frames` — qwen-vl-utils' ``smart_resize`` (factor 28) with its video pixel bounds,
   bicubic with antialiasing, on any torch device. With ``PreprocessConfig(resize="fast")``
   (``QTSPLUS_RESIZE=fast``) FFmpeg's scaler does it instead, inside the decoder's RGB conversion
   (:data:`FAST_INTERPOLATION`; :func:`scale_frames_fast` for frames that arrive decoded): same
   sizes, pixels close to but not equal to the reference's.
3. :func:`patchify` — CLIP normalisation and the Qwen2.5-VL patch layout: ``pixel_values``
   [N, C·2·14·14] and ``grid_thw`` [1, 3] with N = T/2 · H/14 · W/14. The ViT merges 2×2 patches,
   so the number of visual tokens is M = T/2 · H/28 · W/28.

Defaults are the reference demo's: fps 1.0, at most 768 frames, max_pixels 360×420.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch
from qwen_vl_utils import vision_process as qwen_vl
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from . import exact_resize
from .cancel import CancelToken
from .limits import Limits
from .settings import RESIZE_CHOICES

_FFMPEG_ERROR = av.FFmpegError  # bound here: a generator closed at interpreter exit still finds it
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = RESIZE_CHOICES  # exact: the reference's bicubic; fast: FFmpeg's scaler


def _fast_interpolation():
    """swscale's bicubic with full chroma interpolation: of swscale's filters the closest to the
    reference's float bicubic on decoded yuv420p (benchmarks/bench_resize_mode.py measures them);
    PyAV releases without the option flags get plain bicubic."""
    flags = av.video.reformatter.Interpolation
    if hasattr(flags, "FULL_CHR_H_INT") and hasattr(flags, "FULL_CHR_H_INP"):
        return flags.BICUBIC | flags.FULL_CHR_H_INT | flags.FULL_CHR_H_INP
    return "BICUBIC"


FAST_INTERPOLATION = _fast_interpolation()


class VideoDecodeError(ValueError):
    """The input is not a decodable video with at least one frame; the message says why."""


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames to keep (qwen-vl-utils' ``fps`` / ``min_frames`` / ``max_frames`` rules)."""

    fps: float = 1.0
    min_frames: int = qwen_vl.FPS_MIN_FRAMES
    max_frames: int = qwen_vl.FPS_MAX_FRAMES

    def __post_init__(self):
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps must be a positive number, got {self.fps}")
        if not 1 <= self.min_frames <= self.max_frames or self.max_frames < qwen_vl.FRAME_FACTOR:
            raise ValueError(
                f"need 1 <= min_frames <= max_frames and max_frames >= {qwen_vl.FRAME_FACTOR}, "
                f"got min_frames={self.min_frames}, max_frames={self.max_frames}"
            )


@dataclass(frozen=True)
class PreprocessConfig:
    """Resizing bounds and the Qwen2.5-VL patch geometry.

    ``min_pixels`` / ``total_pixels`` default to qwen-vl-utils' video defaults; ``max_pixels`` to
    the reference demo's 360×420. ``resize``: ``"exact"`` (the reference's bicubic, bit-exact) or
    ``"fast"`` (FFmpeg's scaler while decoding; same sizes, other pixel values).
    """

    max_pixels: int = 360 * 420
    min_pixels: int = qwen_vl.VIDEO_MIN_TOKEN_NUM * 28 * 28
    total_pixels: float = qwen_vl.MODEL_SEQ_LEN * 28 * 28 * 0.9
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resize: str = "exact"

    def __post_init__(self):
        if self.max_pixels < 1 or self.min_pixels < 1:
            raise ValueError(
                f"pixel bounds must be positive, got min={self.min_pixels}, max={self.max_pixels}"
            )
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass
class DecodedVideo:
    """Sampled frames of one video.

    frames:        [T, H, W, 3] uint8 RGB, T even.
    frame_indices: [T] index of each kept frame in the source.
    source_fps:    the source's average frame rate.
    total_frames:  frames in the source.
    """

    frames: np.ndarray
    frame_indices: list[int]
    source_fps: float
    total_frames: int

    @property
    def timestamps(self) -> list[float]:
        """Seconds from the start for each kept frame."""
        return [i / self.source_fps for i in self.frame_indices]


@dataclass
class VisionInputs:
    """ViT inputs for one video: pixel_values [N, C·tp·p·p], grid_thw [1, 3] (t, h, w in patches)."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    resized_size: tuple[int, int]  # (height, width) after smart_resize
    num_frames: int
    merge_size: int = 2

    @property
    def num_visual_tokens(self) -> int:
        """M = t · h · w / merge² (tokens after the ViT's patch merger)."""
        t, h, w = (int(v) for v in self.grid_thw[0])
        return t * h * w // self.merge_size**2


_FRAME_FACTOR = qwen_vl.FRAME_FACTOR


def sample_frame_indices(total_frames: int, source_fps: float, sampling: SamplingConfig) -> list[int]:
    """Indices of the frames to keep: ``smart_nframes`` frames spread evenly over the video.

    A one-frame video keeps its frame twice (the temporal patch needs two).
    """
    if total_frames < 1:
        raise VideoDecodeError("the video has no frames")
    if total_frames < _FRAME_FACTOR:
        return [0] * _FRAME_FACTOR
    spec = {"fps": sampling.fps, "min_frames": sampling.min_frames, "max_frames": sampling.max_frames}
    n = qwen_vl.smart_nframes(spec, total_frames=total_frames, video_fps=source_fps)
    return torch.linspace(0, total_frames - 1, n).round().long().tolist()


class _BufferReader(io.RawIOBase):
    """A seekable, read-only file over any buffer (an ndarray, a memoryview), without copying it."""

    def __init__(self, buffer):
        super().__init__()
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        n = max(0, min(len(target), len(self._view) - self._pos))
        target[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _open(source: str | os.PathLike | bytes | np.ndarray | memoryview):
    if isinstance(source, bytes):  # BytesIO shares an immutable bytes object: no copy
        return av.open(io.BytesIO(source), mode="r", metadata_errors="replace")
    if isinstance(source, bytearray | memoryview | np.ndarray):
        return av.open(_BufferReader(source), mode="r", metadata_errors="replace")
    path = os.fspath(source)
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not os.path.isfile(path):
        raise VideoDecodeError(f"video file not found: {path}")
    return av.open(path, mode="r", metadata_errors="replace")


def _count_frames(container, stream, limits: Limits | None = None) -> int:
    """Frames in the stream: from the header when it says, else by demuxing (no decoding).

    Demuxing stops as soon as the count passes ``limits.max_source_frames``, the decode work that
    many frames of the header's size would cost passes ``limits.max_decode_work``, or the pass
    takes longer than ``limits.decode_timeout_seconds``.
    """
    if stream.frames > 0:
        return int(stream.frames)
    count = _demux_count(container, stream, limits, None)
    container.seek(0)
    return count


_STILL_IMAGE_FORMATS = ("image2", "image2pipe")


def _is_still_image(container) -> bool:
    """PyAV opens a PNG/JPEG/WebP... as a one-frame "video" through an image demuxer."""
    names = container.format.name.split(",")
    return any(name in _STILL_IMAGE_FORMATS or name.endswith("_pipe") for name in names)


def _stream_seconds(container, stream) -> float | None:
    """The duration the header declares (stream, else container), or None."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def decode_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) to decode at: the source's, or scaled down to at most ``max_pixels``."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _iter_sampled(
    container,
    stream,
    wanted: list[int],
    size: tuple[int, int],
    limits: Limits | None = None,
    claimed: int | None = None,
    count: list[int] | None = None,
    cancel: CancelToken | None = None,
    interpolation=None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the stream once, yielding (index, RGB array at ``size``) for the wanted indices in order.

    A frame of another size is scaled to ``size`` as it is converted to RGB, with ``interpolation``
    (default: the area filter of ``decode_max_pixels``).

    Decoding goes on to the end of the stream (the frame count is checked against the plan); the
    number of frames decoded is left in ``count[0]``. With ``limits``, decoding stops as soon as the
    count passes ``limits.max_source_frames`` (a header that understates the count, ``claimed``,
    must not make the decoder walk the whole file), as soon as the decoded frames — each at its own
    size, whatever the header said — pass ``limits.max_decode_work``, and at the first frame after
    ``limits.decode_timeout_seconds`` of decoding (the consumer's time between frames excluded;
    :class:`~qtsplus_vllm.limits.DecodeMeter`). With ``cancel``, decoding stops at the first frame after
    the request is cancelled (:class:`~qtsplus_vllm.cancel.VideoCancelled`).
    """
    wanted_set, index = set(wanted), -1
    width, height = size
    stop = limits.max_source_frames if limits is not None else None
    meter = limits.decode_meter() if limits is not None else None
    for index, frame in enumerate(container.decode(stream)):
        if cancel is not None:
            cancel.check(index)
        if stop is not None and index >= stop:
            raise limits.source_frames_exceeded(claimed)
        if meter is not None:
            meter.frame(frame.width, frame.height)
        if index in wanted_set:
            if (frame.width, frame.height) == size:
                array = frame.to_ndarray(format="rgb24")
            else:
                array = frame.to_ndarray(
                    format="rgb24", width=width, height=height, interpolation=interpolation or "AREA"
                )
            with meter.paused() if meter is not None else contextlib.nullcontext():
                yield index, array  # the consumer's time with the frame is not the decoder's
    if count is not None:
        count[:] = [index + 1]


def _decode_at(
    container,
    stream,
    wanted: list[int],
    size: tuple[int, int],
    limits: Limits | None = None,
    claimed: int | None = None,
) -> tuple[dict[int, np.ndarray], int]:
    """Decode the stream once, keeping RGB arrays of the wanted indices; also returns the frame count."""
    count = [0]
    kept = dict(_iter_sampled(container, stream, wanted, size, limits, claimed, count))
    return kept, count[0]


def _video_stream(container):
    """The first video stream after the header checks: (stream, width, height, source fps)."""
    if not container.streams.video:
        raise VideoDecodeError("the file has no video stream")
    if _is_still_image(container):
        raise VideoDecodeError(
            f"the file is a still image ({container.format.name}), not a video; send images as image_url"
        )
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoDecodeError("the video stream's codec is unknown or not supported")
    stream.thread_type = "AUTO"
    width, height = stream.codec_context.width, stream.codec_context.height
    if width < 1 or height < 1:
        raise VideoDecodeError(f"the video stream has no frame size ({width}x{height})")
    if max(width, height) / min(width, height) > qwen_vl.MAX_RATIO:
        raise VideoDecodeError(
            f"the frame size {width}x{height} has an aspect ratio over {qwen_vl.MAX_RATIO}:1, "
            "which the model cannot use"
        )
    return stream, width, height


def _frame_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    source_fps = float(rate) if rate else 0.0
    if not (source_fps > 0 and math.isfinite(source_fps)):
        raise VideoDecodeError("the video stream has no frame rate")
    return source_fps


def decode_video(
    source: str | os.PathLike | bytes,
    sampling: SamplingConfig | None = None,
    limits: Limits | None = None,
) -> DecodedVideo:
    """Decode a video file (path, ``file://`` URL or bytes) and keep the sampled frames.

    With ``limits``, the header's frame size, duration and frame count are checked before any
    frame is decoded (:class:`~qtsplus_vllm.limits.LimitExceeded`), the frame count again while
    demuxing and decoding (a header that understates it stops the decoder at the limit, not at the
    end of the file), and kept frames larger than ``limits.decode_max_pixels`` are scaled down
    (area filter) as they are decoded.
    """
    sampling = sampling or SamplingConfig()
    try:
        container = _open(source)
    except av.FFmpegError as err:
        raise VideoDecodeError(f"not a readable video container ({_reason(err)})") from err
    with container:
        stream, width, height = _video_stream(container)
        try:
            source_fps = _frame_rate(stream)
            if limits is not None:
                limits.check_stream(width, height, _stream_seconds(container, stream), stream.frames or None)
            total = _count_frames(container, stream, limits)
            if limits is not None:
                limits.check_stream(width, height, total / source_fps, total)
            size = decode_size(width, height, limits.decode_max_pixels if limits is not None else None)
            indices = sample_frame_indices(total, source_fps, sampling)
            kept, decoded = _decode_at(container, stream, indices, size, limits, stream.frames or None)
            if decoded != total:  # the header lied: sample again from the true count
                if decoded == 0:
                    raise VideoDecodeError("the video has no decodable frames")
                container.seek(0)
                total = decoded
                if limits is not None:
                    limits.check_stream(width, height, total / source_fps, total)
                indices = sample_frame_indices(total, source_fps, sampling)
                kept, _ = _decode_at(container, stream, indices, size, limits, stream.frames or None)
        except av.FFmpegError as err:
            raise VideoDecodeError(f"cannot decode the video ({_reason(err)})") from err
    missing = sorted(set(indices) - set(kept))
    if missing:
        raise VideoDecodeError(f"frames {missing[:8]} could not be decoded")
    frames = np.stack([kept[i] for i in indices])
    return DecodedVideo(frames=frames, frame_indices=indices, source_fps=source_fps, total_frames=total)


@dataclass(frozen=True)
class VideoPlan:
    """What is known of an encoded video before any frame is decoded (:func:`probe_video`).

    frame_indices: the sampled source frames (qwen-vl-utils rules on ``total_frames``), ascending.
    width/height: the source frame size; decode_width/decode_height: the size frames are decoded
    at (scaled down to ``limits.decode_max_pixels``). ``claimed_frames``: the header's count, if any.
    """

    frame_indices: tuple[int, ...]
    source_fps: float
    total_frames: int
    width: int
    height: int
    decode_width: int
    decode_height: int
    sampling: SamplingConfig
    limits: Limits | None = None
    claimed_frames: int | None = None
    # the request's cancellation (qtsplus_vllm.cancel): every pass over the video checks it per frame
    cancel: CancelToken | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def decode_shape(self) -> tuple[int, int, int, int]:
        """[T, H, W, 3] of the frames decoding yields (what an eager loader would have returned)."""
        return (self.num_frames, self.decode_height, self.decode_width, 3)

    def key(self) -> tuple:
        """Every field that decides the decoded frames (the limits only bound the work)."""
        return (
            self.frame_indices,
            self.source_fps,
            self.total_frames,
            self.width,
            self.height,
            self.decode_width,
            self.decode_height,
        )

    def resampled(self, total_frames: int) -> VideoPlan:
        """The plan for a stream found, while decoding, to hold ``total_frames`` frames (a lying header)."""
        if total_frames < 1:
            raise VideoDecodeError("the video has no decodable frames")
        if self.limits is not None:
            self.limits.check_stream(self.width, self.height, total_frames / self.source_fps, total_frames)
        indices = sample_frame_indices(total_frames, self.source_fps, self.sampling)
        return dataclasses.replace(self, frame_indices=tuple(indices), total_frames=total_frames)


def _demux_count(
    container, stream, limits: Limits | None, claimed: int | None, cancel: CancelToken | None = None
) -> int:
    """Packets with data in the stream (one per frame), stopping as soon as the count passes the
    frame limit, the decode work of that many frames at the header's size passes the decode-work
    limit, or the pass takes longer than the decode deadline."""
    count = 0
    stop = limits.max_source_frames if limits is not None else None
    meter = limits.decode_meter() if limits is not None else None
    width, height = stream.codec_context.width, stream.codec_context.height
    for packet in container.demux(stream):
        if cancel is not None:
            cancel.check(count)
        if packet.size > 0:
            count += 1
            if stop is not None and count > stop:
                raise limits.source_frames_exceeded(claimed)
            if meter is not None:
                meter.frame(width, height)
    return count


def probe_video(
    source: str | os.PathLike | bytes | np.ndarray,
    sampling: SamplingConfig | None = None,
    limits: Limits | None = None,
    cancel: CancelToken | None = None,
) -> VideoPlan:
    """The header checks and limits of :func:`decode_video`, the frame count and the sampling plan,
    without decoding a frame.

    The frame count comes from a demux pass (packets, no decoding), which also enforces
    ``limits.max_source_frames`` whatever the header claims. :func:`iter_sampled_frames` decodes
    the plan later; if the decoder then finds another frame count (a stream whose packets are not
    one frame each), the plan is redone from the decoded count, as :func:`decode_video` does.
    """
    sampling = sampling or SamplingConfig()
    try:
        container = _open(source)
    except av.FFmpegError as err:
        raise VideoDecodeError(f"not a readable video container ({_reason(err)})") from err
    with container:
        stream, width, height = _video_stream(container)
        try:
            source_fps = _frame_rate(stream)
            claimed = stream.frames or None
            if limits is not None:
                limits.check_stream(width, height, _stream_seconds(container, stream), claimed)
            total = _demux_count(container, stream, limits, claimed, cancel)
        except av.FFmpegError as err:
            raise VideoDecodeError(f"cannot read the video ({_reason(err)})") from err
    if total < 1:
        raise VideoDecodeError("the video has no frames")
    if limits is not None:
        limits.check_stream(width, height, total / source_fps, total)
    decode_width, decode_height = decode_size(
        width, height, limits.decode_max_pixels if limits is not None else None
    )
    indices = sample_frame_indices(total, source_fps, sampling)
    return VideoPlan(
        frame_indices=tuple(indices),
        source_fps=source_fps,
        total_frames=total,
        width=width,
        height=height,
        decode_width=decode_width,
        decode_height=decode_height,
        sampling=sampling,
        limits=limits,
        claimed_frames=claimed,
        cancel=cancel,
    )


class FrameCountMismatch(Exception):
    """The decoder found ``decoded`` frames where the plan counted another number."""

    def __init__(self, decoded: int):
        super().__init__(f"decoded {decoded} frames")
        self.decoded = decoded


def iter_sampled_frames(
    source, plan: VideoPlan, scale_to: tuple[int, int] | None = None
) -> Iterator[np.ndarray]:
    """Decode ``source`` once and yield the plan's frames in order, uint8 RGB [H, W, 3] at the decode size.

    Frames are converted exactly as :func:`decode_video` converts them; with ``scale_to`` (height,
    width), FFmpeg's scaler brings them to that size instead as it converts them to RGB
    (:data:`FAST_INTERPOLATION`: the fast resize mode, no full-size RGB frame is made). Raises
    :class:`FrameCountMismatch` at the end when the stream holds another number of frames than
    ``plan.total_frames`` (the caller redoes the plan: :meth:`VideoPlan.resampled`),
    :class:`VideoDecodeError` for a stream that cannot be decoded, and ``LimitExceeded`` when it
    holds more than ``plan.limits.max_source_frames`` frames.
    """
    # the positions of each wanted source frame (a one-frame video keeps frame 0 twice)
    positions: dict[int, int] = {}
    for i in plan.frame_indices:
        positions[i] = positions.get(i, 0) + 1
    try:
        container = _open(source)
    except av.FFmpegError as err:
        raise VideoDecodeError(f"not a readable video container ({_reason(err)})") from err
    with container:
        stream, _, _ = _video_stream(container)
        count = [0]
        size = (plan.decode_width, plan.decode_height) if scale_to is None else scale_to[::-1]
        interpolation = None if scale_to is None else FAST_INTERPOLATION
        frames = _iter_sampled(
            container,
            stream,
            sorted(positions),
            size,
            plan.limits,
            plan.claimed_frames,
            count,
            plan.cancel,
            interpolation,
        )
        try:
            for index, array in frames:
                for _ in range(positions[index]):
                    yield array
        except _FFMPEG_ERROR as err:
            raise VideoDecodeError(f"cannot decode the video ({_reason(err)})") from err
    if count[0] != plan.total_frames:
        raise FrameCountMismatch(count[0])


def _reason(err: Exception) -> str:
    """FFmpeg's words without its errno and file-name noise."""
    return getattr(err, "strerror", None) or str(err)


def target_size(height: int, width: int, num_frames: int, config: PreprocessConfig) -> tuple[int, int]:
    """(height, width) after qwen-vl-utils' video resizing rule for ``num_frames`` frames."""
    f = config.factor
    # qwen-vl-utils' per-frame bound for videos: at most VIDEO_MAX_TOKEN_NUM tokens per frame and a
    # share of total_pixels, never under min_pixels; then capped by the caller's max_pixels.
    cap = max(
        min(qwen_vl.VIDEO_MAX_TOKEN_NUM * f * f, config.total_pixels / num_frames * _FRAME_FACTOR),
        int(config.min_pixels * 1.05),
    )
    max_pixels = min(config.max_pixels, cap)
    if max_pixels < config.min_pixels:
        raise ValueError(f"max_pixels={config.max_pixels} is below min_pixels={config.min_pixels}")
    try:
        size = qwen_vl.smart_resize(
            height, width, factor=f, min_pixels=config.min_pixels, max_pixels=max_pixels
        )
    except ValueError as err:  # aspect ratio over qwen-vl-utils' MAX_RATIO
        raise VideoDecodeError(f"frame size {width}x{height} cannot be used: {err}") from err
    if min(size) < f:
        # smart_resize floors the short side of a very wide frame that it scales down to 0 rows
        # (27x5391 at max_pixels 360*420, for instance): no patch could be made of it
        raise VideoDecodeError(
            f"frame size {width}x{height} cannot be used at max_pixels={max_pixels}: resizing it to "
            f"multiples of {f} leaves {size[1]}x{size[0]} pixels; send a less extreme aspect ratio or "
            "raise max_pixels"
        )
    return size


def vit_patch_count(num_frames: int, height: int, width: int, config: PreprocessConfig) -> int:
    """ViT patches (rows of ``pixel_values``) that :func:`preprocess_frames` will produce, without doing it."""
    t = num_frames + num_frames % _FRAME_FACTOR
    h, w = target_size(height, width, t, config)
    return (t // config.temporal_patch_size) * (h // config.patch_size) * (w // config.patch_size)


def resize_frames_uint8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[T, 3, H, W] uint8 -> [T, 3, h, w] uint8 (bicubic, antialiased, rounded like qwen-vl-utils).

    torchvision resizes a uint8 tensor in float32 and rounds the result back to uint8, as
    qwen-vl-utils' ``fetch_video`` does before its ``.float()``: these values, kept as uint8.
    On the CPU they are computed by :func:`~qtsplus_vllm.exact_resize.resize_uint8` (the same values,
    several times faster; channels-last frames are read without a copy); torchvision where it does
    not apply (other devices, no numba, a torch build whose arithmetic it does not reproduce).
    """
    fast = exact_resize.resize_uint8(frames, size)
    if fast is not None:
        return fast
    # contiguous NCHW: torch's kernel then reads and writes without the copies a channels-last view
    # costs (~30 % of its time); same values
    return tvf.resize(
        frames.contiguous(), list(size), interpolation=InterpolationMode.BICUBIC, antialias=True
    )


def scale_frames_fast(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] -> [T, h, w, 3] with FFmpeg's scaler (:data:`FAST_INTERPOLATION`): the
    fast resize mode for frames that arrive decoded (images, frame lists). A video's frames are
    scaled inside the decoder instead (:func:`iter_sampled_frames` ``scale_to``)."""
    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    out = np.empty((frames.shape[0], h, w, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out[i] = rgb.to_ndarray(format="rgb24", width=w, height=h, interpolation=FAST_INTERPOLATION)
    return out


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[T, 3, H, W] uint8 -> [T, 3, h, w] float32 with integer values (:func:`resize_frames_uint8`)."""
    return resize_frames_uint8(frames, size).float()


def patchify(frames: torch.Tensor, config: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised frames [T, C, H, W] (T even, H, W multiples of 28) -> (pixel_values, grid_thw).

    pixel_values [gt·gh·gw, C·tp·p·p] in the Qwen2-VL order: merge windows of 2×2 patches are
    contiguous (t, h/2, w/2, 2, 2), each row is (C, tp, p, p).
    """
    t, c, h, w = frames.shape
    tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    if t % tp or h % (p * m) or w % (p * m):
        raise ValueError(f"frames [T={t}, H={h}, W={w}] need T % {tp} == 0 and H, W multiples of {p * m}")
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, gh/m, gw/m, m, m, C, tp, p, p
    pixel_values = x.reshape(gt * gh * gw, c * tp * p * p)
    grid_thw = torch.tensor([[gt, gh, gw]], dtype=torch.long, device=frames.device)
    return pixel_values, grid_thw


def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    config: PreprocessConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VisionInputs:
    """uint8 RGB frames [T, H, W, 3] -> ViT inputs, resized and normalised on ``device``.

    An odd T is padded by repeating the last frame (the temporal patch needs pairs).
    """
    config = config or PreprocessConfig()
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {x.dtype} {list(x.shape)}")
    if x.shape[0] == 0:
        raise VideoDecodeError("the video has no frames")
    if x.shape[0] % _FRAME_FACTOR:
        x = torch.cat([x, x[-1:].expand(_FRAME_FACTOR - x.shape[0] % _FRAME_FACTOR, -1, -1, -1)])
    t, h, w, _ = x.shape
    size = target_size(h, w, t, config)
    if config.resize == "fast":  # FFmpeg's scaler, on the CPU
        x = torch.from_numpy(scale_frames_fast(x.cpu().numpy(), size))
        x = x.to(device=device, non_blocking=True).permute(0, 3, 1, 2).float()
    else:
        x = x.to(device=device, non_blocking=True).permute(0, 3, 1, 2)  # [T, 3, H, W]
        x = resize_frames(x, size)
    mean = torch.tensor(config.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, device=x.device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    pixel_values, grid_thw = patchify(x, config)
    return VisionInputs(pixel_values.to(dtype), grid_thw, size, num_frames=t, merge_size=config.merge_size)
