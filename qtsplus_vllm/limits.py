"""Per-request resource limits, checked before the expensive work (torch-free, no vLLM).

A serving process decodes, resizes and encodes whatever a client sends; these limits keep one
request from exhausting the machine. They are read from the environment of the ``vllm serve``
process (every process reads the same variables), so a client can never raise them.

==============================  ===================================================  ==============
variable                        what it bounds, where it is checked                   default
==============================  ===================================================  ==============
QTSPLUS_MAX_VIDEO_BYTES         encoded video size: data URLs before base64           512 MiB
                                decoding, ``file://`` by its size on disk, ``http``
                                downloads while they stream
QTSPLUS_MAX_VIDEO_SECONDS       duration from the container header, before decoding  7200 (2 h)
QTSPLUS_MAX_SOURCE_FRAMES       frames the decoder walks through (all of them are    432000
                                decoded; sampling keeps few), from the header, and   (2 h at 60 fps)
                                counted while demuxing and decoding (a header that
                                understates the count stops the decoder at the limit)
QTSPLUS_MAX_FRAMES              frames kept per video (``max_frames`` may not        768
                                exceed it); at least 2 (one temporal patch)
QTSPLUS_MAX_FRAME_PIXELS        width × height of the source frames (and of every    16777216
                                ``data:video/jpeg`` frame), from the header, before   (4096²)
                                decoding
QTSPLUS_DECODE_MAX_PIXELS       frames larger than this are scaled down while they   2408448
                                are decoded, before the exact resize (bounds the     (4 × 768 · 28²)
                                API server's memory for the kept frames; JPEG
                                frames of a ``data:video/jpeg`` list too)
QTSPLUS_MAX_DECODE_WORK         decoding work of one pass over a video: source        derived:
                                frames × pixels per frame (a frame counts at least   432000 ×
                                128² pixels: FFmpeg's per-frame cost), from the      4096²
                                header and the demux count before decoding, then      (see below)
                                counted frame by frame while demuxing and decoding
                                (each frame at its decoded size) and per frame of
                                a ``data:video/jpeg`` list
QTSPLUS_DECODE_TIMEOUT_SECONDS  wall-clock time of one pass over a video (the demux  600
                                count, a decode; checked at every frame; time the
                                consumer of the frames takes is not counted): over
                                it → HTTP 504 naming the variable
QTSPLUS_MAX_VIT_PATCHES         ViT patches of one video after resizing (memory of   396288
                                the selection runtime), before preprocessing
QTSPLUS_MAX_QUESTION_TOKENS     tokens of the question given to the selector         512
QTSPLUS_FETCH_DEADLINE_SECONDS  wall-clock time of one ``http(s)`` video download:   120
                                connect, vLLM's retries and their back-off, and the
                                body however slowly it trickles (over it → HTTP 504;
                                see ``serving/media.py``)
==============================  ===================================================  ==============

``QTSPLUS_MAX_DECODE_WORK`` defaults to ``QTSPLUS_MAX_SOURCE_FRAMES`` ×
``QTSPLUS_MAX_FRAME_PIXELS`` (at least 128² per frame) of the effective limits: every video the other
limits admit passes, and lowering it bounds what one request may cost to decode, whatever its file
size (decode cost is frames × pixels, not bytes: 1,200 static 1080p60 frames are 26 kB and ~2 s of
decoding). It also stops a stream whose frames turn out larger, or more numerous, than its header
said. ``QTSPLUS_DECODE_TIMEOUT_SECONDS`` is the wall-clock second line (HTTP 504).

A request over a limit gets HTTP 413 with a message that names the limit, the value and the
variable. The variables are declared, with their types, defaults and allowed values, in
:mod:`qtsplus_vllm.settings` (docs/configuration.md is generated from it); a value that is not
allowed (not a positive number, a ``QTSPLUS_MAX_FRAMES`` under 2) raises
:class:`~qtsplus_vllm.settings.SettingsError`, a ``ValueError`` naming the variable and the value,
and the server refuses to start with it.

The defaults admit every video the reference settings produce (fps 1, at most 768 frames,
max_pixels 360×420, min_pixels 128·28², any aspect ratio up to qwen-vl-utils' 200:1):
:data:`REFERENCE_WORST_CASE_VIT_PATCHES` = 396,288 patches. Aspect ratios under 32:1 need at most
294,912 (4:3 at 768 frames; 360×420 itself needs 276,480); wider ones need more (the former default
327,680 refused some from about 88:1). The worst case is a very wide, small frame (19×2432, about
128:1), which ``smart_resize`` *raises* to min_pixels, rounding both sides up to multiples of 28:
56×3612 pixels, 4 × 258 = 1,032 patches per pair of frames, × 384 pairs (tests/unit/test_limits.py
recomputes it over every frame size).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from http import HTTPStatus

from .settings import Settings, check_value, settings
from .settings import variable as _variable

# ViT patches of the largest video the reference settings make (fps 1, 768 frames, max_pixels
# 360×420, min_pixels 128·28², aspect ratio up to 200:1): see the module docstring
REFERENCE_WORST_CASE_VIT_PATCHES = 396_288
# The least decode work a frame counts for: FFmpeg spends ~0.02 ms on any frame, as much as on
# ~20,000 pixels of a large one (~1 ns per pixel; measured with H.264 on 2 cores: 16×16 0.022 ms,
# 64×64 0.026 ms, 1920×1080 1.97 ms per frame), so many tiny frames are not free.
MIN_FRAME_WORK_PIXELS = 128 * 128


class RequestError(ValueError):
    """A request the server cannot serve as sent; ``http_status`` says how vLLM should answer."""

    http_status = HTTPStatus.BAD_REQUEST


class LimitExceeded(RequestError):
    """A request over one of the :class:`Limits`; the message names the limit and its variable.

    ``at_least``: the value is a lower bound (counting stopped as soon as it passed the limit).
    """

    http_status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE

    def __init__(
        self, what: str, value: float, limit: float, variable: str, hint: str = "", at_least: bool = False
    ):
        is_ = "is at least" if at_least else "is"
        message = (
            f"{what} {is_} {_number(value)}, over the limit of {_number(limit)} (server setting {variable})"
        )
        super().__init__(message + (f"; {hint}" if hint else ""))
        self.variable = variable
        self.value = value
        self.limit = limit


def _number(value: float) -> str:
    """Integers in full with thousands separators (36,000,000, not 3.6e+07); others to 6 digits."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e18):
        return f"{int(value):,}"
    return f"{value:,.6g}"


class DecodeTimeout(LimitExceeded):
    """A pass over a video took longer than ``QTSPLUS_DECODE_TIMEOUT_SECONDS`` (HTTP 504)."""

    http_status = HTTPStatus.GATEWAY_TIMEOUT

    def __init__(self, elapsed: float, limit: float, variable: str, frames: int):
        took = f"{elapsed:.1f}" if elapsed >= 1 else f"{elapsed:.3f}"
        RequestError.__init__(
            self,
            f"decoding the video took {took} s ({frames:,} frames read), over the limit of "
            f"{_number(limit)} s (server setting {variable}); the decoder stopped there",
        )
        self.variable = variable
        self.value = elapsed
        self.limit = limit


class DecodeMeter:
    """One pass over a video's frames (a demux count or a decode), checked frame by frame against
    ``QTSPLUS_MAX_DECODE_WORK`` (413) and ``QTSPLUS_DECODE_TIMEOUT_SECONDS`` (504).

    Call :meth:`frame` with each frame's size (the decoded frame's own, or the header's while
    demuxing) before the work on the next one: the pass stops within one frame of crossing either.
    The time counted is the pass's own: a decoder that hands its frames to a consumer (the ViT of
    the streamed path) calls :meth:`paused` around each hand-over, whose wait does not count.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self.frames = 0
        self.work = 0
        self.started = time.monotonic()
        self.paused_s = 0.0

    def elapsed(self) -> float:
        """Seconds the pass has run, time in :meth:`paused` excluded."""
        return time.monotonic() - self.started - self.paused_s

    def frame(self, width: int, height: int) -> None:
        self.frames += 1
        self.work += self.limits.frame_work(width, height)
        if self.work > self.limits.decode_work_limit:
            raise self.limits.decode_work_exceeded(self.work)
        elapsed = self.elapsed()
        if elapsed > self.limits.decode_timeout_seconds:
            limits = self.limits
            raise DecodeTimeout(
                elapsed, limits.decode_timeout_seconds, limits.variable("decode_timeout_seconds"), self.frames
            )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The block's time does not count (the consumer has the frame)."""
        clock = time.monotonic()
        try:
            yield
        finally:
            self.paused_s += time.monotonic() - clock


class SelectionUnavailable(RuntimeError):
    """The selection runtime could not serve this request now (out of memory, for instance)."""

    http_status = HTTPStatus.SERVICE_UNAVAILABLE


def _default(name: str):
    """The default of setting ``name`` (qtsplus_vllm/settings.py declares it once)."""
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class Limits:
    """The request limits; field ``name`` is setting ``QTSPLUS_<NAME>`` (:mod:`qtsplus_vllm.settings`)."""

    max_video_bytes: int = _default("max_video_bytes")  # 512 MiB
    max_video_seconds: float = _default("max_video_seconds")  # 7200
    max_source_frames: int = _default("max_source_frames")  # 432,000: 2 h at 60 fps
    max_frames: int = _default("max_frames")  # 768
    max_frame_pixels: int = _default("max_frame_pixels")  # 4096²
    decode_max_pixels: int = _default("decode_max_pixels")  # 4 · 768 · 28²
    max_vit_patches: int = _default("max_vit_patches")  # REFERENCE_WORST_CASE_VIT_PATCHES
    max_question_tokens: int = _default("max_question_tokens")  # 512
    fetch_deadline_seconds: float = _default("fetch_deadline_seconds")  # 120
    # None: max_source_frames × max(max_frame_pixels, MIN_FRAME_WORK_PIXELS) (the module docstring)
    max_decode_work: int | None = _default("max_decode_work")
    decode_timeout_seconds: float = _default("decode_timeout_seconds")  # 600

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_decode_work":
                continue  # derived: decode_work_limit
            check_value(f.name, value)  # SettingsError naming the variable, as at start-up

    @property
    def decode_work_limit(self) -> int:
        """``max_decode_work``, or by default ``max_source_frames`` × ``max_frame_pixels`` (at least
        :data:`MIN_FRAME_WORK_PIXELS` per frame): every video the other limits admit."""
        if self.max_decode_work is not None:
            return self.max_decode_work
        return self.max_source_frames * max(self.max_frame_pixels, MIN_FRAME_WORK_PIXELS)

    @staticmethod
    def variable(name: str) -> str:
        return _variable(name)

    @classmethod
    def from_settings(cls, values: Settings) -> Limits:
        """The limits of ``values`` (a validated :class:`~qtsplus_vllm.settings.Settings`)."""
        return cls(**{f.name: getattr(values, f.name) for f in fields(cls)})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The limits from ``QTSPLUS_*`` variables of ``environ`` (default: this process's settings)."""
        return cls.from_settings(settings() if environ is None else Settings.from_environ(environ))

    # -- checks ----------------------------------------------------------------------------------

    def check_video_bytes(self, size: int) -> None:
        if size > self.max_video_bytes:
            raise LimitExceeded(
                "the video's size in bytes", size, self.max_video_bytes, self.variable("max_video_bytes")
            )

    def check_stream(self, width: int, height: int, seconds: float | None, frames: int | None) -> None:
        """Header facts of a video stream, before any frame is decoded."""
        self.check_frame_size(width, height)
        if seconds is not None and seconds > self.max_video_seconds:
            raise LimitExceeded(
                "the video's duration in seconds",
                seconds,
                self.max_video_seconds,
                self.variable("max_video_seconds"),
            )
        if frames is not None and frames > self.max_source_frames:
            raise LimitExceeded(
                "the video's frame count",
                frames,
                self.max_source_frames,
                self.variable("max_source_frames"),
                hint="the decoder reads every frame of the source",
            )
        if frames is not None:
            self.check_decode_work(frames, width, height)

    def frame_work(self, width: int, height: int) -> int:
        """The decode work one frame of ``width`` × ``height`` counts for (at least 128² pixels)."""
        return max(width * height, MIN_FRAME_WORK_PIXELS)

    def check_decode_work(self, frames: int, width: int, height: int) -> None:
        """Decode work of ``frames`` frames of ``width`` × ``height`` (the header's or the demux count)."""
        work = frames * self.frame_work(width, height)
        if work > self.decode_work_limit:
            raise LimitExceeded(
                f"the video's decode work ({frames:,} source frames of {width}x{height}, in pixels)",
                work,
                self.decode_work_limit,
                self.variable("max_decode_work"),
                hint="the decoder reads every frame of the source at its full size",
            )

    def decode_work_exceeded(self, work: int) -> LimitExceeded:
        """The error for a pass found, frame by frame, to cost more than the decode-work limit."""
        return LimitExceeded(
            "the video's decode work in pixels, counted while reading it,",
            work,
            self.decode_work_limit,
            self.variable("max_decode_work"),
            hint="the decoder stopped there",
            at_least=True,
        )

    def decode_meter(self) -> DecodeMeter:
        """A :class:`DecodeMeter` for one pass over a video, starting now."""
        return DecodeMeter(self)

    def check_frame_size(self, width: int, height: int, what: str = "the frame size") -> None:
        if width * height > self.max_frame_pixels:
            raise LimitExceeded(
                f"{what} {width}x{height} in pixels",
                width * height,
                self.max_frame_pixels,
                self.variable("max_frame_pixels"),
            )

    def source_frames_exceeded(self, claimed: int | None) -> LimitExceeded:
        """The error for a stream found, while it is read, to hold more frames than the limit."""
        said = f"its header claims {claimed:,}" if claimed else "its header does not say"
        return LimitExceeded(
            f"the video's frame count, counted while reading it ({said}),",
            self.max_source_frames + 1,
            self.max_source_frames,
            self.variable("max_source_frames"),
            hint="the decoder stopped there",
            at_least=True,
        )

    def check_vit_patches(self, patches: int) -> None:
        if patches > self.max_vit_patches:
            raise LimitExceeded(
                "the ViT patch count of this video",
                patches,
                self.max_vit_patches,
                self.variable("max_vit_patches"),
                hint="lower max_pixels, fps or max_frames",
            )

    def check_question_tokens(self, count: int) -> None:
        if count > self.max_question_tokens:
            raise LimitExceeded(
                "the question's length in tokens",
                count,
                self.max_question_tokens,
                self.variable("max_question_tokens"),
            )


_SERVER_LIMITS: tuple[Settings, Limits] | None = None


def server_limits() -> Limits:
    """This process's limits (from :func:`~qtsplus_vllm.settings.settings`, made once per settings)."""
    global _SERVER_LIMITS
    current, cached = settings(), _SERVER_LIMITS
    if cached is None or cached[0] is not current:
        cached = (current, Limits.from_settings(current))
        _SERVER_LIMITS = cached
    return cached[1]
