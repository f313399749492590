"""Where the proven vLLM releases differ for this plugin, in one place (docs/vllm-versions.md).

The releases are listed once, in ``qtsplus_vllm/vllm_releases.json``; what each one changed is in
``docs/vllm-<minor>-compat.md``. Everything here detects features, never version numbers: the CPU
test runs a newer release's source over the installed 0.32 build, where ``importlib.metadata``
still reports 0.32, and a patch release may back-port a change. vLLM is imported lazily. 0.34 changed
none of the surfaces below (docs/vllm-0.34-compat.md): each of its shims behaves as on 0.33.

- ``DOWNLOAD_SIZE_ERRORS``: the exception classes vLLM raises when an HTTP media download is too
  large. 0.33 adds a per-request cap (``VLLM_MAX_MEDIA_REQUEST_DOWNLOAD_SIZE_MB``,
  ``MediaRequestDownloadSizeExceededError``); on 0.32 that name is a private class vLLM never
  raises, so ``isinstance`` checks and ``except`` tuples stay valid on both.
- ``MediaDecodedBudget``: 0.33's per-request decoded-bytes budget (``None`` on 0.32);
  :func:`image_io_kwargs` and :func:`charge_decoded` use it where it exists, and our video loader
  charges the resized frames a video holds to it (:func:`video_budget`, :func:`charge_video_frames`).
- :func:`build_chat_params`: 0.33 renders chats with the server's ``reasoning_effort_map``.
- :func:`check_vllm_version`: a warning (never a failure) on a vLLM minor not in the list.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import re
from collections.abc import Iterator
from typing import Any

from .. import vllm_releases

logger = logging.getLogger(__name__)

# (major, minor) of the vLLM releases this plugin is proven with (qtsplus_vllm/vllm_releases.json).
VERIFIED_MINORS = vllm_releases.verified_minors()

_LAZY = ("DOWNLOAD_SIZE_ERRORS", "MediaRequestDownloadSizeExceededError", "MediaDecodedBudget")


class _RequestDownloadCapAbsent(ValueError):
    """Stands in for 0.33's ``MediaRequestDownloadSizeExceededError`` on a vLLM without that cap."""


def __getattr__(name: str) -> Any:
    if name == "MediaRequestDownloadSizeExceededError":
        try:
            from vllm.connections import MediaRequestDownloadSizeExceededError
        except ImportError:  # vLLM 0.32: no per-request download cap
            return _RequestDownloadCapAbsent
        return MediaRequestDownloadSizeExceededError
    if name == "DOWNLOAD_SIZE_ERRORS":
        from vllm.connections import HTTPResponseSizeExceededError, MediaDownloadSizeExceededError

        return (
            HTTPResponseSizeExceededError,
            MediaDownloadSizeExceededError,
            __getattr__("MediaRequestDownloadSizeExceededError"),
        )
    if name == "MediaDecodedBudget":
        try:
            from vllm.multimodal.media import MediaDecodedBudget
        except ImportError:  # vLLM 0.32: no decoded-media budget
            return None
        return MediaDecodedBudget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def vllm_version() -> str:
    """``vllm.__version__`` of the imported vLLM (not the installed distribution's metadata)."""
    import vllm

    return str(vllm.__version__)


def _minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def check_vllm_version(version: str | None = None) -> bool:
    """Whether ``version`` (default: the imported vLLM's) is a verified minor; log a warning if not."""
    version = vllm_version() if version is None else version
    if _minor(version) in VERIFIED_MINORS:
        return True
    verified = ", ".join(f"{a}.{b}.x" for a, b in VERIFIED_MINORS)
    logger.warning(
        "qtsplus-vllm is verified with vLLM %s; this is vLLM %s: the multimodal processor, media and "
        "model APIs it uses may have changed (see docs/vllm-versions.md for how a release is proven)",
        verified,
        version,
    )
    return False


def _image_io_takes_budget() -> bool:
    from vllm.multimodal.media.image import ImageMediaIO

    return "decoded_budget" in inspect.signature(ImageMediaIO.__init__).parameters


def image_io_kwargs(connector: object) -> dict[str, Any]:
    """Extra keyword arguments for an ``ImageMediaIO`` built on behalf of ``connector``.

    0.33: the connector's per-request ``decoded_budget``, as vLLM's own ``_image_io`` passes it.
    0.32: nothing. Its ``ImageMediaIO`` would keep an unknown keyword as a custom media-IO option.
    """
    if not _image_io_takes_budget():
        return {}
    return {"decoded_budget": getattr(connector, "decoded_budget", None)}


def charge_decoded(media_io: object, nbytes: int) -> None:
    """Charge ``nbytes`` of decoded media to ``media_io``'s request budget, where there is one (0.33)."""
    budget = getattr(media_io, "decoded_budget", None)
    if budget is not None:
        budget.charge(int(nbytes))


# The request's decoded-media budget (0.33+) while our video loader runs in a media thread: vLLM charges
# what a loader returns only when it is a frames array (>= 3 dimensions, ``VideoMediaIO.load_bytes``),
# and our loader returns the encoded bytes, so the loader charges the frames it holds itself.
_VIDEO_BUDGET: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "qtsplus_video_budget", default=None
)


@contextlib.contextmanager
def video_budget(video_io: object) -> Iterator[None]:
    """Make ``video_io``'s request budget (its frame IO's ``decoded_budget``; none on 0.32) the one
    :func:`charge_video_frames` charges in this thread."""
    token = _VIDEO_BUDGET.set(getattr(getattr(video_io, "image_io", None), "decoded_budget", None))
    try:
        yield
    finally:
        _VIDEO_BUDGET.reset(token)


def charge_video_frames(nbytes: int) -> None:
    """Charge ``nbytes`` of a video's frames to the current request's decoded-media budget (0.33+:
    ``VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES``, shared with the request's images and other videos), as
    vLLM charges the frames its own loaders return. Over it: HTTP 413 naming the variable, before
    any frame is decoded."""
    budget = _VIDEO_BUDGET.get()
    if budget is None:
        return
    used = int(getattr(budget, "used", 0))
    try:
        budget.charge(int(nbytes))
    except ValueError as err:
        import vllm.envs as envs

        from ..limits import LimitExceeded
        from .errors import as_http_error

        limit = int(getattr(envs, "VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES", 0))
        raise as_http_error(
            LimitExceeded(
                "the request's decoded media in bytes (this video's resized frames and what the "
                "request decoded before it)",
                used + int(nbytes),
                limit,
                "VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES",
            )
        ) from err


def build_chat_params(request: Any, online: Any) -> Any:
    """``request.build_chat_params`` with the server's defaults, as vLLM's chat path calls it.

    0.33 passes the renderer's ``reasoning_effort_map`` (a third parameter); 0.32 has neither.
    """
    kwargs = {}
    if "reasoning_effort_map" in inspect.signature(request.build_chat_params).parameters:
        kwargs["reasoning_effort_map"] = getattr(online, "reasoning_effort_map", None)
    return request.build_chat_params(online.chat_template, online.chat_template_content_format, **kwargs)
