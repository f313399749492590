"""Lazy video items and the bounded decode stream (torch + PyAV, no vLLM).

The video loader runs in vLLM's media thread pool and does only the cheap work: the header checks
and limits, a demux pass that counts the frames, and the sampling plan (:func:`~qtsplus_vllm.video.probe_video`).
It returns the *encoded* bytes as an :class:`EncodedVideo` — a 1-D uint8 ndarray viewing the bytes
vLLM already holds (no copy) with the plan attached — instead of decoded frames. vLLM passes an
ndarray through its parser untouched and, since the array is exactly as large as the encoded bytes,
hashes the encoded bytes (``multimodal/hasher.py``), so its caches stay keyed by content at the
cost of one pass over the file.

The processor wraps it in a :class:`LazyVideo`, which looks like the frames array the loader used
to return (``shape`` [T, H, W, 3] at the decode size, ``len``, indexing) and decodes on demand:
:meth:`LazyVideo.chunks` runs the decoder on a background thread that yields the sampled frames in
chunks of ``chunk_frames`` through a bounded queue, so decoding overlaps the consumer's resize and
ViT work and at most ``queue_chunks + 2`` chunks of decoded frames exist at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import astuple, dataclass, field

import numpy as np
import torch

from .feature_cache import encoded_digest
from .settings import settings
from .video import (
    FrameCountMismatch,
    PreprocessConfig,
    VideoDecodeError,
    VideoPlan,
    iter_sampled_frames,
    patchify,
    resize_frames_uint8,
    scale_frames_fast,
    target_size,
)

QUEUE_CHUNKS = 1  # decoded chunks waiting for the consumer (one more is being filled, one consumed)
CHUNK_BYTES = 96 << 20  # at most this much decoded RGB per chunk (fewer frames for large sources)
# ViT patches per chunk: 32 frames at the reference max_pixels (360 x 420 pixels, 14 x 14 patches)
CHUNK_PATCHES = 32 * (360 * 420) // (14 * 14)
RESIZE_BATCH = 8  # frames resized at once: bounds the float copy torchvision makes of its input...
RESIZE_BYTES = 128 << 20  # ...to about this much (uint8 batch + its float copy + the passes)
FRAME_FACTOR = 2  # frames per temporal patch


def stream_chunk_frames() -> int:
    """``QTSPLUS_STREAM_CHUNK_FRAMES`` (default 32): sampled frames per chunk, a positive even number."""
    return settings().stream_chunk_frames


def chunk_frames_for(
    height: int, width: int, setting: int | None = None, patches_per_frame: int | None = None
) -> int:
    """Frames per chunk for frames of height x width: the setting (``QTSPLUS_STREAM_CHUNK_FRAMES``),
    lowered to an even count whose decoded RGB fits :data:`CHUNK_BYTES` (16 frames at 1080p) and,
    given the ViT patches of one resized frame, whose patches fit :data:`CHUNK_PATCHES` (a large
    ``max_pixels`` must not make one chunk's pixel values and ViT activations those of a whole video)."""
    setting = setting or stream_chunk_frames()
    fit = CHUNK_BYTES // max(1, height * width * 3)
    if patches_per_frame:
        fit = min(fit, CHUNK_PATCHES // max(1, patches_per_frame))
    return max(FRAME_FACTOR, min(setting, fit - fit % FRAME_FACTOR))


def resize_batch_for(height: int, width: int) -> int:
    """Frames resized at once for frames of height x width (8 up to 720p, 4 at 1080p)."""
    per_frame = height * width * 3 * (1 + 4 + 1)  # uint8 copy, float copy, the passes (about)
    return max(1, min(RESIZE_BATCH, RESIZE_BYTES // max(1, per_frame)))


class EncodedVideo(np.ndarray):
    """A video's encoded bytes as a 1-D uint8 array (a view, no copy) carrying its :class:`VideoPlan`
    and, when the loader decoded it ahead (:func:`prepare_frames`), its :class:`PreparedFrames` —
    attributes only: vLLM hashes and sees the encoded bytes alone."""

    plan: VideoPlan | None
    prepared: PreparedFrames | None
    features: object | None  # the ViT's rows when the loader encoded it (runtime.LoaderFeatures)
    digests: dict[tuple, str]  # feature-cache keys by (plan, settings): the loader's, reused by the processor

    def __new__(cls, data: bytes | bytearray | memoryview | np.ndarray, plan: VideoPlan) -> EncodedVideo:
        array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        obj = array.reshape(-1).view(cls)
        obj.plan = plan
        obj.prepared = None
        obj.features = None
        return obj

    def __array_finalize__(self, obj) -> None:
        self.plan = getattr(obj, "plan", None)
        self.prepared = getattr(obj, "prepared", None)
        self.features = getattr(obj, "features", None)
        self.digests = {}  # a view may hold other bytes: its keys are its own

    def __reduce__(self):  # the prepared frames stay in this process: a copy decodes again
        return (EncodedVideo, (self.tobytes(), self.plan))


def is_encoded_video(item: object) -> bool:
    return isinstance(item, EncodedVideo) and item.plan is not None


class _Stop(Exception):
    pass


class LazyVideo:
    """An :class:`EncodedVideo` that behaves like its frames: decoded on demand, never all at once."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, data: EncodedVideo, plan: VideoPlan | None = None):
        self.data = data
        self.plan = plan or data.plan
        if self.plan is None:
            raise ValueError("an encoded video needs its sampling plan")
        self.prepared: PreparedFrames | None = getattr(data, "prepared", None)
        self.features = getattr(data, "features", None)  # runtime.LoaderFeatures: encoded in the loader
        self._cursor: Iterator[np.ndarray] | None = None
        self._cursor_pos = -1
        self._cursor_frame: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.plan.decode_shape

    @property
    def nbytes_encoded(self) -> int:
        return int(self.data.nbytes)

    def __len__(self) -> int:
        return self.plan.num_frames

    def __repr__(self) -> str:
        return f"LazyVideo({self.nbytes_encoded} bytes, frames {list(self.shape)})"

    def digest(self, settings: tuple) -> str:
        """The feature-cache key of these bytes, this plan and ``settings`` (hashed once per item)."""
        key = (self.plan.key(), settings)
        memo = getattr(self.data, "digests", {})
        if key not in memo:
            memo[key] = encoded_digest(self.data, key)
        return memo[key]

    def _fail(self, err: VideoDecodeError) -> VideoDecodeError:
        return VideoDecodeError(f"cannot load the video ({self.nbytes_encoded} bytes): {err}")

    def _resample(self, decoded: int) -> None:
        if decoded == 0:
            raise self._fail(VideoDecodeError("the video has no decodable frames"))
        self.plan = self.plan.resampled(decoded)

    def to_array(self) -> np.ndarray:
        """All sampled frames [T, H, W, 3] (what the eager loader returned; tests and small videos)."""
        while True:
            try:
                return np.stack(list(iter_sampled_frames(self.data, self.plan)))
            except FrameCountMismatch as err:
                self._resample(err.decoded)
            except VideoDecodeError as err:
                raise self._fail(err) from None

    def __getitem__(self, index: int) -> np.ndarray:
        """One sampled frame; increasing indices continue one decoding pass (thumbnails)."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} of a {len(self)}-frame video")
        with self._lock:
            while True:
                if self._cursor is None or index < self._cursor_pos:
                    self._cursor, self._cursor_pos = iter_sampled_frames(self.data, self.plan), -1
                try:
                    while self._cursor_pos < index:
                        self._cursor_frame = next(self._cursor)
                        self._cursor_pos += 1
                    return self._cursor_frame
                except FrameCountMismatch as err:  # the plan was wrong: redo it and start again
                    self._cursor = None
                    self._resample(err.decoded)
                except VideoDecodeError as err:
                    self._cursor = None
                    raise self._fail(err) from None

    def chunks(
        self,
        chunk_frames: int,
        timings: dict[str, float] | None = None,
        scale_to: tuple[int, int] | None = None,
    ) -> Iterator[np.ndarray]:
        """The sampled frames as uint8 [c, H, W, 3] chunks of ``chunk_frames`` (the last may be shorter),
        decoded on a background thread that runs ahead by at most :data:`QUEUE_CHUNKS` chunks.

        ``scale_to`` (h, w): the decoder scales the frames to that size as it converts them to RGB
        (the fast resize mode: :func:`decoder_scale`), so the chunks are [c, h, w, 3].

        ``timings["decode_ms"]`` accumulates the decoder's own time (waiting on a full queue excluded),
        ``timings["decode_wait_ms"]`` the consumer's time waiting for frames. Raises
        :class:`FrameCountMismatch` when the stream had another frame count than planned and chunks
        were already handed out: ``self.plan`` is then the corrected plan and the caller starts again.
        """
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
        timings = timings if timings is not None else {}
        timings.setdefault("decode_ms", 0.0)
        timings.setdefault("decode_wait_ms", 0.0)
        out: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        stop = threading.Event()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            raise _Stop

        def produce() -> None:
            t, h, w, c = self.shape
            if scale_to is not None:
                h, w = scale_to
            buffer, filled = None, 0
            clock = time.perf_counter()
            try:
                for frame in iter_sampled_frames(self.data, self.plan, scale_to):
                    if stop.is_set():
                        raise _Stop
                    if buffer is None:
                        buffer = np.empty((min(chunk_frames, t), h, w, c), dtype=np.uint8)
                    buffer[filled] = frame
                    filled += 1
                    if filled == len(buffer):
                        timings["decode_ms"] += (time.perf_counter() - clock) * 1e3
                        put(("chunk", buffer))
                        clock = time.perf_counter()
                        buffer, filled = None, 0
                if filled:
                    timings["decode_ms"] += (time.perf_counter() - clock) * 1e3
                    put(("chunk", buffer[:filled]))
                    clock = time.perf_counter()
                timings["decode_ms"] += (time.perf_counter() - clock) * 1e3
                put(("done", None))
            except _Stop:
                pass
            except BaseException as err:  # handed to the consumer, which raises it
                timings["decode_ms"] += (time.perf_counter() - clock) * 1e3
                try:
                    put(("error", err))
                except _Stop:
                    pass

        worker = threading.Thread(target=produce, name="qtsplus-decode", daemon=True)
        worker.start()
        try:
            while True:
                clock = time.perf_counter()
                kind, value = out.get()
                timings["decode_wait_ms"] += (time.perf_counter() - clock) * 1e3
                if kind == "done":
                    return
                if kind == "error":
                    if isinstance(value, FrameCountMismatch):
                        self._resample(value.decoded)
                        raise value
                    if isinstance(value, VideoDecodeError):
                        raise self._fail(value) from None
                    raise value
                yield value
        finally:
            stop.set()
            worker.join()


def chunk_geometry(shape: tuple[int, ...], config: PreprocessConfig) -> tuple[int, tuple[int, int], int]:
    """(T padded to whole temporal patches, (h, w) after resizing, M visual tokens) of a [T, H, W, 3] video."""
    num_frames, height, width = shape[:3]
    if num_frames < 1:
        raise VideoDecodeError("the video has no frames")
    padded = num_frames + num_frames % FRAME_FACTOR
    size = target_size(height, width, padded, config)
    tokens = padded // config.temporal_patch_size * (size[0] // config.factor) * (size[1] // config.factor)
    return padded, size, tokens


def decoder_scale(shape: tuple[int, ...], config: PreprocessConfig) -> tuple[int, int] | None:
    """The size (h, w) the decoder scales a video of ``shape`` [T, H, W, 3] to: its target size in the
    fast resize mode (``config.resize == "fast"``), else None (full-size frames, resized exactly)."""
    return chunk_geometry(shape, config)[1] if config.resize == "fast" else None


def iter_resized(
    chunks: Iterator[np.ndarray],
    shape: tuple[int, ...],
    config: PreprocessConfig,
    device: str | torch.device = "cpu",
    timings: dict[str, float] | None = None,
) -> Iterator[torch.Tensor]:
    """The frames of a video of ``shape`` [T, H, W, 3], given as uint8 chunks [c, H, W, 3] (c even
    except for the last chunk), resized chunk by chunk: uint8 [c, 3, h, w] on ``device``.

    Each chunk goes to ``device`` as uint8 and is resized there to qwen-vl-utils' size for the whole
    video's T (:func:`~qtsplus_vllm.video.resize_frames_uint8`, :data:`RESIZE_BATCH` frames at a
    time); an odd video gets its last frame repeated. ``timings["preprocess_ms"]`` accumulates the
    time spent here. In the fast resize mode (``config.resize == "fast"``) chunks may already be at
    the target size (scaled by the decoder: :func:`decoder_scale`) and pass through; chunks at the
    video's size are scaled by FFmpeg's scaler (:func:`~qtsplus_vllm.video.scale_frames_fast`).
    """
    timings = timings if timings is not None else {}
    timings.setdefault("preprocess_ms", 0.0)
    device = torch.device(device)
    num_frames = shape[0]
    _, size, _ = chunk_geometry(shape, config)
    batch = resize_batch_for(shape[1], shape[2])
    fast = config.resize == "fast"
    scaled = (*size, 3)  # the frames of a chunk the decoder already scaled (fast mode)
    frame_shapes = {tuple(shape[1:]), scaled} if fast else {tuple(shape[1:])}
    seen = 0
    for chunk in chunks:
        clock = time.perf_counter()
        x = torch.as_tensor(chunk)
        if x.ndim != 4 or tuple(x.shape[1:]) not in frame_shapes or x.dtype != torch.uint8:
            raise ValueError(
                f"a chunk of frames {x.dtype} {list(x.shape)} does not belong to a video {list(shape)}"
            )
        if fast and tuple(x.shape[1:]) != scaled:  # frames that arrived decoded: FFmpeg's scaler, CPU
            x = torch.from_numpy(scale_frames_fast(x.numpy(), size))
        seen += x.shape[0]
        if x.shape[0] % FRAME_FACTOR:
            if seen != num_frames:
                raise ValueError(f"a chunk of {x.shape[0]} frames: only the last chunk may be odd")
            x = torch.cat([x, x[-1:].expand(FRAME_FACTOR - x.shape[0] % FRAME_FACTOR, -1, -1, -1)])
        x = x.to(device=device, non_blocking=True).permute(0, 3, 1, 2)  # [c, 3, H, W] uint8
        if fast:  # already at the target size
            resized = x
        else:
            # RESIZE_BATCH frames at a time; the channels-last view as decoded (the exact resize reads
            # it without a copy; torchvision's fallback makes each batch contiguous)
            parts = [resize_frames_uint8(x[i : i + batch], size) for i in range(0, x.shape[0], batch)]
            resized = torch.cat(parts) if len(parts) > 1 else parts[0]
            del parts
        del x
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["preprocess_ms"] += (time.perf_counter() - clock) * 1e3
        yield resized
    if seen != num_frames:
        raise VideoDecodeError(f"the video yielded {seen} of its {num_frames} frames")


def normalized_inputs(
    resized: torch.Tensor, config: PreprocessConfig, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized uint8 frames [c, 3, h, w] (c even) -> (pixel_values, grid_thw), normalised and
    patchified on their device exactly as :func:`~qtsplus_vllm.video.preprocess_frames` does."""
    mean = torch.tensor(config.image_mean, device=resized.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, device=resized.device).view(1, 3, 1, 1)
    x = (resized.float() / 255.0 - mean) / std
    pixel_values, grid_thw = patchify(x, config)
    del x
    return pixel_values.to(dtype), grid_thw


def _timed_inputs(
    resized: torch.Tensor, config: PreprocessConfig, dtype: torch.dtype, timings: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalized_inputs`, its time (the device's work included) added to ``preprocess_ms``."""
    clock = time.perf_counter()
    pixel_values, grid_thw = normalized_inputs(resized, config, dtype)
    if pixel_values.device.type == "cuda":
        torch.cuda.synchronize(pixel_values.device)
    timings["preprocess_ms"] += (time.perf_counter() - clock) * 1e3
    return pixel_values, grid_thw


def iter_vision_inputs(
    chunks: Iterator[np.ndarray],
    shape: tuple[int, ...],
    config: PreprocessConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    timings: dict[str, float] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """ViT inputs (pixel_values, grid_thw) chunk by chunk for a video of ``shape`` [T, H, W, 3] given as
    uint8 chunks [c, H, W, 3] (c even except for the last chunk).

    Each chunk is resized (:func:`iter_resized`), normalised and patchified exactly as
    :func:`~qtsplus_vllm.video.preprocess_frames` does the whole video: the concatenated
    pixel_values are bit-identical to its output, and the grids, concatenated along t, are its grid.
    ``timings["preprocess_ms"]`` accumulates the time spent here.
    """
    timings = timings if timings is not None else {}
    for resized in iter_resized(chunks, shape, config, device, timings):
        yield _timed_inputs(resized, config, dtype, timings)


@dataclass
class PreparedFrames:
    """A video's sampled frames decoded and resized ahead of the ViT (in the media loader).

    frames:   uint8 [T', 3, h, w] on the CPU — the resized frames of :func:`iter_resized`, T' = T
              padded to whole temporal patches; exactly the values the processor's own stream
              would resize, so the ViT inputs made from them are bit-identical.
    settings: the preprocessing settings (``astuple(PreprocessConfig)``) they were resized with.
    plan_key: the sampling plan (``VideoPlan.key()``) they were decoded from.
    timings_ms: ``decode_ms``, ``decode_wait_ms`` and ``preprocess_ms`` (the resize) spent making them.
    """

    frames: torch.Tensor
    settings: tuple
    plan_key: tuple
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.frames.numel() * self.frames.element_size()

    def matches(self, video: LazyVideo, config: PreprocessConfig) -> bool:
        return self.settings == astuple(config) and self.plan_key == video.plan.key()


def prepare_chunk_frames(height: int, width: int) -> int:
    """Decoded frames per chunk while preparing: one resize batch (even), so that each of the media
    threads decoding at once holds a few frames at the decode size, not :data:`CHUNK_BYTES`."""
    batch = resize_batch_for(height, width)
    return max(FRAME_FACTOR, batch - batch % FRAME_FACTOR)


def prepare_frames(
    video: LazyVideo,
    config: PreprocessConfig,
    device: str | torch.device = "cpu",
    timings: dict[str, float] | None = None,
) -> PreparedFrames:
    """Decode ``video`` (a background thread) and resize its frames into one uint8 CPU tensor.

    Memory: the result (T'·3·h·w bytes, bounded by the ViT-patch limit: 1,176 B per patch) plus the
    stream's few decoded chunks (:func:`prepare_chunk_frames`) and one resize batch. A stream that
    holds another frame count than planned re-plans ``video`` and starts again.
    """
    timings = timings if timings is not None else {}
    timings.setdefault("preprocess_ms", 0.0)
    while True:
        shape = video.shape
        padded, (h, w), _ = chunk_geometry(shape, config)
        out = torch.empty((padded, 3, h, w), dtype=torch.uint8)
        stream = video.chunks(prepare_chunk_frames(*shape[1:3]), timings, decoder_scale(shape, config))
        row = 0
        try:
            for resized in iter_resized(stream, shape, config, device, timings):
                clock = time.perf_counter()
                out[row : row + resized.shape[0]].copy_(resized)
                row += resized.shape[0]
                timings["preprocess_ms"] += (time.perf_counter() - clock) * 1e3
        except FrameCountMismatch:  # video.plan is redone from the decoded count
            continue
        finally:
            stream.close()  # stops the decoder thread on any failure
        if row != padded:
            raise RuntimeError(f"prepared {row} of the {padded} frames planned")
        return PreparedFrames(out, astuple(config), video.plan.key(), dict(timings))


def prepared_vision_inputs(
    prepared: PreparedFrames,
    config: PreprocessConfig,
    chunk_frames: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    timings: dict[str, float] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """ViT inputs chunk by chunk (``chunk_frames``, even) from prepared frames: bit-identical to
    :func:`iter_vision_inputs` on the same video. ``timings["preprocess_ms"]`` accumulates the
    normalisation and patchifying."""
    timings = timings if timings is not None else {}
    timings.setdefault("preprocess_ms", 0.0)
    if chunk_frames < FRAME_FACTOR or chunk_frames % FRAME_FACTOR:
        raise ValueError(f"chunk_frames must be a positive even number, got {chunk_frames}")
    frames = prepared.frames
    for start in range(0, frames.shape[0], chunk_frames):
        yield _timed_inputs(frames[start : start + chunk_frames].to(device), config, dtype, timings)


def frame_chunks(frames: np.ndarray, chunk_frames: int) -> Iterator[np.ndarray]:
    """Views of ``frames`` [T, ...] in chunks of ``chunk_frames`` (no copies)."""
    for start in range(0, frames.shape[0], chunk_frames):
        yield frames[start : start + chunk_frames]
