"""Request limits: parsing from the environment, the checks, and where decoding enforces them."""

from __future__ import annotations

import numpy as np
import pytest

from qtsplus_vllm.limits import LimitExceeded, Limits
from qtsplus_vllm.options import parse_options
from qtsplus_vllm.testing import hostile
from qtsplus_vllm.testing.videos import make_video_bytes
from qtsplus_vllm.video import (
    PreprocessConfig,
    SamplingConfig,
    VideoDecodeError,
    decode_size,
    decode_video,
    preprocess_frames,
    vit_patch_count,
)


def test_from_env_reads_every_field_and_rejects_bad_values():
    env = {Limits.variable(name): "7" for name in Limits.__dataclass_fields__}
    limits = Limits.from_env(env)
    assert all(getattr(limits, name) == 7 for name in Limits.__dataclass_fields__)
    assert Limits.from_env({}) == Limits()
    assert Limits.from_env({"QTSPLUS_MAX_VIDEO_SECONDS": "1.5"}).max_video_seconds == 1.5
    for bad in ("0", "-3", "lots", "1e3x"):
        with pytest.raises(ValueError, match="QTSPLUS_MAX_FRAMES"):
            Limits.from_env({"QTSPLUS_MAX_FRAMES": bad})


def test_defaults_admit_the_reference_settings():
    """fps 1, 768 frames, max_pixels 360×420: the largest default video fits every limit."""
    limits = Limits()
    config = parse_options({}).preprocess_config()
    for height, width in [(360, 420), (1080, 1920), (2160, 3840), (1920, 1080)]:
        limits.check_vit_patches(vit_patch_count(768, height, width, config))
    assert vit_patch_count(768, 360, 420, config) == 276_480
    with pytest.raises(LimitExceeded, match="QTSPLUS_MAX_VIT_PATCHES"):
        limits.check_vit_patches(vit_patch_count(300, 2000, 2000, PreprocessConfig(max_pixels=12_845_056)))


def test_limit_message_names_value_limit_and_variable():
    with pytest.raises(LimitExceeded) as info:
        Limits(max_question_tokens=4).check_question_tokens(9)
    assert str(info.value) == (
        "the question's length in tokens is 9, over the limit of 4 (server setting QTSPLUS_MAX_QUESTION_TOKENS)"
    )
    assert info.value.http_status == 413 and isinstance(info.value, ValueError)


def test_vit_patch_count_matches_preprocessing():
    frames = np.zeros((5, 50, 70, 3), dtype=np.uint8)
    config = PreprocessConfig(max_pixels=64 * 28 * 28, min_pixels=16 * 28 * 28)
    inputs = preprocess_frames(frames, config)
    assert vit_patch_count(5, 50, 70, config) == inputs.pixel_values.shape[0]


@pytest.mark.parametrize(
    "limits,data,match",
    [
        (Limits(max_frame_pixels=1000), lambda: make_video_bytes(4, (64, 48)), "QTSPLUS_MAX_FRAME_PIXELS"),
        (
            Limits(max_video_seconds=10),
            lambda: hostile.flat_video(3, (16, 16), fps=0.1),
            "QTSPLUS_MAX_VIDEO_SECONDS",
        ),
        (Limits(max_source_frames=10), lambda: make_video_bytes(12, (32, 32)), "QTSPLUS_MAX_SOURCE_FRAMES"),
    ],
)
def test_decode_checks_the_header_before_decoding(limits, data, match):
    with pytest.raises(LimitExceeded, match=match):
        decode_video(data(), SamplingConfig(), limits)


def test_large_frames_are_scaled_down_while_decoding():
    data = hostile.flat_video(2, (400, 300))
    full = decode_video(data, SamplingConfig(), Limits())
    small = decode_video(data, SamplingConfig(), Limits(decode_max_pixels=200 * 150))
    assert full.frames.shape[1:3] == (300, 400)
    assert small.frames.shape[1:3] == (150, 200)
    assert decode_size(400, 300, 200 * 150) == (200, 150)
    assert decode_size(400, 300, None) == (400, 300)
    # a flat frame stays flat when the area filter shrinks it
    np.testing.assert_array_equal(small.frames[:, 0, 0], full.frames[:, 0, 0])


@pytest.mark.parametrize(
    "data,match",
    [
        (hostile.png_image, "still image"),
        (hostile.audio_only, "no video stream"),
        (lambda: hostile.flat_video(2, (402, 2)), "aspect ratio over 200"),
        (hostile.corrupt_bytes, "not a readable video"),
    ],
)
def test_media_that_is_not_a_usable_video_is_refused_before_decoding(data, match):
    with pytest.raises(VideoDecodeError, match=match):
        decode_video(data(), SamplingConfig(), Limits())


def test_tiny_and_single_frame_videos_decode():
    one = decode_video(hostile.flat_video(1, (48, 32)), SamplingConfig(), Limits())
    assert one.frames.shape == (2, 32, 48, 3)
    dot = decode_video(hostile.flat_video(4, (1, 1)), SamplingConfig(), Limits())
    assert dot.frames.shape[1:3] == (1, 1)
    assert preprocess_frames(dot.frames).num_visual_tokens > 0
