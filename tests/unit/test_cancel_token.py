"""A cancelled request's video work stops (issue 19 item 3): every decode path, within a frame.

The token (``qtsplus_vllm.cancel``) is checked once per frame by the demux count, the decoder (the
eager, the streamed and the decoded-ahead paths), the processor's chunks and each frame of a
``data:video/jpeg`` list. These tests cancel at a known frame — a token that cancels itself at its
k-th check — and assert that the pass stops at that frame, that no decoder thread is left, and that
the frames decoded ahead and the video's place in the in-flight count go at once. The asyncio side
(the connector and the chat render see the ``CancelledError``) is checked on its own at the end;
``tests/e2e/test_cancellation.py`` aborts requests on a real server.
"""

from __future__ import annotations

import asyncio
import gc
import pickle
import threading
import time
import weakref

import numpy as np
import pytest
import torch

import qtsplus_vllm.runtime as runtime_module
from qtsplus_vllm.cancel import CancelToken, VideoCancelled, current_token, working_for
from qtsplus_vllm.limits import Limits
from qtsplus_vllm.options import SelectionOptions
from qtsplus_vllm.runtime import SelectionRuntime, release_video, track_video
from qtsplus_vllm.streaming import EncodedVideo, LazyVideo, prepare_frames
from qtsplus_vllm.testing import hostile, write_tiny_checkpoint
from qtsplus_vllm.testing.videos import make_video_bytes
from qtsplus_vllm.video import PreprocessConfig, SamplingConfig, iter_sampled_frames, probe_video


class CancelAt(CancelToken):
    """A token that cancels itself at its ``at``-th check (``at`` frames or chunks into a pass)."""

    def __init__(self, at: int, on_cancel=None):
        super().__init__(on_cancel)
        self.at, self.checks = at, 0

    def check(self, frames=None) -> None:
        self.checks += 1
        if self.checks == self.at:
            self.cancel()
        super().check(frames)


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "qtsplus-decode" and t.is_alive()]


def wait_for_no_decoder(seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while decoder_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not decoder_threads()


@pytest.fixture(scope="module")
def many_frames():
    return hostile.many_tiny_static_frames()  # 2,900 static 16x16 frames: a long pass, quickly


def demux_checks(data: bytes) -> int:
    """Checks the demux pass of ``data`` makes (one per packet)."""
    token = CancelAt(10**9)
    probe_video(data, SamplingConfig(), Limits(), token)
    return token.checks


@pytest.fixture(scope="module")
def clip():
    return make_video_bytes(61, (160, 90), 10.0, seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cancel") / "m", seed=6)


def test_the_token_counts_the_videos_it_stopped_once():
    counted = []
    token = CancelToken(on_cancel=counted.append)
    token.begin()
    token.begin()
    token.finish()  # one video done: cancelling no longer stops it
    released = []
    item = EncodedVideo(b"\0" * 8, None)
    token.release(item, released.append)
    assert not token.cancelled
    token.check()
    assert token.cancel() == 1 and token.cancel() == 0
    assert counted == [1] and released == [item]
    with pytest.raises(VideoCancelled):
        token.check(3)
    with pytest.raises(VideoCancelled):  # a video that starts after the cancellation counts too
        token.begin()
    assert counted == [1, 1]
    late = []
    token.release(item, late.append)  # released at once
    assert late == [item]
    copy = pickle.loads(pickle.dumps(token))  # another process: a fresh token, no request to follow
    assert isinstance(copy, CancelToken) and not copy.cancelled


def test_the_current_token_is_the_blocks():
    token = CancelToken()
    assert current_token() is None
    with working_for(token):
        assert current_token() is token
    assert current_token() is None


def test_the_demux_count_stops_within_a_packet(many_frames):
    token = CancelAt(100)
    with pytest.raises(VideoCancelled):
        probe_video(many_frames, SamplingConfig(), Limits(), token)
    assert token.checks == 100  # stopped at the packet it was cancelled at
    plan = probe_video(many_frames, SamplingConfig(), Limits(), CancelToken())
    assert plan.total_frames == 2900 and plan.cancel is not None
    assert plan == probe_video(many_frames, SamplingConfig(), Limits())  # not part of the plan's identity


def test_the_decoder_stops_within_a_frame(many_frames):
    plan = probe_video(many_frames, SamplingConfig(fps=2.0), Limits())
    token = CancelAt(500)
    plan = type(plan)(**{**plan.__dict__, "cancel": token})
    with pytest.raises(VideoCancelled, match="after 499 frames"):
        for _ in iter_sampled_frames(many_frames, plan):
            pass
    assert token.checks == 500


def test_the_streamed_decode_stops_and_its_thread_ends(many_frames):
    token = CancelAt(demux_checks(many_frames) + 800)
    plan = probe_video(many_frames, SamplingConfig(fps=2.0), Limits(), token)
    video = LazyVideo(EncodedVideo(many_frames, plan))
    handed = 0
    with pytest.raises(VideoCancelled):
        for chunk in video.chunks(4):
            handed += len(chunk)
    assert token.checks == demux_checks(many_frames) + 800 and handed < plan.num_frames
    wait_for_no_decoder()


def test_decoding_ahead_stops_and_keeps_nothing(many_frames):
    demux = demux_checks(many_frames)
    token = CancelAt(demux + 1000)
    video = LazyVideo(
        EncodedVideo(many_frames, probe_video(many_frames, SamplingConfig(fps=2.0), Limits(), token))
    )
    with pytest.raises(VideoCancelled):
        prepare_frames(video, PreprocessConfig())
    assert token.checks == demux + 1000 and video.prepared is None
    wait_for_no_decoder()


def test_the_loader_stops_counts_the_video_and_lets_it_go(many_frames, monkeypatch):
    """A request cancelled while the media loader decodes its video ahead: the loader raises within a
    frame, the video counts as cancelled once, and it leaves the in-flight count."""
    pytest.importorskip("vllm")
    from qtsplus_vllm.serving.video_loader import QTSplusVideoLoader, register_video_loader

    register_video_loader()
    monkeypatch.setenv("QTSPLUS_PREPARE_IN_LOADER", "1")
    monkeypatch.setattr(runtime_module, "_RUNTIMES", {})
    gc.collect()
    base = runtime_module.videos_in_flight()
    counted = []
    demux = demux_checks(many_frames)
    token = CancelAt(demux + 300, on_cancel=counted.append)  # the demux pass, then 300 decoded frames
    with working_for(token), pytest.raises(VideoCancelled):
        QTSplusVideoLoader.load_bytes(many_frames, num_frames=32, fps=2.0)
    assert token.checks == demux + 300 and counted == [1]
    gc.collect()
    assert runtime_module.videos_in_flight() == base
    wait_for_no_decoder()
    # a loader error that is not a cancellation is not counted as one
    token = CancelToken(on_cancel=counted.append)
    with working_for(token), pytest.raises(ValueError, match="max_duration"):
        QTSplusVideoLoader.load_bytes(many_frames, num_frames=32, max_duration=3)
    assert token.cancel() == 0 and counted == [1]


def test_cancelling_drops_the_frames_decoded_ahead_at_once(clip):
    """Frames decoded ahead for a request that is cancelled while it waits for the processor go when
    the token is cancelled — vLLM still holds the item until the request's task ends — and the
    video leaves the in-flight count then, not at its garbage collection."""
    token = CancelToken()
    encoded = EncodedVideo(clip, probe_video(clip, SamplingConfig(fps=4.0), Limits(), token))
    video = LazyVideo(encoded)
    encoded.prepared = prepare_frames(video, PreprocessConfig())
    frames = weakref.ref(encoded.prepared.frames)
    gc.collect()
    base = runtime_module.videos_in_flight()
    track_video(encoded)
    token.begin()
    token.release(encoded, release_video)
    assert runtime_module.videos_in_flight() == base + 1
    del video
    assert token.cancel() == 1
    gc.collect()
    assert encoded.prepared is None and frames() is None
    assert runtime_module.videos_in_flight() == base
    del encoded
    gc.collect()
    assert runtime_module.videos_in_flight() == base  # counted out once only


def test_the_processor_stops_between_chunks(model, clip):
    """The streamed path (the processor decodes next to the ViT) and frames decoded ahead: the ViT
    stops before its next chunk; the decoder thread ends."""
    options = SelectionOptions()
    runtime = SelectionRuntime(model, torch.float32, "cpu")
    runtime.feature_cache.max_bytes = 0
    token = CancelAt(demux_checks(clip) + 30)  # within the decode: the streamed path
    video = LazyVideo(EncodedVideo(clip, probe_video(clip, SamplingConfig(fps=4.0), Limits(), token)))
    with pytest.raises(VideoCancelled):
        runtime.select(video, [5, 6], options)
    wait_for_no_decoder()

    plain = probe_video(clip, SamplingConfig(fps=4.0), Limits())
    encoded = EncodedVideo(clip, plain)
    encoded.prepared = prepare_frames(LazyVideo(encoded), PreprocessConfig())
    token = CancelAt(3)  # the start, the first chunk, then the second: stops before it
    encoded.plan = type(plain)(**{**plain.__dict__, "cancel": token})
    video = LazyVideo(encoded)
    vit_calls = []
    vision = runtime.vision
    runtime.vision = lambda *args: vit_calls.append(1) or vision(*args)
    monkey_chunk = 2  # frames per ViT chunk: several chunks for this clip
    original = runtime_module.stream_chunk_frames
    runtime_module.stream_chunk_frames = lambda: monkey_chunk
    try:
        with pytest.raises(VideoCancelled):
            runtime.select(video, [5, 6], options)
    finally:
        runtime_module.stream_chunk_frames = original
        runtime.vision = vision
    assert len(vit_calls) == 1


def test_jpeg_frame_lists_stop_within_a_frame(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    import qtsplus_vllm.serving.media as media

    frames = [hostile.jpeg_frame((64, 48))] * 12
    data = hostile.jpeg_frames_url(frames).split(",", 1)[1]
    io = media.with_limits(VideoMediaIO(ImageMediaIO(image_mode="RGB"), num_frames=-1))
    counted = []
    io.cancel = CancelAt(5, on_cancel=counted.append)
    with pytest.raises(VideoCancelled, match="after 4 frames"):
        io.load_base64("video/jpeg", data)
    assert io.cancel.checks == 5 and counted == [1]
    io.cancel = CancelToken(on_cancel=counted.append)
    array, _ = io.load_base64("video/jpeg", data).media
    assert array.shape[0] == 12 and io.cancel.cancel() == 0  # decoded: not counted when cancelled later


def test_a_cancelled_render_cancels_its_token_and_the_fetch_sees_it():
    """The chat render (vLLM's ``BaseRenderer.render_chat_async``, wrapped by ``install``) and the
    media connector: the task's ``CancelledError`` cancels the request's token, which the fetches it
    started share; an error leaving the render cancels it too; a render that returns leaves it be."""
    pytest.importorskip("vllm")
    from vllm.renderers.base import BaseRenderer

    from qtsplus_vllm.serving import cancellation

    assert cancellation.install() and cancellation.install()
    wrapped = BaseRenderer.render_chat_async
    assert getattr(wrapped, "_qtsplus_cancellable", False)
    assert cancellation.install() and BaseRenderer.render_chat_async is wrapped  # idempotent

    seen: dict[str, CancelToken] = {}
    started = asyncio.Event()

    async def fetch():
        async with cancellation.request_scope() as token:  # what the connector does
            seen["fetch"] = token
            started.set()
            await asyncio.sleep(60)

    async def render(fail: bool = False):
        async with cancellation.request_scope() as token:
            seen["render"] = token
            token.begin()
            if fail:
                raise ValueError("a sibling video was refused")
            await asyncio.gather(fetch())

    async def main():
        task = asyncio.create_task(render())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen["fetch"] is seen["render"] and seen["render"].cancelled
        with pytest.raises(ValueError):
            await render(fail=True)
        assert seen["render"].cancelled
        async with cancellation.request_scope() as token:
            pass
        assert not token.cancelled

    before = cancellation.metrics().cancelled_videos._value.get()
    asyncio.run(main())
    assert cancellation.metrics().cancelled_videos._value.get() == before + 2


def test_the_in_flight_gauge_follows_the_count(clip):
    pytest.importorskip("vllm")
    from qtsplus_vllm.serving import cancellation

    cancellation.install()
    gauge = cancellation.metrics().videos_in_flight
    gc.collect()
    base = runtime_module.videos_in_flight()
    item = EncodedVideo(np.frombuffer(clip, dtype=np.uint8), None)
    track_video(item)
    assert gauge._value.get() == base + 1
    del item
    gc.collect()
    assert gauge._value.get() == base


def test_the_render_hands_the_requests_processor_kwargs_to_its_token():
    pytest.importorskip("vllm")
    from qtsplus_vllm.serving import cancellation

    seen = []

    async def render(self, conversations, chat_params, tok_params=None, *, prompt_extras=None):
        seen.append(current_token().mm_processor_kwargs)

    wrapped = cancellation._cancellable(render)
    asyncio.run(wrapped(None, [], None, prompt_extras={"mm_processor_kwargs": {"max_pixels": 1234}}))
    asyncio.run(wrapped(None, [], None))
    assert seen == [{"max_pixels": 1234}, None]
