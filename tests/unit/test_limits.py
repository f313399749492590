"""Request limits: parsing from the environment, the checks, and where decoding enforces them."""

from __future__ import annotations

import numpy as np
import pytest

from qtsplus_vllm.limits import REFERENCE_WORST_CASE_VIT_PATCHES, LimitExceeded, Limits
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


def _grows_past_max_pixels_possible(height: int, width: int) -> bool:
    """Whether smart_resize may take its min_pixels branch for this source (a necessary condition).

    Only that branch can end above max_pixels: the max branch floors both sides of a frame scaled
    to max_pixels, and the untouched branch is within [min_pixels, max_pixels]. It is taken when
    the sides rounded to 28 (each at least 28) cover less than min_pixels; rounding moves a side
    by at most 14, hence this bound.
    """
    return max(28, height - 14) * max(28, width - 14) < PreprocessConfig().min_pixels


def test_reference_settings_worst_case_vit_patches():
    """The README's number: the most ViT patches of any video at the reference settings.

    fps 1, 768 frames, max_pixels 360*420, min_pixels 128*28², any frame size up to
    QTSPLUS_DECODE_MAX_PIXELS (larger frames are scaled to it before resizing) and any aspect
    ratio up to 200:1; the default QTSPLUS_MAX_VIT_PATCHES admits all of them.
    """
    config = parse_options({}).preprocess_config()
    assert (config.max_pixels, config.min_pixels) == (360 * 420, 128 * 28 * 28)
    # frames within max_pixels' reach: at most max_pixels each, quantised to the 28-pixel grid
    assert vit_patch_count(768, 360, 420, config) == 276_480
    assert vit_patch_count(768, 480, 640, config) == 294_912  # 4:3
    assert vit_patch_count(768, 1080, 1920, config) <= 294_912
    worst, where, worst_under_32 = 0, None, 0
    for height in range(1, 400):
        for width in range(height, 200 * height + 1):
            if not _grows_past_max_pixels_possible(height, width):
                break
            patches = vit_patch_count(768, height, width, config)
            if patches > worst:
                worst, where = patches, (height, width)
            if width < 32 * height:
                worst_under_32 = max(worst_under_32, patches)
    assert worst_under_32 <= 294_912 < vit_patch_count(768, 19, 608, config)  # 32:1 exactly: 299,520
    # outside the min_pixels branch a frame is at most max_pixels: 192 merge windows per frame
    assert worst > 768 // 2 * 4 * (config.max_pixels // (28 * 28))
    assert (worst, where) == (REFERENCE_WORST_CASE_VIT_PATCHES, (19, 2432)) == (396_288, (19, 2432))
    assert Limits().max_vit_patches >= REFERENCE_WORST_CASE_VIT_PATCHES
    Limits().check_vit_patches(worst)
    # fewer frames never need more patches per frame (the total_pixels share only grows)
    assert vit_patch_count(2, 19, 2432, config) * 384 == worst


@pytest.mark.parametrize("value", ["1"])
def test_a_frame_limit_under_two_is_refused_with_a_clear_message(value):
    with pytest.raises(
        ValueError, match=r"^QTSPLUS_MAX_FRAMES='1': must be an integer >= 2 \(frames kept per video"
    ):
        Limits.from_env({"QTSPLUS_MAX_FRAMES": value})
    with pytest.raises(ValueError, match=r"^QTSPLUS_MAX_FRAMES=1: must be an integer >= 2 "):
        Limits(max_frames=1)
    with pytest.raises(
        ValueError, match=r"^QTSPLUS_MAX_VIDEO_BYTES=0: must be a whole number of bytes >= 1 "
    ):
        Limits(max_video_bytes=0)
    assert Limits.from_env({"QTSPLUS_MAX_FRAMES": "2"}).max_frames == 2


def test_limit_messages_write_integers_in_full():
    with pytest.raises(LimitExceeded) as info:
        Limits().check_stream(6000, 6000, None, None)
    assert "is 36,000,000, over the limit of 16,777,216 (server setting QTSPLUS_MAX_FRAME_PIXELS)" in str(
        info.value
    )
    err = LimitExceeded("the count", 11, 10, "QTSPLUS_X", at_least=True)
    assert str(err) == "the count is at least 11, over the limit of 10 (server setting QTSPLUS_X)"
    assert "is 7,200.5, over the limit of 7,200 " in str(LimitExceeded("d", 7200.5, 7200.0, "V"))
