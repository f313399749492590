"""The fast exact resize (qtsplus_vllm.exact_resize) against the reference path, every pixel.

The reference is what qwen-vl-utils' ``fetch_video`` runs on uint8 frames [T, 3, H, W]:
``torchvision.transforms.functional.resize(frames, size, BICUBIC, antialias=True)`` — float32
interpolation, clamped to [0, 255], rounded half to even, back to uint8.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from qtsplus_vllm import exact_resize
from qtsplus_vllm.testing.videos import make_video
from qtsplus_vllm.video import (
    PreprocessConfig,
    SamplingConfig,
    decode_video,
    preprocess_frames,
    resize_frames_uint8,
    target_size,
)


def reference(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """qwen-vl-utils' resize of uint8 [T, 3, H, W] frames, as its ``fetch_video`` calls it."""
    return tvf.resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


@pytest.fixture(scope="module")
def fast():
    """The fast path must run here (x86 builds of torch; numba comes with vLLM): a test that passes
    because torchvision resized everything would prove nothing."""
    pytest.importorskip("numba", reason="numba (which vLLM brings) is not installed: torchvision resizes")
    if exact_resize.variant() is None:
        if platform.machine().lower() in ("x86_64", "amd64"):
            pytest.fail("the exact resize does not reproduce this x86 torch build")
        pytest.skip("this torch build's bicubic kernel is not reproduced here: torchvision resizes")
    return exact_resize.variant()


def _decoded(tmp_path_factory, size: tuple[int, int], frames: int = 4, seed: int = 0) -> np.ndarray:
    path = make_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames=frames, size=size, fps=4.0, seed=seed)
    video = decode_video(path, SamplingConfig(fps=4.0, min_frames=2, max_frames=frames))
    return video.frames


# (width, height) of real H.264 videos: 720p, 1080p, portrait 720p, small; odd crops of them below
VIDEO_SIZES = [(1280, 720), (1920, 1080), (720, 1280), (640, 360)]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    return {size: _decoded(tmp_path_factory, size, seed=i) for i, size in enumerate(VIDEO_SIZES)}


def _targets(height: int, width: int) -> list[tuple[int, int]]:
    """The sizes the plugin resizes such frames to: the reference demo's bounds for a short and a long
    video, and larger bounds (smaller scale factors; upscaling for small frames)."""
    sizes = {
        target_size(height, width, 4, PreprocessConfig()),
        target_size(height, width, 768, PreprocessConfig()),
        target_size(height, width, 4, PreprocessConfig(max_pixels=768 * 28 * 28)),
        target_size(height, width, 4, PreprocessConfig(min_pixels=640 * 28 * 28, max_pixels=1024 * 28 * 28)),
    }
    return sorted(sizes)


@pytest.mark.parametrize("video_size", VIDEO_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("crop", [(0, 0), (1, 3)], ids=["whole", "odd-crop"])
def test_real_frames_are_resized_exactly_as_the_reference(fast, decoded, video_size, crop):
    """Every pixel of real decoded frames, at every target size the plugin uses for them; an odd
    crop gives odd source sizes (1279x717, 1917x1077, ...) and a non-contiguous view."""
    frames = decoded[video_size]
    dy, dx = crop
    frames = frames[:, : frames.shape[1] - dy, : frames.shape[2] - dx]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # channels-last, as decoded
    height, width = x.shape[2:]
    for size in _targets(height, width):
        ours = exact_resize.resize_uint8(x, size)
        assert ours is not None, f"{width}x{height} -> {size}: the fast path did not run"
        expected = reference(x.contiguous(), size)
        assert ours.shape == expected.shape and ours.dtype == torch.uint8
        differ = (ours != expected).sum().item()
        assert differ == 0, f"{width}x{height} -> {size[1]}x{size[0]}: {differ} values differ"
        assert torch.equal(resize_frames_uint8(x, size), expected)


@pytest.mark.parametrize(
    "source, size",
    [
        ((720, 1280), (280, 504)),  # 720p, the reference bounds
        ((1080, 1920), (280, 504)),  # 1080p
        ((1280, 720), (504, 280)),  # portrait
        ((717, 1279), (252, 448)),  # odd
        ((97, 61), (56, 28)),  # tiny, odd
        ((30, 40), (56, 84)),  # upscaling on both axes
        ((56, 100), (56, 84)),  # one axis unchanged (ATen skips that pass)
        ((100, 56), (84, 56)),
        ((90, 2500), (28, 784)),  # very wide, strong downscale (25+ taps)
        ((28, 28), (28, 28)),  # nothing to do
    ],
)
def test_random_frames_are_resized_exactly_as_the_reference(fast, source, size):
    """Noise (every rounding exercised) in both layouts: channels-last views and contiguous NCHW."""
    gen = torch.Generator().manual_seed(sum(source) + sum(size))
    nhwc = torch.randint(0, 256, (3, *source, 3), dtype=torch.uint8, generator=gen)
    expected = reference(nhwc.permute(0, 3, 1, 2).contiguous(), size)
    for x in (nhwc.permute(0, 3, 1, 2), nhwc.permute(0, 3, 1, 2).contiguous()):
        ours = exact_resize.resize_uint8(x, size)
        assert ours is not None and torch.equal(ours, expected)
    # split over threads: by frames (3 = 3·1) or by bands of rows (2, 4)
    for threads in (2, 3, 4):
        ours = exact_resize._resize_nhwc(nhwc.numpy(), size, fast, threads)
        assert torch.equal(torch.from_numpy(ours), expected)


def test_extreme_values_round_like_the_reference(fast):
    """Black/white edges overshoot [0, 255] (clamped) and many values land on exact halves."""
    x = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)
    x[:, :, :, ::2] = 255
    x[:, :, ::3] = 255 - x[:, :, ::3]
    x[1] = torch.arange(64 * 96).view(64, 96) % 256
    for size in [(28, 56), (56, 28), (140, 196), (28, 84)]:
        assert torch.equal(exact_resize.resize_uint8(x, size), reference(x, size))


def test_weights_are_atens_and_windows_hold_them(fast):
    """The tables: ATen's weights (normalised: each output's weights sum to ~1), inside the windows
    computed from ATen's formula, cached per size pair."""
    table = exact_resize.axis_table(1280, 504)
    assert table is exact_resize.axis_table(1280, 504)
    assert table.weights.shape == (504, 13)  # support 2·2.54 -> 2·ceil(5.08) + 1 taps
    assert np.allclose(table.weights.sum(1), 1.0, atol=1e-5)
    assert table.starts.min() == 0 and (table.starts + table.sizes).max() == 1280
    assert set(np.unique(table.sizes[5:-5])) <= {10, 11, 12, 13}  # shorter at the edges
    identity = exact_resize.axis_table(56, 56)
    assert (identity.sizes == 1).all() and (identity.weights == 1).all()


def test_preprocessing_is_unchanged(fast, decoded):
    """The ViT inputs of real frames are those of the reference resize (pixel_values bit for bit)."""
    frames = decoded[(1280, 720)]
    config = PreprocessConfig()
    ours = preprocess_frames(frames, config)
    size = target_size(frames.shape[1], frames.shape[2], frames.shape[0], config)
    x = reference(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), size).float()
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    from qtsplus_vllm.video import patchify

    expected, grid = patchify((x / 255.0 - mean) / std, config)
    assert torch.equal(ours.grid_thw, grid) and torch.equal(ours.pixel_values, expected)


def test_what_the_fast_path_does_not_take_goes_to_torchvision(fast, monkeypatch):
    x = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8)
    assert exact_resize.resize_uint8(x.float(), (28, 56)) is None  # not uint8
    assert exact_resize.resize_uint8(x[0], (28, 56)) is None  # not [T, C, H, W]
    assert exact_resize.resize_uint8(x[:0], (28, 56)) is None  # no frames
    # a size pair whose tables did not match ATen is resized by torchvision, with the same values
    monkeypatch.setitem(exact_resize._verified, (60, 56), False)
    assert exact_resize.resize_uint8(x, (28, 56)) is None
    assert torch.equal(resize_frames_uint8(x, (28, 56)), reference(x, (28, 56)))
    # and everything within exact_resize.disabled() (comparisons of the two paths)
    with exact_resize.disabled():
        assert exact_resize.resize_uint8(x, (28, 84)) is None
    assert exact_resize.resize_uint8(x, (28, 84)) is not None
    # so is everything when this torch build is not reproduced
    monkeypatch.setattr(exact_resize, "variant", lambda: None)
    assert exact_resize.resize_uint8(x, (28, 84)) is None
    assert torch.equal(resize_frames_uint8(x, (28, 84)), reference(x, (28, 84)))


@pytest.mark.parametrize("capability, expected", [("default", "plain"), ("avx2", "fma4")])
def test_other_kernel_builds_are_reproduced_too(fast, capability, expected):
    """ATen's kernels without FMA (``ATEN_CPU_CAPABILITY=default``: every product and sum rounded)
    and with AVX2 are told apart at first use and reproduced exactly."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from qtsplus_vllm import exact_resize\n"
        "from torchvision.transforms import InterpolationMode, functional as tvf\n"
        "x = torch.randint(0, 256, (2, 720, 1280, 3), dtype=torch.uint8,\n"
        "                  generator=torch.Generator().manual_seed(3)).permute(0, 3, 1, 2)\n"
        "ours = exact_resize.resize_uint8(x, (280, 504))\n"
        "ref = tvf.resize(x.contiguous(), [280, 504], interpolation=InterpolationMode.BICUBIC, antialias=True)\n"
        "print(exact_resize.variant(), ours is not None and torch.equal(ours, ref))\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.split() == [expected, "True"], done.stderr[-2000:]


def test_many_size_pairs_are_exact(fast):
    """Sixty random (source, target) pairs, down and up, 2 to 900 pixels a side: ATen's windows as
    computed here hold its weights, and the fast path runs and matches on every pixel."""
    rng = np.random.default_rng(20)
    for _ in range(60):
        source = tuple(int(v) for v in rng.integers(2, 900, size=2))
        size = tuple(int(max(1, v * rng.uniform(0.1, 1.6))) for v in source)
        x = torch.from_numpy(rng.integers(0, 256, size=(1, *source, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
        ours = exact_resize.resize_uint8(x, size)
        assert ours is not None, f"{source} -> {size}: not taken by the fast path"
        assert torch.equal(ours, reference(x.contiguous(), size)), f"{source} -> {size}"


def test_the_oracle_selects_and_answers_the_same(fast, tmp_path):
    """The eager oracle (ReferencePipeline, tiny checkpoint) on a real 720p clip: the same kept tokens,
    the same selected rows and the same answer with the fast resize as with torchvision's."""
    from qtsplus_vllm.reference import ReferencePipeline
    from qtsplus_vllm.testing import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "model", seed=3)
    video = make_video(tmp_path / "clip.mp4", frames=8, size=(1280, 720), fps=4.0, seed=7)
    pipeline = ReferencePipeline(model)
    question = "What is moving in the video?"
    fast_answer = pipeline.answer(video, question, max_new_tokens=6)
    with exact_resize.disabled():
        slow_answer = pipeline.answer(video, question, max_new_tokens=6)
    assert torch.equal(fast_answer.selection.indices, slow_answer.selection.indices)
    assert torch.equal(fast_answer.selection.embeds, slow_answer.selection.embeds)
    assert fast_answer.token_ids == slow_answer.token_ids
