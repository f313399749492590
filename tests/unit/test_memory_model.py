"""The memory model of one in-flight video (``qtsplus_vllm.memory``): what the default limits admit in
the worst case maps to the stated budget, the model follows the code's own bounds, and the docs page's (docs/long-videos.md)
"Memory per in-flight video" tables are what the model computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtsplus_vllm.limits import Limits
from qtsplus_vllm.memory import (
    MODELS,
    QTSPLUS_7B,
    TINY,
    WORST_CASE_BUDGET,
    MiB,
    kept_frames_for,
    peak_bytes,
    readme_tables,
    request_memory,
    worst_case_request,
)
from qtsplus_vllm.streaming import CHUNK_BYTES, QUEUE_CHUNKS
from qtsplus_vllm.video import PreprocessConfig, VideoDecodeError, vit_patch_count

PAGE = Path(__file__).resolve().parents[2] / "docs" / "long-videos.md"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_default_limits_worst_case_is_within_the_stated_budget(name):
    worst = worst_case_request(MODELS[name])
    assert worst.total <= WORST_CASE_BUDGET[name]
    limits = Limits()
    assert worst.held["encoded"] == limits.max_video_bytes
    assert worst.visual_tokens == limits.max_vit_patches // 4
    assert worst.working["decoded_chunks"] <= (QUEUE_CHUNKS + 2) * CHUNK_BYTES


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("select", [True, False], ids=["selection", "selection-off"])
@pytest.mark.parametrize("encode", [False, True], ids=["decode-ahead", "loader-vit"])
def test_every_mode_s_worst_case_is_within_the_stated_budget(name, select, encode):
    """Also a request that turns the selection off (all M rows, no selector: the rows' ROW_COPIES·M·D
    are in the model), and the server's default mode, where the loader streams into the ViT."""
    worst = worst_case_request(MODELS[name], select=select, encode=encode)
    assert worst.total <= WORST_CASE_BUDGET[name]
    m = Limits().max_vit_patches // 4
    if not select:
        assert worst.selected == m and worst.working["selector"] == 0
        assert worst.held["rows"] == 4 * m * MODELS[name].hidden * MODELS[name].dtype_bytes


def _most_frames(width, height, limits, config):
    for t in range(limits.max_frames - limits.max_frames % 2, 1, -2):
        try:
            patches = vit_patch_count(t, height, width, config)
        except VideoDecodeError:
            return None
        if patches <= limits.max_vit_patches:
            return t
    return None


def test_no_admitted_frame_size_exceeds_the_worst_case():
    """A search over frame sizes (wide and small ones that smart_resize scales up, 720p, 1080p, the
    largest) with the most frames the limits allow each: none costs more than the worst case."""
    limits, config = Limits(), PreprocessConfig()
    worst = worst_case_request(TINY)
    sizes = [(2432, 19), (5000, 28), (3600, 20), (1280, 720), (1920, 1080), (4096, 4096), (7680, 2160)]
    sizes += [(w, h) for w in (64, 320, 640, 1024, 1448, 2048, 3000) for h in (48, 240, 480, 720, 1088)]
    checked = 0
    for width, height in sizes:
        if width * height > limits.max_frame_pixels or max(width, height) / min(width, height) > 200:
            continue
        t = _most_frames(width, height, limits, config)
        if t is None:
            continue
        estimate = request_memory(
            encoded_bytes=limits.max_video_bytes,
            width=width,
            height=height,
            kept_frames=t,
            model=TINY,
            question_tokens=limits.max_question_tokens,
        )
        assert estimate.total <= worst.total, (width, height, t)
        for key, value in estimate.working.items():
            assert value <= worst.working[key], (width, height, key)
        checked += 1
    assert checked >= 30


def test_the_model_follows_the_streams_bounds():
    """Processor-side decoding (QTSPLUS_PREPARE_IN_LOADER=0), 720p: 32-frame chunks (96 MiB of RGB
    at most), 280×504 after resizing, M = T/2 · 10 · 18."""
    ten = request_memory(encoded_bytes=0, width=1280, height=720, kept_frames=600, prepare=False)
    assert ten.chunk_frames == 32 and ten.resized == (280, 504) and ten.visual_tokens == 54_000
    assert ten.working["decoded_chunks"] == (QUEUE_CHUNKS + 2) * 32 * 1280 * 720 * 3
    assert "prepared" not in ten.held and ten.loader_bytes == 0
    # 1080p: fewer frames per chunk, the same bytes
    full_hd = request_memory(encoded_bytes=0, width=1920, height=1080, kept_frames=600, prepare=False)
    assert (
        full_hd.chunk_frames == 16 and full_hd.working["decoded_chunks"] <= (QUEUE_CHUNKS + 2) * CHUNK_BYTES
    )
    # the stream's working set does not grow with the length: only the features and the selector do
    sixty = request_memory(encoded_bytes=0, width=1280, height=720, kept_frames=768, prepare=False)
    for key in ("decoded_chunks", "decoder", "resize", "chunk_pixels", "vit"):
        assert sixty.working[key] == ten.working[key]
    assert sixty.features == ten.features * 69_120 // 54_000


def test_the_model_follows_the_loaders_bounds():
    """Decoding ahead in the loader (the default): the resized uint8 frames are held (T·3·h·w, 1,176 B
    per ViT patch), the media thread decodes one resize batch per chunk, the processor has no decoder."""
    ten = request_memory(encoded_bytes=0, width=1280, height=720, kept_frames=600)
    assert ten.prepare and ten.held["prepared"] == 600 * 3 * 280 * 504 == 54_000 * 4 * 1176
    assert ten.working["decoded_chunks"] == (QUEUE_CHUNKS + 2) * 8 * 1280 * 720 * 3
    w = ten.working
    assert ten.loader_bytes == w["decoded_chunks"] + w["decoder"] + w["resize"]
    assert ten.processor_bytes == max(w["chunk_pixels"], w["vit"], w["selector"])
    assert ten.working_bytes == max(ten.loader_bytes, ten.processor_bytes)
    streamed = request_memory(encoded_bytes=0, width=1280, height=720, kept_frames=600, prepare=False)
    assert ten.processor_bytes < streamed.processor_bytes  # no decoder next to the ViT
    # what the loader holds grows with the kept frames, its working set does not
    sixty = request_memory(encoded_bytes=0, width=1280, height=720, kept_frames=768)
    assert sixty.loader_bytes == ten.loader_bytes and sixty.held["prepared"] > ten.held["prepared"]


def test_the_model_follows_the_loaders_stream_into_the_vit():
    """``QTSPLUS_PREPARE_IN_LOADER=vit`` (the server's default): nothing is held resized; each video
    being loaded has the streamed path's working set (decoder, chunks, resize, chunk pixels, ViT) in
    its media thread; the processor's is the selector's alone."""
    ten = request_memory(encoded_bytes=0, width=1280, height=720, kept_frames=600, encode=True)
    streamed = request_memory(encoded_bytes=0, width=1280, height=720, kept_frames=600, prepare=False)
    assert ten.encode and not ten.prepare and "prepared" not in ten.held
    assert ten.held == streamed.held and ten.working == streamed.working
    w = ten.working
    assert ten.loader_bytes == w["decoded_chunks"] + w["decoder"] + max(
        w["resize"] + w["chunk_pixels"], w["vit"]
    )
    assert ten.processor_bytes == w["selector"]
    assert ten.total == ten.held_bytes + ten.features + max(ten.loader_bytes, ten.processor_bytes)
    four = peak_bytes([ten] * 4)
    assert four == 4 * (ten.held_bytes + ten.features + ten.loader_bytes) + w["selector"]


def test_held_and_working_parts_add_up_over_videos_in_flight():
    one = request_memory(encoded_bytes=100 * MiB, width=1280, height=720, kept_frames=600, model=QTSPLUS_7B)
    assert one.total == one.held_bytes + one.features + one.working_bytes
    four = peak_bytes([one] * 4)
    # every video loads in parallel (its own loader working set); the processor runs one at a time
    assert four == 4 * (one.held_bytes + one.features + one.loader_bytes) + one.processor_bytes
    assert four <= 4 * one.total
    assert peak_bytes([one] * 4, api_servers=2) == four + one.processor_bytes
    streamed = request_memory(
        encoded_bytes=100 * MiB, width=1280, height=720, kept_frames=600, model=QTSPLUS_7B, prepare=False
    )
    assert (
        peak_bytes([streamed] * 4) == 4 * (streamed.held_bytes + streamed.features) + streamed.working_bytes
    )
    # a data: URL is held as base64 text too; http bodies are joined from their chunks
    data = request_memory(encoded_bytes=100 * MiB, width=1280, height=720, kept_frames=600, source="data")
    assert data.held["encoded"] > 3.6 * 100 * MiB


def test_kept_frames_follow_the_sampling_defaults():
    assert kept_frames_for(120, 30) == 120
    assert kept_frames_for(600, 30) == 600
    assert kept_frames_for(1800, 30) == 768
    assert kept_frames_for(1, 30) == 4


def _readme_section() -> str:
    text = PAGE.read_text()
    start = text.index("## Memory per in-flight video")
    return text[start : text.index("\n## ", start + 10)]


def test_readme_tables_are_the_models():
    section = _readme_section()
    assert readme_tables() in section
    assert "QTSPLUS_MEMORY_BOUND_MINUTES=10" in section
