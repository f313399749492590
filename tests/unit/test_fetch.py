"""Fetching a video over http(s): a total wall-clock deadline, and slow URLs starve nobody (issue 12 item 5).

A local media server (``qtsplus_vllm.testing.hostile.http_media_server``) provides a URL that never
answers (``/silent``) and one whose body trickles in a byte every 0.25 s (``/trickle/N``: every socket
read gets data, so only a total deadline ends it). Times are wall-clock, measured around the fetch.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time

import pytest
from vllm.connections import HTTPConnection

import qtsplus_vllm.serving.media as media
from qtsplus_vllm.limits import Limits
from qtsplus_vllm.serving.errors import QTSplusHTTPError
from qtsplus_vllm.serving.video_loader import VIDEO_PROCESSOR_NAME, register_video_loader
from qtsplus_vllm.testing import hostile
from qtsplus_vllm.testing.videos import make_video_bytes

DEADLINE = 2.0
SLACK = 1.5  # seconds past the deadline a fetch may take to come back (a loaded 2-core machine)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_video_loader()


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_video_bytes(8, (32, 32), fps=4.0, seed=1)


@pytest.fixture(scope="module")
def media_server(clip):
    with hostile.http_media_server({"clip.mp4": clip}) as url:
        yield url


@pytest.fixture
def deadline(monkeypatch):
    """QTSPLUS_FETCH_DEADLINE_SECONDS=2 for the connector; vLLM's own bounds are far looser."""
    monkeypatch.setattr(media, "server_limits", lambda: Limits(fetch_deadline_seconds=DEADLINE))
    return DEADLINE


def _rejections() -> dict[str, float]:
    from qtsplus_vllm.serving.metrics import metrics

    return {
        sample.labels["status"]: sample.value
        for family in metrics().rejected.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


async def _fetch_async(url: str, connection: HTTPConnection | None = None):
    connector = media.QTSplusMediaConnector(**({"connection": connection} if connection else {}))
    return await connector.fetch_video_async(url, video_processor=VIDEO_PROCESSOR_NAME)


def _fetch_sync(url: str):
    return media.QTSplusMediaConnector().fetch_video(url, video_processor=VIDEO_PROCESSOR_NAME)


def _timed_failure(fetch) -> tuple[QTSplusHTTPError, float]:
    start = time.monotonic()
    with pytest.raises(QTSplusHTTPError) as info:
        fetch()
    return info.value, time.monotonic() - start


def _assert_deadline_error(err: QTSplusHTTPError, url: str) -> None:
    assert err.http_status == 504, err
    assert re.search(
        rf"cannot fetch the video_url {re.escape(url)}: the download did not finish within "
        rf"QTSPLUS_FETCH_DEADLINE_SECONDS=2 s \(stopped after 2\.\d s; VLLM_VIDEO_FETCH_TIMEOUT=\d+ s per attempt",
        str(err),
    ), err


@pytest.mark.parametrize(
    "path, fetch_timeout, retries",
    [
        # vLLM alone: 1 + sleep 1 + 4 + sleep 4 + 16 = 26 s (attempt timeouts grow 4x per retry)
        ("/silent", "1", "3"),
        # vLLM alone: one 30 s attempt (its total timeout per attempt), however slow the body
        ("/trickle/100000", "30", "1"),
    ],
    ids=["silent", "trickle"],
)
def test_the_async_fetch_ends_at_the_deadline(
    media_server, monkeypatch, deadline, path, fetch_timeout, retries
):
    """Fails on the old code: 26 s / 30 s, and the message named only VLLM_VIDEO_FETCH_TIMEOUT."""
    monkeypatch.setenv("VLLM_VIDEO_FETCH_TIMEOUT", fetch_timeout)
    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", retries)
    url = media_server + path
    before = _rejections().get("504", 0)
    err, elapsed = _timed_failure(lambda: asyncio.run(_fetch_async(url, HTTPConnection(reuse_client=False))))
    assert deadline <= elapsed < deadline + SLACK, elapsed
    _assert_deadline_error(err, url)
    assert _rejections()["504"] == before + 1


@pytest.mark.parametrize(
    "path, fetch_timeout, retries",
    [
        ("/silent", "1", "3"),  # vLLM alone: 26 s
        # vLLM alone (requests: the timeout bounds each socket read): 120 bytes × 0.25 s = 30 s, then 400
        ("/trickle/120", "5", "1"),
    ],
    ids=["silent", "trickle"],
)
def test_the_sync_fetch_ends_at_the_deadline(
    media_server, monkeypatch, deadline, path, fetch_timeout, retries
):
    """``LLM.chat``'s path. Fails on the old code: 26 s / 30 s."""
    monkeypatch.setenv("VLLM_VIDEO_FETCH_TIMEOUT", fetch_timeout)
    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", retries)
    url = media_server + path
    err, elapsed = _timed_failure(lambda: _fetch_sync(url))
    assert deadline <= elapsed < deadline + SLACK, elapsed
    _assert_deadline_error(err, url)


def test_the_sync_fetch_works_inside_a_running_event_loop(media_server, deadline):
    """A synchronous caller on a thread that runs an event loop (a notebook) gets the same bound."""
    url = media_server + "/silent"

    async def caller():
        return _fetch_sync(url)

    err, elapsed = _timed_failure(lambda: asyncio.run(caller()))
    assert elapsed < deadline + SLACK
    _assert_deadline_error(err, url)


def test_the_deadline_covers_the_download_not_the_decode(media_server, clip, monkeypatch, deadline):
    """A video whose bytes arrive in time is decoded however long that takes (decode is bounded by the
    frame and pixel limits, and a deadline there would cancel nothing: the thread runs on)."""
    load = media.LimitedVideoMediaIO.load_bytes

    def slow_load(self, data):
        time.sleep(deadline + 0.5)
        return load(self, data)

    monkeypatch.setattr(media.LimitedVideoMediaIO, "load_bytes", slow_load)
    url = media_server + "/files/clip.mp4"
    assert asyncio.run(_fetch_async(url, HTTPConnection(reuse_client=False))).original_bytes == clip
    assert _fetch_sync(url).original_bytes == clip


def test_fetches_well_within_the_deadline_are_unchanged(media_server, deadline):
    """Upstream errors keep their statuses under the deadline (it is not a blanket 504)."""
    with pytest.raises(QTSplusHTTPError) as info:
        asyncio.run(_fetch_async(media_server + "/status/404", HTTPConnection(reuse_client=False)))
    assert info.value.http_status == 400
    with pytest.raises(QTSplusHTTPError) as info:
        _fetch_sync(media_server + "/loop")
    assert info.value.http_status == 400


def _held(base: str) -> int:
    import urllib.request

    with urllib.request.urlopen(base + "/held", timeout=5) as answer:
        return int(answer.read())


def test_silent_urls_hold_no_media_thread_and_no_shared_connection_slot(media_server, clip, monkeypatch):
    """110 silent URLs in flight on the API server's loop (more than vLLM's 8 media threads and its
    shared aiohttp session's 100 connections): a valid http video and a data: video still load at once.

    Fails on the old code: the valid http download waits for one of the 100 connection slots and
    times out (504) while the silent ones hold them all.
    """
    monkeypatch.setattr(media, "server_limits", lambda: Limits(fetch_deadline_seconds=60))
    monkeypatch.setenv("VLLM_VIDEO_FETCH_TIMEOUT", "30")
    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", "1")
    silent = 110

    async def scenario() -> dict[str, float]:
        # one connection for all, as vLLM's API server has (a connector without an explicit one)
        tasks = [asyncio.create_task(_fetch_async(media_server + "/silent")) for _ in range(silent)]
        try:
            for _ in range(200):  # the old code never got past 100 (vLLM's session's cap)
                if await asyncio.to_thread(_held, media_server) >= silent:
                    break
                await asyncio.sleep(0.05)
            times = {}
            for name, url in [
                ("http", media_server + "/files/clip.mp4"),
                ("data", "data:video/mp4;base64," + base64.b64encode(clip).decode()),
            ]:
                start = time.monotonic()
                video = await asyncio.wait_for(_fetch_async(url), 20)
                times[name] = time.monotonic() - start
                assert video.original_bytes == clip
            assert not any(task.done() for task in tasks)  # still held by the silent server
            assert await asyncio.to_thread(_held, media_server) >= silent
            return times
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await (await media._MEDIA_CONNECTION.get_async_client()).close()

    times = asyncio.run(scenario())
    assert max(times.values()) < 5, times


def test_image_fetches_keep_vllms_connection(monkeypatch):
    """Only video fetches get our pool and deadline; images and audio go through vLLM's code as before."""
    calls = []

    class Recorder:
        async def async_get_bytes(self, url, **kwargs):
            calls.append(("async", url))
            raise RuntimeError("recorded")

        def get_bytes(self, url, **kwargs):
            calls.append(("sync", url))
            raise RuntimeError("recorded")

    connector = media.QTSplusMediaConnector(connection=Recorder())
    with pytest.raises(RuntimeError, match="recorded"):
        connector.fetch_image("http://127.0.0.1:9/a.png")
    with pytest.raises(RuntimeError, match="recorded"):
        asyncio.run(connector.fetch_image_async("http://127.0.0.1:9/a.png"))
    assert calls == [("sync", "http://127.0.0.1:9/a.png"), ("async", "http://127.0.0.1:9/a.png")]


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_bad_deadline_stops_the_server_at_start_up(monkeypatch, value):
    from qtsplus_vllm.runtime import check_server_settings

    monkeypatch.setenv("QTSPLUS_FETCH_DEADLINE_SECONDS", value)
    with pytest.raises(ValueError, match="QTSPLUS_FETCH_DEADLINE_SECONDS"):
        check_server_settings()


def test_the_deadline_setting(monkeypatch):
    assert Limits().fetch_deadline_seconds == 120.0
    assert Limits.from_env({"QTSPLUS_FETCH_DEADLINE_SECONDS": "7.5"}).fetch_deadline_seconds == 7.5


# --- the seam with vLLM: its fetch_video(_async) build the IO, our load_from_url(_async) limit it ----


@pytest.mark.parametrize("path", ["sync", "async"])
def test_vllms_fetch_video_hands_its_video_io_to_our_limits(monkeypatch, clip, path):
    """vLLM's own ``fetch_video``/``fetch_video_async`` (we do not override them) must pass the video
    IO they build to ``load_from_url(_async)``, where ours gives it the limits: if a vLLM release
    changes that, videos would skip every byte and frame limit, and this test fails."""
    seen = []
    real = media.LimitedVideoMediaIO.load_base64

    def spy(self, media_type, data):
        seen.append((type(self).__name__, type(self.image_io).__name__))
        return real(self, media_type, data)

    monkeypatch.setattr(media.LimitedVideoMediaIO, "load_base64", spy)
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    assert "fetch_video" not in vars(media.QTSplusMediaConnector)  # vLLM's bodies, not copies
    if path == "sync":
        _fetch_sync(url)
    else:
        asyncio.run(_fetch_async(url))
    assert seen == [("LimitedVideoMediaIO", "_LimitedFrameIO")]


def test_over_the_byte_limit_through_vllms_fetch_video(monkeypatch, clip):
    monkeypatch.setattr(media, "server_limits", lambda: Limits(max_video_bytes=len(clip) // 2))
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    with pytest.raises(QTSplusHTTPError, match="QTSPLUS_MAX_VIDEO_BYTES") as err:
        _fetch_sync(url)
    assert err.value.http_status == 413


def test_images_keep_vllms_path(clip):
    from vllm.multimodal.media.image import ImageMediaIO

    assert media.with_limits(ImageMediaIO(image_mode="RGB")) is None
