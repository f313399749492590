"""Video fetching with our limits and clean errors: a vLLM media connector named ``"qtsplus"``.

vLLM fetches every ``video_url`` with the connector named by ``VLLM_MEDIA_CONNECTOR`` (default
``"http"``); the plugin registers this one and makes it the default when the variable is unset.
It changes video fetching only (images and audio go through vLLM's own code):

- the encoded size is checked before the bytes are materialised: a ``data:`` URL by its base64
  length (before decoding it), a ``file://`` path by its size on disk (after vLLM's
  ``--allowed-local-media-path`` check), an ``http(s)`` download while it streams (vLLM stops at
  ``min(QTSPLUS_MAX_VIDEO_BYTES, VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB)``) → HTTP 413;
- a URL that cannot be fetched (connection refused, DNS failure, timeout after
  ``VLLM_VIDEO_FETCH_TIMEOUT`` seconds) → HTTP 400 naming the URL and the reason, where vLLM
  would answer 500.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import requests
import vllm.envs as envs
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector
from vllm.multimodal.media.image import ImageMediaIO
from vllm.multimodal.media.video import VideoMediaIO
from vllm.multimodal.video import get_video_loader_backend_for_processor

from ..limits import LimitExceeded, RequestError, server_limits
from .errors import QTSplusHTTPError, as_http_error

CONNECTOR_NAME = "qtsplus"

# What a failed fetch raises, short of an HTTP error status (vLLM maps those to 422 itself).
_FETCH_ERRORS = (
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    requests.ConnectionError,
    requests.Timeout,
    OSError,
)


class LimitedVideoMediaIO(VideoMediaIO):
    """vLLM's video IO with the byte limit applied to every way bytes arrive."""

    def get_max_bytes(self) -> int:
        return server_limits().max_video_bytes

    def load_base64(self, media_type: str, data: str):
        encoded_limit = 4 * ((self.get_max_bytes() + 2) // 3)
        if len(data) > encoded_limit:
            _over_byte_limit("the video's size in bytes", len(data) * 3 // 4)
        if media_type.lower() == "video/jpeg":  # a comma-separated list of JPEG frames, kept as sent
            frames = data.count(",") + 1
            limits = server_limits()
            if frames > limits.max_frames:
                raise as_http_error(
                    LimitExceeded(
                        "the video/jpeg frame count", frames, limits.max_frames, limits.variable("max_frames")
                    )
                )
        return super().load_base64(media_type, data)

    def load_file(self, filepath: Path):
        if filepath.is_file():
            size = filepath.stat().st_size
            if size > self.get_max_bytes():
                _over_byte_limit("the video file's size in bytes", size)
        return super().load_file(filepath)


def _over_byte_limit(what: str, value: int):
    limits = server_limits()
    raise as_http_error(
        LimitExceeded(what, value, limits.max_video_bytes, limits.variable("max_video_bytes"))
    )


def _describe(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."


def _fetch_error(url: str, err: BaseException) -> QTSplusHTTPError:
    reason = str(err) or type(err).__name__
    if isinstance(err, asyncio.TimeoutError | requests.Timeout):
        reason = f"no answer within VLLM_VIDEO_FETCH_TIMEOUT={envs.VLLM_VIDEO_FETCH_TIMEOUT} s"
    return as_http_error(RequestError(f"cannot fetch the video_url {_describe(url)}: {reason}"))


class QTSplusMediaConnector(MediaConnector):
    """:class:`MediaConnector` whose video fetches go through :class:`LimitedVideoMediaIO`."""

    def _video_io(self, image_mode: str | None, video_processor: str | None) -> LimitedVideoMediaIO:
        image_io = ImageMediaIO(**({"image_mode": image_mode} | self.media_io_kwargs.get("image", {})))
        kwargs: dict[str, Any] = dict(self.media_io_kwargs.get("video", {}))
        if "video_backend" not in kwargs:
            backend = get_video_loader_backend_for_processor(video_processor)
            if backend:
                kwargs["video_backend"] = backend
        return LimitedVideoMediaIO(image_io, **kwargs)

    def fetch_video(
        self, video_url: str, *, image_mode: str | None = "RGB", video_processor: str | None = None
    ):
        video_io = self._video_io(image_mode, video_processor)
        try:
            return self.load_from_url(video_url, video_io, fetch_timeout=envs.VLLM_VIDEO_FETCH_TIMEOUT)
        except QTSplusHTTPError:
            raise
        except _FETCH_ERRORS as err:
            raise _fetch_error(video_url, err) from err

    async def fetch_video_async(
        self, video_url: str, *, image_mode: str | None = "RGB", video_processor: str | None = None
    ):
        video_io = self._video_io(image_mode, video_processor)
        try:
            return await self.load_from_url_async(
                video_url, video_io, fetch_timeout=envs.VLLM_VIDEO_FETCH_TIMEOUT
            )
        except QTSplusHTTPError:
            raise
        except _FETCH_ERRORS as err:
            raise _fetch_error(video_url, err) from err


def register_media_connector() -> None:
    """Register the connector as ``"qtsplus"`` and make it the default (idempotent, no I/O).

    An explicit ``VLLM_MEDIA_CONNECTOR`` wins; vLLM reads the variable per request in the API server.
    """
    MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(QTSplusMediaConnector)
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", CONNECTOR_NAME)
