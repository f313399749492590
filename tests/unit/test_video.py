"""Decoding, sampling, resizing and patchifying videos (qtsplus_vllm.video, testing.videos)."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from qtsplus_vllm.testing.videos import make_video, render_frames
from qtsplus_vllm.video import (
    PreprocessConfig,
    SamplingConfig,
    VideoDecodeError,
    decode_video,
    preprocess_frames,
    sample_frame_indices,
    target_size,
)


@pytest.mark.parametrize(
    "total, fps, sampling, expected_count",
    [
        (12, 4.0, SamplingConfig(), 4),  # 3 s at 1 fps -> 3, raised to min_frames 4
        (300, 30.0, SamplingConfig(), 10),  # 10 s at 1 fps
        (301, 30.0, SamplingConfig(fps=2.0), 20),  # 10.03 s at 2 fps -> 20.07 -> even 20
        (3000, 10.0, SamplingConfig(max_frames=64), 64),  # 300 frames wanted, capped
        (3000, 10.0, SamplingConfig(max_frames=63), 62),  # cap rounded down to even
        (5, 25.0, SamplingConfig(), 4),  # fewer frames than min_frames*... -> bounded by total, even
        (3, 25.0, SamplingConfig(), 2),
    ],
)
def test_sampling_follows_qwen_vl_utils_rules(total, fps, sampling, expected_count):
    indices = sample_frame_indices(total, fps, sampling)
    assert len(indices) == expected_count and len(indices) % 2 == 0
    assert indices[0] == 0 and indices[-1] == total - 1
    assert indices == sorted(indices)
    # evenly spread: round(linspace(0, total - 1, n))
    n = len(indices)
    assert indices == [round(i * (total - 1) / (n - 1)) for i in range(n)]


def test_one_frame_video_keeps_the_frame_twice():
    assert sample_frame_indices(1, 30.0, SamplingConfig()) == [0, 0]
    with pytest.raises(VideoDecodeError, match="no frames"):
        sample_frame_indices(0, 30.0, SamplingConfig())


@pytest.mark.parametrize("bad", [dict(fps=0), dict(fps=float("nan")), dict(min_frames=8, max_frames=4)])
def test_bad_sampling_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_decode_keeps_the_sampled_frames(tmp_path):
    path = make_video(tmp_path / "clip.mp4", frames=12, size=(96, 64), fps=4.0, seed=5)
    video = decode_video(path)
    assert video.total_frames == 12 and video.source_fps == pytest.approx(4.0)
    assert video.frame_indices == [0, 4, 7, 11]
    assert video.timestamps == pytest.approx([0.0, 1.0, 1.75, 2.75])
    assert video.frames.shape == (4, 64, 96, 3) and video.frames.dtype == np.uint8
    # lossy H.264, but each kept frame is the rendered frame of that index, not a neighbour
    truth = render_frames(12, (96, 64), seed=5).astype(np.float32)
    for k, i in enumerate(video.frame_indices):
        errors = [np.abs(video.frames[k] - truth[j]).mean() for j in range(12)]
        assert int(np.argmin(errors)) == i and errors[i] < 6.0


def test_decode_from_bytes_and_file_url_equals_path(tmp_path):
    path = make_video(tmp_path / "clip.mp4", frames=8, size=(64, 48), fps=2.0, seed=1)
    a = decode_video(path)
    b = decode_video(path.read_bytes())
    c = decode_video(f"file://{path}")
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.frames, c.frames)


def test_make_video_is_deterministic_and_seeded(tmp_path):
    a = make_video(tmp_path / "a.mp4", frames=6, size=(32, 32), seed=2).read_bytes()
    b = make_video(tmp_path / "b.mp4", frames=6, size=(32, 32), seed=2).read_bytes()
    c = make_video(tmp_path / "c.mp4", frames=6, size=(32, 32), seed=3).read_bytes()
    assert a == b and a != c
    frames = render_frames(6, (32, 32), seed=2)
    assert all(not np.array_equal(frames[t], frames[t + 1]) for t in range(5))
    with pytest.raises(ValueError, match="even"):
        make_video(tmp_path / "odd.mp4", size=(33, 32))


def test_undecodable_inputs_raise_video_decode_error(tmp_path):
    with pytest.raises(VideoDecodeError):
        decode_video(b"\x00\x01 definitely not a video" * 64)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError):
        decode_video(empty)
    with pytest.raises(VideoDecodeError, match="not found"):
        decode_video(tmp_path / "missing.mp4")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(make_video(tmp_path / "full.mp4", frames=8, size=(32, 32)).read_bytes()[:300])
    with pytest.raises(VideoDecodeError):
        decode_video(truncated)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(8000) / 8.0) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        decode_video(path)


def _qwen_vl_utils_size(height, width, nframes, max_pixels):
    """DESIGN §2.1 / qwen-vl-utils' fetch_video bounds, written out with its constants."""
    factor = 28
    min_pixels = 128 * factor * factor
    total_pixels = 128000 * factor * factor * 0.9
    cap = max(min(768 * factor * factor, total_pixels / nframes * 2), int(min_pixels * 1.05))
    bound = min(max_pixels, cap)
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > bound:
        beta = math.sqrt(height * width / bound)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@pytest.mark.parametrize(
    "height, width, nframes, max_pixels",
    [(64, 96, 4, 360 * 420), (720, 1280, 600, 360 * 420), (1080, 1920, 768, 360 * 420), (480, 640, 8, 10**7)],
)
def test_target_size_matches_qwen_vl_utils(height, width, nframes, max_pixels):
    size = target_size(height, width, nframes, PreprocessConfig(max_pixels=max_pixels))
    assert size == _qwen_vl_utils_size(height, width, nframes, max_pixels)
    assert size[0] % 28 == 0 and size[1] % 28 == 0
    assert size[0] * size[1] <= max(max_pixels, 128 * 28 * 28 * 1.05)


def test_extreme_aspect_ratio_is_rejected():
    with pytest.raises(VideoDecodeError, match="aspect ratio"):
        target_size(2, 500, 4, PreprocessConfig())


def test_patchify_matches_transformers_video_processor():
    """Normalisation and patch layout agree with transformers' Qwen2-VL video processor."""
    frames = render_frames(4, (112, 84), seed=1)
    ours = preprocess_frames(frames, PreprocessConfig(min_pixels=28 * 28, max_pixels=10**6))
    assert ours.resized_size == (84, 112)  # already multiples of 28: no resize
    theirs = Qwen2VLVideoProcessor()(
        videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)],
        do_resize=False,
        do_sample_frames=False,
        return_tensors="pt",
    )
    assert torch.equal(ours.grid_thw, theirs["video_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, theirs["pixel_values_videos"], rtol=0, atol=1e-5)
    assert ours.num_visual_tokens == 2 * 3 * 4


def test_preprocess_pads_odd_frame_counts_and_casts():
    frames = render_frames(3, (64, 48), seed=0)
    inputs = preprocess_frames(frames, dtype=torch.bfloat16)
    assert inputs.num_frames == 4 and inputs.pixel_values.dtype == torch.bfloat16
    t, h, w = inputs.grid_thw[0].tolist()
    assert t == 2 and inputs.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    assert (h * 14, w * 14) == inputs.resized_size
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(frames.astype(np.float32))
    with pytest.raises(VideoDecodeError, match="no frames"):
        preprocess_frames(np.zeros((0, 8, 8, 3), np.uint8))


def test_a_very_wide_frame_that_resizes_to_no_rows_is_a_clear_error():
    """smart_resize floors 27x5391 (under 200:1) to 0 rows at max_pixels 360*420: a 400, not a crash."""
    config = PreprocessConfig()
    with pytest.raises(
        VideoDecodeError, match=r"frame size 5391x27 cannot be used at max_pixels=151200.*5488x0"
    ):
        target_size(27, 5391, 4, config)
    with pytest.raises(VideoDecodeError, match="5391x27"):
        preprocess_frames(np.zeros((2, 27, 5391, 3), dtype=np.uint8), config)


class _CountingContainer:
    """An opened container whose ``decode`` and ``demux`` count what they yield."""

    def __init__(self, container, counts):
        self._container, self._counts = container, counts

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._counts["decoded"] += 1
            yield frame

    def demux(self, *args, **kwargs):
        for packet in self._container.demux(*args, **kwargs):
            self._counts["demuxed"] += 1
            yield packet


@pytest.fixture
def counted(monkeypatch):
    import qtsplus_vllm.video as video

    counts = {"decoded": 0, "demuxed": 0}
    opened = video._open
    monkeypatch.setattr(video, "_open", lambda source: _CountingContainer(opened(source), counts))
    return counts


def test_a_header_that_understates_the_frame_count_stops_the_decoder_at_the_limit(counted):
    """3,000 MJPEG frames claiming 2, limit 10: 413 after about 10 decoded frames, not 3,000."""
    from qtsplus_vllm.limits import LimitExceeded, Limits
    from qtsplus_vllm.testing import hostile

    data = hostile.understated_avi(3000, claimed=2)
    with av.open(__import__("io").BytesIO(data)) as container:
        assert container.streams.video[0].frames == 2  # FFmpeg believes the header
    with pytest.raises(LimitExceeded) as info:
        decode_video(data, SamplingConfig(), Limits(max_source_frames=10))
    assert counted["decoded"] <= 11  # not 3,000
    assert str(info.value).startswith(
        "the video's frame count, counted while reading it (its header claims 2), is at least 11, "
        "over the limit of 10 (server setting QTSPLUS_MAX_SOURCE_FRAMES)"
    )
    assert info.value.http_status == 413
    # within the limit the same file decodes in full, from the true count
    counted["decoded"] = 0
    video = decode_video(data, SamplingConfig(max_frames=8), Limits(max_source_frames=3000))
    assert video.total_frames == 3000 and len(video.frames) == 8 and counted["decoded"] >= 3000


def test_counting_packets_stops_at_the_limit(counted):
    """A stream whose header gives no count is counted by demuxing, also only up to the limit."""
    from qtsplus_vllm.limits import LimitExceeded, Limits
    from qtsplus_vllm.testing import hostile

    data = hostile.understated_avi(500, claimed=0)
    with pytest.raises(LimitExceeded, match=r"header does not say.*at least 21.*QTSPLUS_MAX_SOURCE_FRAMES"):
        decode_video(data, SamplingConfig(), Limits(max_source_frames=20))
    assert counted["demuxed"] <= 22 and counted["decoded"] == 0
