"""Video fetching with our limits and clean errors: a vLLM media connector named ``"qtsplus"``.

vLLM fetches every ``video_url`` with the connector named by ``VLLM_MEDIA_CONNECTOR`` (default
``"http"``); the plugin registers this one and makes it the default when the variable is unset.
It changes video fetching only (images and audio go through vLLM's own code):

- the encoded size is checked before the bytes are materialised: a ``data:`` URL by its base64
  length (before decoding it), a ``file://`` path by its size on disk (after vLLM's
  ``--allowed-local-media-path`` check), an ``http(s)`` download while it streams (vLLM stops at
  ``min(QTSPLUS_MAX_VIDEO_BYTES, VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB)``; we turn its error into ours)
  → HTTP 413 naming the setting that applied;
- the frames of a ``data:video/jpeg`` list get the limits of a video stream's frames: each
  frame's size is read from its header before it is decoded (over ``QTSPLUS_MAX_FRAME_PIXELS`` →
  413) and a frame over ``QTSPLUS_DECODE_MAX_PIXELS`` is decoded scaled down (JPEG DCT scaling,
  then an area filter), one frame at a time. vLLM keeps only the first ``num_frames`` frames of
  such a list (``media_io_kwargs["video"]["num_frames"]``, default 32; -1 keeps all), dropping
  the rest silently; ``QTSPLUS_MAX_FRAMES`` bounds the count sent;
- a ``video_url`` that cannot be fetched gets a status that says whose fault it is, with the
  URL and the reason (vLLM would answer 500 for most of these, 422 for some):

  ====================================================  ====  =================================
  what happened                                         HTTP  why this status
  ====================================================  ====  =================================
  the media server answered 4xx (404, 403, 410...);     400   the client's URL is unusable as
  a redirect loop; connection refused; DNS failure;           sent: retrying will not help
  an invalid URL
  it answered 5xx (after vLLM's retries) or 429; the    502   Bad Gateway: the upstream server
  connection broke off; a truncated body                      failed; a retry may succeed
  it answered 408 or 504; no answer within              504   Gateway Timeout: the upstream
  ``VLLM_VIDEO_FETCH_TIMEOUT`` (per attempt); the             server did not answer in time
  download not done within
  ``QTSPLUS_FETCH_DEADLINE_SECONDS``
  ====================================================  ====  =================================

  Every one is counted in ``qtsplus_rejected_requests_total{status}``;
- an ``http(s)`` download has a total wall-clock deadline, ``QTSPLUS_FETCH_DEADLINE_SECONDS``
  (default 120 s; validated at start-up with the other limits). vLLM's own bounds are per attempt:
  it retries ``VLLM_MEDIA_FETCH_MAX_RETRIES`` times (default 3) and multiplies the timeout by 4 at
  each retry (sleeping 1 s, then 4 s, between them), so one silent URL held a request for
  30 + 1 + 120 + 4 + 480 s at the defaults; and its synchronous client's timeout bounds each socket
  read, so a body that trickles in a byte at a time ran without end. The deadline covers the
  download only — connection, retries, back-off and body — not the decode that follows. Past it
  the download is cancelled (its connection closed) and the request gets 504 naming the URL and
  the variable. The asynchronous path (the API server's) wraps vLLM's download in
  ``asyncio.timeout``; the synchronous path (``LLM.chat``) runs the same download on a private
  event loop for the same bound, instead of vLLM's ``requests`` client.

Media threads and connections. vLLM downloads on the API server's event loop (no thread) and then
decodes in its media thread pool (``VLLM_MEDIA_LOADING_THREAD_COUNT``, default 8 threads): a silent
or trickling URL never holds a media thread, only the decode of bytes that did arrive does. What it
does hold is a connection, and vLLM's shared ``aiohttp`` session allows 100 at a time in all: 100
silent URLs made every other ``http(s)`` media fetch wait for a slot until they timed out. Our
downloads use a session of their own (one per event loop) without that total cap: each slow
download holds only its own connection, for at most the deadline, and their number is bounded by
the requests in flight. A connector created with an explicit ``connection`` keeps it (with the
deadline around it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import io
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import requests
import vllm.envs as envs
from PIL import Image, ImageOps
from vllm.connections import HTTPConnection, MediaDownloadSizeExceededError, global_http_connection
from vllm.exceptions import VLLMUnprocessableEntityError
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector, MediaWithBytes
from vllm.multimodal.media.image import ImageMediaIO
from vllm.multimodal.media.video import VideoMediaIO

from ..cancel import CancelToken, working_for
from ..limits import DecodeMeter, LimitExceeded, RequestError, server_limits
from ..video import decode_size
from . import cancellation, compat
from .errors import QTSplusHTTPError, as_http_error
from .video_loader import check_video_loader

CONNECTOR_NAME = "qtsplus"

# What a failed fetch raises (vLLM re-raises 5xx/408/429 answers as they are, and wraps 4xx answers,
# invalid URLs and its own download cap in a 422 error whose __cause__ is the original).
_FETCH_ERRORS = (
    aiohttp.ClientError,  # answers with an error status, redirect loops, truncated bodies, connections
    asyncio.TimeoutError,
    requests.RequestException,  # the synchronous path's equivalents
    OSError,
)


class FetchDeadlineExceeded(TimeoutError):
    """An ``http(s)`` download still unfinished at ``QTSPLUS_FETCH_DEADLINE_SECONDS``.

    A ``TimeoutError`` and not a ``ValueError``, so vLLM passes it through unwrapped.
    """

    def __init__(self, seconds: float, elapsed: float):
        super().__init__(f"the download did not finish within {seconds:g} s")
        self.seconds = seconds
        self.elapsed = elapsed


class _MediaHTTPConnection(HTTPConnection):
    """vLLM's HTTP client with an ``aiohttp`` session of our own, without a total connection cap.

    vLLM's shared session admits 100 connections in all, so 100 silent URLs would make every other
    media download wait (see the module docstring). One session per event loop: the API server has
    one loop; a later loop (a test, the synchronous path) gets a new session.
    """

    def __init__(self) -> None:
        super().__init__(reuse_client=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get_async_client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        client = self._async_client
        if client is None or client.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=0)  # the deadline bounds each connection's time
            self._async_client = aiohttp.ClientSession(trust_env=True, connector=connector)
            self._loop = loop
        return self._async_client


_MEDIA_CONNECTION = _MediaHTTPConnection()


# set while one of our video fetches runs (each asyncio task has its own value)
_VIDEO_FETCH: contextvars.ContextVar[bool] = contextvars.ContextVar("qtsplus_video_fetch", default=False)


@contextlib.contextmanager
def _video_fetch():
    token = _VIDEO_FETCH.set(True)
    try:
        yield
    finally:
        _VIDEO_FETCH.reset(token)


class _DeadlineConnection:
    """The connector's HTTP connection: during a video fetch, downloads (``get_bytes`` /
    ``async_get_bytes``, vLLM's retries inside) go through ``video`` and end at
    ``QTSPLUS_FETCH_DEADLINE_SECONDS``; images, audio and everything else use ``plain`` as vLLM does."""

    def __init__(self, plain: Any, video: Any):
        self._plain = plain
        self._video = video

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plain, name)

    async def async_get_bytes(self, url: str, **kwargs: Any) -> bytes:
        if not _VIDEO_FETCH.get():
            return await self._plain.async_get_bytes(url, **kwargs)
        return await _within_deadline(self._video.async_get_bytes(url, **kwargs))

    def get_bytes(self, url: str, **kwargs: Any) -> bytes:
        """For a video, the same download as the asynchronous path, on a private event loop and
        session, so that the deadline can cancel it (vLLM's ``requests`` client bounds each socket
        read, not the download)."""
        if not _VIDEO_FETCH.get():
            return self._plain.get_bytes(url, **kwargs)

        async def download() -> bytes:
            connection = _MediaHTTPConnection()
            try:
                return await _within_deadline(connection.async_get_bytes(url, **kwargs))
            finally:
                await (await connection.get_async_client()).close()

        return _run_coroutine(download)


async def _within_deadline(download):
    seconds = server_limits().fetch_deadline_seconds
    start = time.monotonic()
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            return await download
    except TimeoutError as err:
        if scope.expired():  # ours, not one of vLLM's per-attempt timeouts
            raise FetchDeadlineExceeded(seconds, time.monotonic() - start) from err
        raise


def _run_coroutine(make):
    """Run ``make()`` to completion from synchronous code, also when this thread runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qtsplus-fetch") as pool:
        return pool.submit(asyncio.run, make()).result()


class LimitedVideoMediaIO(VideoMediaIO):
    """vLLM's video IO with the byte limit applied to every way bytes arrive, and the request's
    cancellation (``cancel``, set by the connector) handed to the loader in the media thread."""

    cancel: CancelToken | None = None

    def get_max_bytes(self) -> int:
        return server_limits().max_video_bytes

    def load_bytes(self, data: bytes):
        # the loader (this thread) reads both: the cancellation (qtsplus_vllm.cancel) and, on vLLM >=
        # 0.33, the request's decoded-media budget (compat.video_budget)
        with working_for(self.cancel), compat.video_budget(self):
            return super().load_bytes(data)

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
            # one pass over the list: each frame's decode work and the deadline, checked frame by frame
            image_io = getattr(self, "image_io", None)
            if isinstance(image_io, _LimitedFrameIO):
                image_io.meter, image_io.cancel = limits.decode_meter(), self.cancel
                if self.cancel is not None:
                    self.cancel.begin()
                try:
                    frames = super().load_base64(media_type, data)
                finally:
                    image_io.meter = image_io.cancel = None
                if self.cancel is not None:
                    self.cancel.finish()  # decoded: what is left is the processor's, which is short
                return frames
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


def _upstream_answer(err: BaseException) -> tuple[int, str] | None:
    """(status, reason) of the media server's error answer, if ``err`` is one."""
    if isinstance(err, aiohttp.ClientResponseError) and err.status:
        return err.status, err.message or ""
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return err.response.status_code, err.response.reason or ""
    return None


def _classify(err: BaseException) -> tuple[HTTPStatus, str]:
    """Our status for a failed fetch and the reason in words (see the module docstring)."""
    if isinstance(err, aiohttp.TooManyRedirects | requests.TooManyRedirects):
        hops = len(getattr(err, "history", ()) or ()) or "too many"
        return HTTPStatus.BAD_REQUEST, f"it redirects in a loop ({hops} redirects followed)"
    answer = _upstream_answer(err)
    if answer is not None:
        status, reason = answer
        said = f"the media server answered HTTP {status}" + (f" {reason}" if reason else "")
        if status in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.GATEWAY_TIMEOUT):
            return HTTPStatus.GATEWAY_TIMEOUT, said
        if status == HTTPStatus.TOO_MANY_REQUESTS or status >= 500:
            return HTTPStatus.BAD_GATEWAY, said
        if 400 <= status < 500:
            return HTTPStatus.BAD_REQUEST, said
        return HTTPStatus.BAD_GATEWAY, said
    if isinstance(err, FetchDeadlineExceeded):
        return HTTPStatus.GATEWAY_TIMEOUT, (
            f"the download did not finish within QTSPLUS_FETCH_DEADLINE_SECONDS={err.seconds:g} s "
            f"(stopped after {err.elapsed:.1f} s; VLLM_VIDEO_FETCH_TIMEOUT={envs.VLLM_VIDEO_FETCH_TIMEOUT} s "
            f"per attempt, {max(envs.VLLM_MEDIA_FETCH_MAX_RETRIES, 1)} attempts)"
        )
    if isinstance(err, asyncio.TimeoutError | requests.Timeout):
        return HTTPStatus.GATEWAY_TIMEOUT, (
            f"no answer within VLLM_VIDEO_FETCH_TIMEOUT={envs.VLLM_VIDEO_FETCH_TIMEOUT} s "
            f"(per attempt, {max(envs.VLLM_MEDIA_FETCH_MAX_RETRIES, 1)} attempts)"
        )
    reason = str(err) or type(err).__name__
    if isinstance(
        err,
        aiohttp.ClientPayloadError
        | requests.exceptions.ChunkedEncodingError
        | requests.exceptions.ContentDecodingError,
    ):
        return HTTPStatus.BAD_GATEWAY, f"the media server's answer broke off or is malformed ({reason})"
    if isinstance(err, aiohttp.ClientConnectionError) and not isinstance(err, aiohttp.ClientConnectorError):
        # connected, then the server went away (disconnect, reset): the upstream failed
        return HTTPStatus.BAD_GATEWAY, f"the connection to the media server broke ({reason})"
    return HTTPStatus.BAD_REQUEST, reason  # connection refused, DNS failure, invalid URL, ...


def _fetch_error(url: str, err: BaseException) -> QTSplusHTTPError:
    status, reason = _classify(err)
    return as_http_error(_FetchFailed(f"cannot fetch the video_url {_describe(url)}: {reason}", status))


class _FetchFailed(RequestError):
    def __init__(self, message: str, status: HTTPStatus):
        super().__init__(message)
        self.http_status = status


def _download_too_large(url: str, err: BaseException) -> QTSplusHTTPError:
    """vLLM's download cap, hit while streaming an http(s) video, as our 413."""
    limits = server_limits()
    vllm_mb = envs.VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB
    if isinstance(err, compat.MediaRequestDownloadSizeExceededError):  # vLLM 0.33: all of a request's media
        variable = "VLLM_MAX_MEDIA_REQUEST_DOWNLOAD_SIZE_MB"
    elif isinstance(err, MediaDownloadSizeExceededError):
        variable = "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB"
    else:
        variable = limits.variable("max_video_bytes")
    received = getattr(err, "received_bytes", None)
    limit = getattr(err, "max_bytes", None) or limits.max_video_bytes
    return as_http_error(
        LimitExceeded(
            f"the size in bytes of the video at {_describe(url)}",
            received if received is not None else limit + 1,
            limit,
            variable,
            hint=(
                f"http(s) downloads stop at the lower of QTSPLUS_MAX_VIDEO_BYTES={limits.max_video_bytes:,} "
                f"and VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB={vllm_mb}"
            ),
            at_least=True,
        )
    )


def _fetch_failure(url: str, err: Exception) -> QTSplusHTTPError | None:
    """Our error for what vLLM raised while fetching ``url``; None: not a fetch failure, let it be."""
    if isinstance(err, QTSplusHTTPError):
        return err
    if isinstance(err, compat.DOWNLOAD_SIZE_ERRORS):
        return _download_too_large(url, err)
    if isinstance(err, VLLMUnprocessableEntityError):  # vLLM's 422 around the original error
        cause = err.__cause__
        if isinstance(cause, compat.DOWNLOAD_SIZE_ERRORS):
            return _download_too_large(url, cause)
        if isinstance(cause, _FETCH_ERRORS):
            return _fetch_error(url, cause)
        return None
    if isinstance(err, _FETCH_ERRORS):
        return _fetch_error(url, err)
    return None


class _LimitedFrameIO(ImageMediaIO):
    """vLLM's image IO for the frames of a ``data:video/jpeg`` list, with the video frame limits.

    Each frame's size comes from its header (PIL reads only the header on open): over
    ``QTSPLUS_MAX_FRAME_PIXELS`` → 413 before decoding; over ``QTSPLUS_DECODE_MAX_PIXELS`` → the
    frame is decoded scaled down (JPEG's DCT scaling via ``draft``, then an area filter to the size
    a video stream's frame would get), so no full-size frame list is ever held. Within one list,
    the frames' decode work and time count against ``QTSPLUS_MAX_DECODE_WORK`` and
    ``QTSPLUS_DECODE_TIMEOUT_SECONDS`` (``meter``, set by :class:`LimitedVideoMediaIO`).
    """

    meter: DecodeMeter | None = None
    cancel: CancelToken | None = None

    def load_bytes(self, data: bytes):
        if self.cancel is not None:
            self.cancel.check(self.meter.frames if self.meter is not None else None)
        limits = server_limits()
        try:
            probe = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:  # PIL refuses > 2 × its MAX_IMAGE_PIXELS on open
            raise as_http_error(
                LimitExceeded(
                    "a video/jpeg frame's size in pixels",
                    2 * (Image.MAX_IMAGE_PIXELS or 0) + 1,
                    limits.max_frame_pixels,
                    limits.variable("max_frame_pixels"),
                    at_least=True,
                )
            ) from err
        except Exception:
            return super().load_bytes(data)  # not an image: vLLM's own error
        with probe:
            width, height = probe.size
            try:
                limits.check_frame_size(width, height, "a video/jpeg frame's size")
                if self.meter is not None:
                    self.meter.frame(width, height)
            except LimitExceeded as err:
                raise as_http_error(err) from err
            if width * height > limits.decode_max_pixels:
                try:
                    return MediaWithBytes(self._scaled_down(probe, limits.decode_max_pixels), data)
                except (OSError, ValueError) as err:
                    raise ValueError(f"Failed to load image: {err}") from err
        return super().load_bytes(data)

    def _scaled_down(self, image: Image.Image, max_pixels: int) -> Image.Image:
        image.draft("RGB", decode_size(*image.size, max_pixels))  # JPEG: decode at 1/2, 1/4 or 1/8
        image = ImageOps.exif_transpose(image)  # as vLLM orients full-size frames
        if self.image_mode is not None and image.mode != self.image_mode:
            image = image.convert(self.image_mode)
        size = decode_size(*image.size, max_pixels)
        return image.resize(size, Image.Resampling.BOX) if image.size != size else image


class QTSplusMediaConnector(MediaConnector):
    """:class:`MediaConnector` whose video fetches go through :class:`LimitedVideoMediaIO`, and whose
    ``http(s)`` downloads have a deadline and a connection pool of their own (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        plain = self.connection
        video = _MEDIA_CONNECTION if plain is global_http_connection else plain
        self.connection = _DeadlineConnection(plain, video)

    def load_from_url(self, url: str, media_io: Any, *, fetch_timeout: int | None = None):
        video_io = with_limits(media_io)
        if video_io is None:  # images, audio, embeddings: vLLM's own path
            return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)
        try:
            with _video_fetch():
                return super().load_from_url(url, video_io, fetch_timeout=fetch_timeout)
        except Exception as err:
            raise _as_fetch_failure(url, err) from err

    async def load_from_url_async(self, url: str, media_io: Any, *, fetch_timeout: int | None = None):
        video_io = with_limits(media_io)
        if video_io is None:
            return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)
        # the request's token (serving.cancellation), or one of this fetch's own: the loader, in a
        # media thread that the task's cancellation does not reach, checks it frame by frame
        async with cancellation.request_scope() as token:
            video_io.cancel = token
            try:
                with _video_fetch():
                    return await super().load_from_url_async(url, video_io, fetch_timeout=fetch_timeout)
            except Exception as err:
                raise _as_fetch_failure(url, err) from err


def with_limits(media_io: Any) -> LimitedVideoMediaIO | None:
    """vLLM's video IO, as its ``fetch_video(_async)`` built it, given our limits; None if not a video IO.

    The seam is the IO object alone: vLLM builds it (loader backend, media_io_kwargs, and on vLLM
    0.33 the request's decoded-media budget) and passes it to ``load_from_url(_async)``; here the
    same object gets our subclass's methods (they add checks and keep no state of their own), and
    its frame IO (``data:video/jpeg`` lists) gets the frame limits. ``tests/unit/test_fetch.py``
    notices when vLLM's ``fetch_video(_async)`` stop handing a ``VideoMediaIO`` to ``load_from_url``.
    """
    if not isinstance(media_io, VideoMediaIO):
        return None
    check_video_loader(getattr(media_io, "video_loader", None))  # a QTSplus server: our loader only
    if type(media_io) is VideoMediaIO:
        media_io.__class__ = LimitedVideoMediaIO
    if type(getattr(media_io, "image_io", None)) is ImageMediaIO:
        media_io.image_io.__class__ = _LimitedFrameIO
    return media_io


def _as_fetch_failure(url: str, err: Exception) -> Exception:
    """The error a failed video fetch should raise: ours where we know it, else vLLM's as it was."""
    ours = _fetch_failure(url, err)
    return err if ours is None else ours


def register_media_connector() -> None:
    """Register the connector as ``"qtsplus"`` and make it the default (idempotent, no I/O).

    An explicit ``VLLM_MEDIA_CONNECTOR`` wins; vLLM reads the variable per request in the API server.
    """
    MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(QTSplusMediaConnector)
    os.environ.setdefault("VLLM_MEDIA_CONNECTOR", CONNECTOR_NAME)
