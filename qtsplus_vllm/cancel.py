"""Cancellation of a request's video work: one token per request, checked by every decode loop.

vLLM cancels a request's asyncio task when its client disconnects; the work the request started in
threads — the media loader decoding (and resizing) its video in vLLM's media pool, the processor
decoding it as a stream next to the ViT — does not see that. A :class:`CancelToken` is the bridge:
the serving layer creates one per request where it sees the asyncio cancellation
(``qtsplus_vllm.serving.cancellation``), the loader attaches it to the video's sampling plan
(``VideoPlan.cancel``), and every loop over a video's frames or packets calls :meth:`CancelToken.check`
once per frame: the demux count, the decoder, the stream's chunks in the processor, the ViT's chunks
of frames decoded ahead, and each frame of a ``data:video/jpeg`` list. A cancelled token makes them
raise :class:`VideoCancelled` within a frame; the frames they held go with the exception, and
:meth:`CancelToken.cancel` drops the frames a video decoded ahead is still holding
(``EncodedVideo.prepared``) and counts it out of the videos in flight at once.

Torch only and the standard library: nothing here imports vLLM.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping


class VideoCancelled(Exception):
    """The request that owns this video was cancelled (its client went away): its work stops here."""

    def __init__(self, frames: int | None = None):
        where = f" after {frames} frames" if frames is not None else ""
        super().__init__(f"the request was cancelled; its video's work stopped{where}")


class CancelToken:
    """Set once when a request is cancelled.

    Each video of the request counts itself in with :meth:`begin` when its work starts and out with
    :meth:`finish` when its selection is done, and may leave a :meth:`release` callback for what it
    holds. ``on_cancel(videos)`` is called once by :meth:`cancel` with the number of videos begun
    and not finished (the work cancelling stopped), and with 1 for each video begun afterwards.
    """

    # the request's own ``mm_processor_kwargs`` (they reach vLLM's processor only): the loader prepares
    # the video at the request's settings, so a request with its own max_pixels is not decoded twice
    mm_processor_kwargs: Mapping[str, object] | None = None

    def __init__(self, on_cancel: Callable[[int], None] | None = None):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._releases: list[tuple[weakref.ref, Callable[[object], None]]] = []
        self._pending = 0
        self._on_cancel = on_cancel

    def __reduce__(self):  # a copy in another process has no request to follow
        return (CancelToken, ())

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, frames: int | None = None) -> None:
        """Raise :class:`VideoCancelled` if the request was cancelled (call once per frame)."""
        if self._event.is_set():
            raise VideoCancelled(frames)

    def begin(self) -> None:
        """A video's work starts; raises :class:`VideoCancelled` (and counts it) if already cancelled."""
        with self._lock:
            late = self._event.is_set()
            if not late:
                self._pending += 1
        if late:
            if self._on_cancel is not None:
                self._on_cancel(1)
            raise VideoCancelled(0)

    def finish(self) -> None:
        """A begun video's work is done (its selection returned): cancelling no longer stops it."""
        with self._lock:
            self._pending = max(0, self._pending - 1)

    def release(self, video: object, callback: Callable[[object], None]) -> None:
        """``callback(video)`` when the token is cancelled (now, if it is), unless ``video`` is garbage by then."""
        with self._lock:
            late = self._event.is_set()
            if not late:
                self._releases.append((weakref.ref(video), callback))
        if late:
            callback(video)

    def cancel(self) -> int:
        """Cancel (idempotent); the number of videos whose work this stopped, 0 the second time."""
        with self._lock:
            if self._event.is_set():
                return 0
            self._event.set()
            pending, self._pending = self._pending, 0
            releases, self._releases = self._releases, []
        for ref, callback in releases:
            video = ref()
            if video is not None:
                callback(video)
        if pending and self._on_cancel is not None:
            self._on_cancel(pending)
        return pending


_CURRENT: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("qtsplus_cancel", default=None)


def current_token() -> CancelToken | None:
    """The token of the request whose work runs in this context (thread or task), if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def working_for(token: CancelToken | None) -> Iterator[None]:
    """Run the block as work of ``token``'s request (:func:`current_token` returns it meanwhile)."""
    reset = _CURRENT.set(token)
    try:
        yield
    finally:
        _CURRENT.reset(reset)


def check(token: CancelToken | None, frames: int | None = None) -> None:
    """:meth:`CancelToken.check` for an optional token."""
    if token is not None:
        token.check(frames)
