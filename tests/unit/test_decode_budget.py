"""The decode-work budget and the decode deadline (issue 19 item 1).

Decode cost is source frames × source pixels, not file bytes: a few kB of static H.264 can hold a
decoder for minutes. ``QTSPLUS_MAX_DECODE_WORK`` bounds one pass over a video — checked before
decoding where the header or the demux count tells the frame count (413 at once), and frame by frame
while demuxing and decoding, in every decode path (eager, streamed, decoded ahead, ``data:video/jpeg``),
for what they cannot tell. ``QTSPLUS_DECODE_TIMEOUT_SECONDS`` is the wall-clock second line (504).
"""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from qtsplus_vllm.limits import MIN_FRAME_WORK_PIXELS, DecodeTimeout, LimitExceeded, Limits
from qtsplus_vllm.streaming import EncodedVideo, LazyVideo, prepare_frames
from qtsplus_vllm.testing import hostile
from qtsplus_vllm.video import (
    PreprocessConfig,
    SamplingConfig,
    decode_video,
    iter_sampled_frames,
    probe_video,
)

WORK = "QTSPLUS_MAX_DECODE_WORK"
TIMEOUT = "QTSPLUS_DECODE_TIMEOUT_SECONDS"


@pytest.fixture(scope="module")
def tiny():
    return hostile.many_tiny_static_frames()  # 2,900 static 16×16 frames, ~80 kB


@pytest.fixture(scope="module")
def huge():
    return hostile.huge_static_frames()  # 6 static 4096×4096 frames, ~7 kB


def test_the_default_admits_every_video_the_other_limits_admit():
    limits = Limits()
    assert limits.decode_work_limit == 432_000 * 4096 * 4096
    # the corners of what the frame-count and frame-size limits admit
    for frames, width, height in [(432_000, 4096, 4096), (432_000, 1, 1), (1, 4096, 4096), (432_000, 16, 16)]:
        limits.check_stream(width, height, None, frames)
    # derived from the effective limits, also after dataclasses.replace
    lowered = Limits.from_env({"QTSPLUS_MAX_SOURCE_FRAMES": "1000", "QTSPLUS_MAX_FRAME_PIXELS": "100"})
    assert lowered.decode_work_limit == 1000 * MIN_FRAME_WORK_PIXELS
    assert dataclasses.replace(limits, max_source_frames=10).decode_work_limit == 10 * 4096 * 4096
    assert Limits.from_env({WORK: "12345"}).decode_work_limit == 12345
    assert Limits.from_env({TIMEOUT: "2.5"}).decode_timeout_seconds == 2.5


@pytest.mark.parametrize("variable, value", [(WORK, "0"), (WORK, "lots"), (TIMEOUT, "-1"), (TIMEOUT, "soon")])
def test_bad_settings_are_refused_at_start_up(variable, value):
    from qtsplus_vllm.runtime import check_server_settings

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(variable, value)
        with pytest.raises(ValueError, match=variable):
            check_server_settings()


@pytest.mark.parametrize(
    "video, frames, size",
    [("tiny", 2900, (16, 16)), ("huge", 6, (4096, 4096))],
    ids=["many-tiny-static-frames", "huge-static-frames"],
)
def test_probe_refuses_over_the_budget_at_once(request, video, frames, size):
    """Where the demux pass knows the frame count: 413 naming the setting, before any decoding."""
    data = request.getfixturevalue(video)
    work = frames * max(size[0] * size[1], MIN_FRAME_WORK_PIXELS)
    probe_video(data, SamplingConfig(), Limits(max_decode_work=work))  # exactly at the budget: served
    start = time.perf_counter()
    with pytest.raises(LimitExceeded) as info:
        probe_video(data, SamplingConfig(), Limits(max_decode_work=work - 1))
    assert time.perf_counter() - start < 1.0
    assert info.value.http_status == 413 and info.value.variable == WORK
    assert re.search(
        rf"decode work \(at least {frames:,} source frames|decode work .*counted while reading it|"
        rf"decode work \({frames:,} source frames of {size[0]}x{size[1]}",
        str(info.value),
    ), info.value
    assert WORK in str(info.value)


def test_the_demux_pass_stops_at_the_budget_when_the_header_does_not_tell():
    """An AVI whose header claims 2 frames: the demux pass counts them and stops at the budget."""
    data = hostile.understated_avi(3200)  # 16×16 frames: each counts as 128²
    limits = Limits(max_decode_work=100 * MIN_FRAME_WORK_PIXELS)
    with pytest.raises(LimitExceeded, match=r"counted while reading it.*QTSPLUS_MAX_DECODE_WORK") as info:
        probe_video(data, SamplingConfig(), limits)
    assert info.value.value == 101 * MIN_FRAME_WORK_PIXELS  # stopped at the first frame over it


def _over_after_probe(data: bytes, frames_allowed: int, size: tuple[int, int]) -> LazyVideo:
    """A video probed under the default limits, then decoded under a budget of ``frames_allowed``
    frames (what a decoder meets when the header and demux count understate the work)."""
    plan = probe_video(data, SamplingConfig(), Limits())
    budget = frames_allowed * max(size[0] * size[1], MIN_FRAME_WORK_PIXELS)
    return LazyVideo(EncodedVideo(data, dataclasses.replace(plan, limits=Limits(max_decode_work=budget))))


@pytest.mark.parametrize("path", ["iter_sampled_frames", "stream", "prepare", "decode_video"])
def test_every_decode_path_stops_within_a_frame_of_the_budget(huge, path):
    video = _over_after_probe(huge, 2, (4096, 4096))
    decoded = []
    runs = {
        "iter_sampled_frames": lambda: decoded.extend(iter_sampled_frames(video.data, video.plan)),
        "stream": lambda: decoded.extend(video.chunks(2)),
        "prepare": lambda: prepare_frames(video, PreprocessConfig()),
        "decode_video": lambda: decode_video(video.data, SamplingConfig(), video.plan.limits),
    }
    start = time.perf_counter()
    with pytest.raises(LimitExceeded) as info:
        runs[path]()
    elapsed = time.perf_counter() - start
    assert info.value.variable == WORK and info.value.http_status == 413
    if path != "decode_video":  # the eager path checks the header's count first (at once)
        assert "counted while reading it" in str(info.value)
        assert info.value.value == 3 * 4096 * 4096  # the third frame: stopped there
    assert elapsed < 1.0, elapsed


def test_the_deadline_stops_decoding_with_504(tiny):
    """2,900 frames decode in ~0.25 s here: a 0.02 s deadline stops the pass at the first frame after it."""
    plan = probe_video(tiny, SamplingConfig(), Limits())
    short = dataclasses.replace(plan, limits=Limits(decode_timeout_seconds=0.02))
    start = time.perf_counter()
    with pytest.raises(DecodeTimeout) as info:
        list(iter_sampled_frames(tiny, short))
    elapsed = time.perf_counter() - start
    assert info.value.http_status == 504 and info.value.variable == TIMEOUT
    assert re.search(
        r"decoding the video took 0\.0\d\d s \([\d,]+ frames read\), over the limit of 0\.02 s "
        r"\(server setting QTSPLUS_DECODE_TIMEOUT_SECONDS\); the decoder stopped there",
        str(info.value),
    ), info.value
    assert elapsed < 0.02 + 0.5, elapsed
    with pytest.raises(DecodeTimeout):  # the demux pass too
        probe_video(tiny, SamplingConfig(), Limits(decode_timeout_seconds=1e-9))


def test_the_consumers_time_does_not_count(tiny):
    """The streamed path hands each frame to the ViT: the time the consumer takes is not the decoder's."""
    plan = probe_video(tiny, SamplingConfig(), Limits())  # 48 s of video: 48 frames kept
    limits = Limits(decode_timeout_seconds=1.5)
    slow_consumer = 0.0
    for _ in iter_sampled_frames(tiny, dataclasses.replace(plan, limits=limits)):
        time.sleep(0.05)
        slow_consumer += 0.05
    assert slow_consumer > limits.decode_timeout_seconds


def test_loader_answers_413_and_504(tiny, monkeypatch):
    """Through our vLLM loader: the statuses vLLM answers with, and the settings named."""
    pytest.importorskip("vllm")
    import qtsplus_vllm.serving.video_loader as video_loader
    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    monkeypatch.setattr(video_loader, "server_limits", lambda: Limits(max_decode_work=1000 * 128 * 128))
    with pytest.raises(QTSplusHTTPError, match=WORK) as info:
        video_loader.QTSplusVideoLoader.load_bytes(tiny, num_frames=32)
    assert info.value.http_status == 413
    monkeypatch.setattr(video_loader, "server_limits", lambda: Limits(decode_timeout_seconds=1e-9))
    with pytest.raises(QTSplusHTTPError, match=TIMEOUT) as info:
        video_loader.QTSplusVideoLoader.load_bytes(tiny, num_frames=32)
    assert info.value.http_status == 504


def test_jpeg_frame_lists_count_against_the_budget(monkeypatch):
    """``data:video/jpeg``: each frame's header size counts before it is decoded."""
    pytest.importorskip("vllm")
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    import qtsplus_vllm.serving.media as media
    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    frames = [hostile.jpeg_frame((1000, 1000))] * 6
    data = hostile.jpeg_frames_url(frames).split(",", 1)[1]

    def jpeg_io(limits: Limits):
        monkeypatch.setattr(media, "server_limits", lambda: limits)
        return media.with_limits(VideoMediaIO(ImageMediaIO(image_mode="RGB"), num_frames=-1))

    array, _ = jpeg_io(Limits(max_decode_work=6_000_000)).load_base64("video/jpeg", data).media
    assert array.shape[0] == 6
    with pytest.raises(QTSplusHTTPError, match=r"counted while reading it.*QTSPLUS_MAX_DECODE_WORK") as info:
        jpeg_io(Limits(max_decode_work=5_999_999)).load_base64("video/jpeg", data)
    assert info.value.http_status == 413
    with pytest.raises(QTSplusHTTPError, match=TIMEOUT) as info:
        jpeg_io(Limits(decode_timeout_seconds=1e-9)).load_base64("video/jpeg", data)
    assert info.value.http_status == 504
