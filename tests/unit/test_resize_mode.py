"""The resize modes (issue 20 item 3): QTSPLUS_RESIZE=exact (default, the reference's bicubic, bit for
bit) and fast (FFmpeg's scaler inside the decoder's RGB conversion).

Fast mode keeps every size — frames, target size, grid, M — and changes only pixel values, within
the bounds measured here (and in benchmarks/bench_resize_mode.py on larger frames); the feature
cache, the loader's work and the processor's hash never mix the two modes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from qtsplus_vllm.limits import Limits
from qtsplus_vllm.options import SelectionOptions, parse_options
from qtsplus_vllm.runtime import SelectionRuntime
from qtsplus_vllm.settings import Settings, SettingsError
from qtsplus_vllm.streaming import (
    EncodedVideo,
    LazyVideo,
    decoder_scale,
    iter_resized,
    iter_vision_inputs,
    prepare_frames,
)
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.videos import make_video_bytes, render_frames
from qtsplus_vllm.video import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessConfig,
    SamplingConfig,
    decode_video,
    patchify,
    preprocess_frames,
    probe_video,
    scale_frames_fast,
    target_size,
)

EXACT, FAST = PreprocessConfig(), PreprocessConfig(resize="fast")
SAMPLING = SamplingConfig(fps=2.0)
# (width, height) of the source, decode_max_pixels (None: decoded at full size)
SOURCES = [
    ((640, 360), None),  # scaled down
    ((320, 240), None),  # scaled up (min_pixels)
    ((640, 480), 320 * 240),  # scaled down while decoding first (exact: area, then bicubic)
]


def _video(size, decode_max_pixels=None, frames=12, seed=3) -> LazyVideo:
    data = make_video_bytes(frames, size, 4.0, seed=seed)
    limits = Limits(decode_max_pixels=decode_max_pixels) if decode_max_pixels else None
    return LazyVideo(EncodedVideo(data, probe_video(data, SAMPLING, limits)))


def _resized(video: LazyVideo, config: PreprocessConfig) -> torch.Tensor:
    """uint8 [T', 3, h, w]: the stream's frames resized as the runtime resizes them."""
    chunks = video.chunks(4, None, decoder_scale(video.shape, config))
    return torch.cat(list(iter_resized(chunks, video.shape, config)))


# -- the setting ---------------------------------------------------------------------------------


def test_the_setting_defaults_to_exact_and_validates():
    assert Settings.from_environ({}).resize == "exact"
    assert Settings.from_environ({"QTSPLUS_RESIZE": "fast"}).resize == "fast"
    assert Settings.from_environ({"QTSPLUS_RESIZE": " FAST "}).resize == "fast"
    with pytest.raises(SettingsError, match=r"QTSPLUS_RESIZE='bicubic': must be one of exact, fast"):
        Settings.from_environ({"QTSPLUS_RESIZE": "bicubic"})
    with pytest.raises(ValueError, match="resize must be one of exact, fast"):
        PreprocessConfig(resize="bicubic")


def test_the_mode_rides_in_the_options_and_their_cache_key(monkeypatch):
    assert parse_options({}).resize == "exact" and parse_options({}).preprocess_config() == EXACT
    monkeypatch.setenv("QTSPLUS_RESIZE", "fast")
    fast = parse_options({"max_pixels": 64 * 28 * 28})
    assert fast.resize == "fast" and fast.preprocess_config().resize == "fast"
    # the processor's hash (vLLM's caches) and the kwargs it rebuilds the options from
    assert fast.cache_key() != SelectionOptions(max_pixels=64 * 28 * 28, min_pixels=64 * 28 * 28).cache_key()
    assert SelectionOptions(**dict(fast.cache_key())) == fast
    with pytest.raises(ValueError, match="unknown key"):  # a server setting, not a request's
        parse_options({"resize": "exact"})


# -- exact: unchanged ----------------------------------------------------------------------------


def test_exact_mode_is_the_reference_bicubic_bit_for_bit():
    """The default stream's pixel values equal torchvision's float bicubic+antialias (what
    qwen-vl-utils runs) on the frames decoded at full size: the path as it was before the modes."""
    video = _video((640, 360))
    frames = decode_video(bytes(video.data), SAMPLING).frames
    size = target_size(*frames.shape[1:3], frames.shape[0], EXACT)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    x = tvf.resize(x, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True).float()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected, grid = patchify((x / 255.0 - mean) / std, EXACT)
    parts = list(iter_vision_inputs(video.chunks(4), video.shape, EXACT))
    assert torch.equal(torch.cat([p for p, _ in parts]), expected)
    assert torch.equal(preprocess_frames(frames, EXACT).pixel_values, expected)
    assert decoder_scale(video.shape, EXACT) is None


# -- fast: same sizes, close pixels --------------------------------------------------------------


@pytest.mark.parametrize(("size", "decode_max_pixels"), SOURCES, ids=["down", "up", "decode-scaled"])
def test_fast_mode_keeps_the_sizes_and_stays_close(size, decode_max_pixels):
    video = _video(size, decode_max_pixels)
    exact, fast = _resized(video, EXACT), _resized(video, FAST)
    assert fast.shape == exact.shape and fast.dtype == torch.uint8
    assert exact.shape[0] == video.plan.num_frames + video.plan.num_frames % 2
    diff = (fast.int() - exact.int()).abs()
    # measured on these videos: mean 1.23-1.59 levels, max 61-92 (at the moving squares' edges:
    # the decoder scales chroma before converting), more than 8 levels on under 0.7 % of values
    assert diff.float().mean() < 2.5 and diff.max() <= 128
    assert (diff > 8).float().mean() < 0.02
    # the decoder scales straight to the target size: no full-size frame in the chunks
    (h, w) = decoder_scale(video.shape, FAST)
    assert next(iter(video.chunks(4, None, (h, w)))).shape[1:] == (h, w, 3)


def test_fast_mode_scales_frames_that_arrive_decoded():
    """Images and frame lists (already RGB) go through FFmpeg's scaler too, close to the reference
    (no chroma step: measured mean 0.007, max 2 levels)."""
    frames = render_frames(4, (640, 360), seed=1)
    size = target_size(360, 640, 4, FAST)
    fast = scale_frames_fast(frames, size)
    exact = preprocess_frames(frames, EXACT)
    x = torch.from_numpy(fast).permute(0, 3, 1, 2).float()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected, _ = patchify((x / 255.0 - mean) / std, FAST)
    inputs = preprocess_frames(frames, FAST)
    assert torch.equal(inputs.pixel_values, expected)
    assert torch.equal(inputs.grid_thw, exact.grid_thw) and inputs.resized_size == exact.resized_size
    diff = (inputs.pixel_values - exact.pixel_values).abs() * max(CLIP_STD) * 255  # in levels (at most)
    assert diff.mean() < 0.05 and diff.max() < 3
    streamed = list(iter_vision_inputs(iter([frames]), frames.shape, FAST))
    assert torch.equal(streamed[0][0], expected)


# -- the runtime: same geometry, caches kept apart ----------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("resize-mode") / "m", seed=4)


def test_selection_in_both_modes_has_the_same_geometry_and_separate_cache_entries(model):
    runtime = SelectionRuntime(model, torch.float32, "cpu")
    video = _video((640, 360), frames=16, seed=5)
    question = [5, 6, 7, 8]
    exact = runtime.select(LazyVideo(video.data), question, SelectionOptions())
    fast = runtime.select(LazyVideo(video.data), question, SelectionOptions(resize="fast"))
    assert not fast.cache_hit  # not the exact mode's features
    assert (fast.num_frames, fast.num_visual_tokens) == (exact.num_frames, exact.num_visual_tokens)
    assert fast.embeds.shape[1] == exact.embeds.shape[1]
    again = runtime.select(LazyVideo(video.data), [9, 10], SelectionOptions(resize="fast"))
    assert again.cache_hit and torch.equal(again.scores, runtime.select(
        LazyVideo(video.data), [9, 10], SelectionOptions(resize="fast")).scores)  # fmt: skip
    frames = render_frames(4, (320, 180), seed=6)  # frames that arrive decoded (an image, a list)
    eager_exact = runtime.select(frames, question, SelectionOptions())
    eager_fast = runtime.select(frames, question, SelectionOptions(resize="fast"))
    assert not eager_fast.cache_hit and eager_fast.num_visual_tokens == eager_exact.num_visual_tokens
    assert runtime.feature_cache.stats()["entries"] == 4


def test_frames_decoded_ahead_in_one_mode_are_not_used_for_the_other():
    video = _video((320, 240))
    prepared = prepare_frames(video, EXACT)
    assert prepared.matches(video, EXACT) and not prepared.matches(video, FAST)
    fast = prepare_frames(video, FAST)
    assert fast.frames.shape == prepared.frames.shape
    assert np.array_equal(fast.frames.numpy(), _resized(video, FAST).numpy())
