"""Where a request's cancellation becomes its videos' :class:`~qtsplus_vllm.cancel.CancelToken`.

vLLM 0.32's chat endpoint runs each request as an asyncio task (``with_cancellation`` in
``entrypoints/serve/utils/api_utils.py``) and cancels it when the client disconnects. The request's
video work runs in threads that the cancellation does not reach: the media loader in vLLM's media
thread pool (``MediaConnector.load_from_url_async`` awaits it through ``run_in_executor``) and the
multimodal processor on the renderer's single processing thread (``BaseRenderer._process_multimodal_async``).
Two seams see the ``CancelledError`` on its way out:

- :func:`request_scope` wraps ``BaseRenderer.render_chat_async`` — the whole chat render: the media
  fetches and the processing — giving the request one token in a context variable that the tasks it
  starts inherit (:func:`install`); a ``CancelledError`` or any error leaving it (a sibling video
  refused) cancels the token. The token also carries the request's ``mm_processor_kwargs`` (vLLM
  hands them to the render, not to the media loader), so that the loader prepares a video at the
  request's own settings;
- the plugin's media connector (``serving.media``) takes that token (or makes its own) for each video
  it fetches, hands it to the loader in the media thread, and cancels it when the fetch is cancelled.

Cancelled videos are counted in ``qtsplus_cancelled_videos_total``; the videos in flight are
``qtsplus_videos_in_flight``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from ..cancel import CancelToken, current_token, working_for
from ..runtime import set_in_flight_listener, videos_in_flight
from .metrics import metrics

logger = logging.getLogger("vllm.qtsplus")  # under vLLM's logger tree: shown with its log settings

_WRAPPED = "_qtsplus_cancellable"


def count_cancelled(videos: int) -> None:
    if videos > 0:
        metrics().cancelled_videos.inc(videos)
        logger.info("QTSplus: %d video(s) of a cancelled request stopped", videos)


def new_token() -> CancelToken:
    return CancelToken(on_cancel=count_cancelled)


@contextlib.asynccontextmanager
async def request_scope() -> AsyncIterator[CancelToken]:
    """One request's render: a token for its videos, cancelled if the block is cancelled or fails.

    Nested scopes (our endpoint calling vLLM's renderer) share the outer token.
    """
    outer = current_token()
    if outer is not None:
        yield outer
        return
    token = new_token()
    with working_for(token):
        try:
            yield token
        except BaseException:  # the client went away, or another part of the request failed
            token.cancel()
            raise


def _cancellable(method):
    @functools.wraps(method)
    async def render(*args, **kwargs):
        async with request_scope() as token:
            extras = kwargs.get("prompt_extras") or {}
            token.mm_processor_kwargs = extras.get("mm_processor_kwargs") or None  # for the loader
            return await method(*args, **kwargs)

    setattr(render, _WRAPPED, True)
    return render


def install() -> bool:
    """Wrap vLLM's chat render in :func:`request_scope` and export the in-flight gauge (idempotent).

    False, with a warning, when this vLLM has no ``BaseRenderer.render_chat_async``: then only the
    media fetch's own cancellation is seen (a video still being loaded stops; one in the processor
    runs to its end).
    """
    set_in_flight_listener(lambda: metrics().videos_in_flight.set(videos_in_flight()))
    try:
        from vllm.renderers.base import BaseRenderer
    except ImportError:
        BaseRenderer = None
    method = getattr(BaseRenderer, "render_chat_async", None)
    if method is None:
        logger.warning(
            "QTSplus: vLLM has no BaseRenderer.render_chat_async; cancelled requests stop "
            "their video's loading but not its processing"
        )
        return False
    if not getattr(method, _WRAPPED, False):
        BaseRenderer.render_chat_async = _cancellable(method)
    return True
