"""Per-request resource limits, checked before the expensive work (torch-free, no vLLM).

A serving process decodes, resizes and encodes whatever a client sends; these limits keep one
request from exhausting the machine. They are read from the environment of the ``vllm serve``
process (every process reads the same variables), so a client can never raise them.

=============================  ===================================================  ==============
variable                       what it bounds, where it is checked                   default
=============================  ===================================================  ==============
QTSPLUS_MAX_VIDEO_BYTES        encoded video size: data URLs before base64           512 MiB
                               decoding, ``file://`` by its size on disk, ``http``
                               downloads while they stream
QTSPLUS_MAX_VIDEO_SECONDS      duration from the container header, before decoding  7200 (2 h)
QTSPLUS_MAX_SOURCE_FRAMES      frames the decoder walks through (all of them are    432000
                               decoded; sampling keeps few), from the header        (2 h at 60 fps)
QTSPLUS_MAX_FRAMES             frames kept per video (``max_frames`` may not        768
                               exceed it)
QTSPLUS_MAX_FRAME_PIXELS       width × height of the source frames, from the        16777216
                               header, before decoding                              (4096²)
QTSPLUS_DECODE_MAX_PIXELS      frames larger than this are scaled down while they   2408448
                               are decoded, before the exact resize (bounds the     (4 × 768 · 28²)
                               API server's memory for the kept frames)
QTSPLUS_MAX_VIT_PATCHES        ViT patches of one video after resizing (memory of   327680
                               the selection runtime), before preprocessing
QTSPLUS_MAX_QUESTION_TOKENS    tokens of the question given to the selector         512
=============================  ===================================================  ==============

A request over a limit gets HTTP 413 with a message that names the limit, the value and the
variable; an invalid setting gets 400. The defaults admit every video the reference settings
produce (fps 1, at most 768 frames of at most 360×420 pixels: 299,520 patches).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from http import HTTPStatus

MiB = 1 << 20


class RequestError(ValueError):
    """A request the server cannot serve as sent; ``http_status`` says how vLLM should answer."""

    http_status = HTTPStatus.BAD_REQUEST


class LimitExceeded(RequestError):
    """A request over one of the :class:`Limits`; the message names the limit and its variable."""

    http_status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, what: str, value: float, limit: float, variable: str, hint: str = ""):
        message = f"{what} is {value:,.6g}, over the limit of {limit:,.6g} (server setting {variable})"
        super().__init__(message + (f"; {hint}" if hint else ""))
        self.variable = variable
        self.value = value
        self.limit = limit


class SelectionUnavailable(RuntimeError):
    """The selection runtime could not serve this request now (out of memory, for instance)."""

    http_status = HTTPStatus.SERVICE_UNAVAILABLE


@dataclass(frozen=True)
class Limits:
    max_video_bytes: int = 512 * MiB
    max_video_seconds: float = 7200.0
    max_source_frames: int = 432_000
    max_frames: int = 768
    max_frame_pixels: int = 4096 * 4096
    decode_max_pixels: int = 4 * 768 * 28 * 28
    max_vit_patches: int = 327_680
    max_question_tokens: int = 512

    @staticmethod
    def variable(name: str) -> str:
        return f"QTSPLUS_{name.upper()}"

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> Limits:
        """The limits from ``QTSPLUS_*`` variables (unset or empty: the default)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = str(environ.get(cls.variable(f.name), "")).strip()
            if not raw:
                continue
            try:
                value = float(raw) if f.type == "float" else int(raw)
            except ValueError:
                raise ValueError(f"{cls.variable(f.name)}={raw!r} is not a valid {f.type}") from None
            if not value > 0:
                raise ValueError(f"{cls.variable(f.name)}={raw!r} must be positive")
            values[f.name] = value
        return cls(**values)

    # -- checks ----------------------------------------------------------------------------------

    def check_video_bytes(self, size: int) -> None:
        if size > self.max_video_bytes:
            raise LimitExceeded(
                "the video's size in bytes", size, self.max_video_bytes, self.variable("max_video_bytes")
            )

    def check_stream(self, width: int, height: int, seconds: float | None, frames: int | None) -> None:
        """Header facts of a video stream, before any frame is decoded."""
        if width * height > self.max_frame_pixels:
            raise LimitExceeded(
                f"the frame size {width}x{height} in pixels",
                width * height,
                self.max_frame_pixels,
                self.variable("max_frame_pixels"),
            )
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


@functools.cache
def server_limits() -> Limits:
    """This process's limits (read once from the environment)."""
    return Limits.from_env()
