"""Lazy video items and the streamed decode -> preprocess -> ViT path (issue 12 items 1, 2, 3, 6, 8).

The loader returns the encoded bytes with a sampling plan; the processor decodes them as a stream of
chunks into the ViT. These tests hold the streamed path to today's eager one: the same frames, the
same pixel_values bit for bit, the same ViT rows (chunking by temporal patches), the same selection;
and check what vLLM does with such an item (passes it through, hashes the encoded bytes), that a
follow-up question decodes nothing, that errors found while decoding are 400s, and that the decoder
holds a bounded number of frames.
"""

from __future__ import annotations

import dataclasses
import threading
import tracemalloc

import numpy as np
import pytest
import torch

import qtsplus_vllm.streaming as streaming
from qtsplus_vllm.limits import Limits
from qtsplus_vllm.options import SelectionOptions
from qtsplus_vllm.runtime import SelectionRuntime
from qtsplus_vllm.streaming import (
    EncodedVideo,
    LazyVideo,
    frame_chunks,
    is_encoded_video,
    iter_vision_inputs,
)
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.videos import make_video_bytes
from qtsplus_vllm.video import (
    FrameCountMismatch,
    PreprocessConfig,
    SamplingConfig,
    VideoDecodeError,
    decode_video,
    preprocess_frames,
    probe_video,
)

# (id, frames, (width, height), fps, sampling, limits): sizes, frame counts that are no multiple of
# the chunk, a video of an odd number of source frames, one that needs the decode-size scaling
VIDEOS = [
    ("96x64-37f", 37, (96, 64), 5.0, SamplingConfig(fps=2.0), None),
    ("64x48-7f-odd", 7, (64, 48), 2.0, SamplingConfig(fps=2.0), None),
    ("160x90-61f", 61, (160, 90), 10.0, SamplingConfig(fps=4.0), Limits()),
    ("one-frame", 1, (64, 64), 4.0, SamplingConfig(), Limits()),
    ("320x240-scaled", 50, (320, 240), 10.0, SamplingConfig(fps=2.0), Limits(decode_max_pixels=160 * 100)),
    ("48x320-tall", 24, (48, 320), 8.0, SamplingConfig(fps=8.0, max_frames=18), Limits()),
]


@pytest.fixture(scope="module")
def videos():
    return {
        name: (make_video_bytes(frames, size, fps, seed=i), sampling, limits)
        for i, (name, frames, size, fps, sampling, limits) in enumerate(VIDEOS)
    }


def lazy(data: bytes, sampling: SamplingConfig, limits: Limits | None) -> LazyVideo:
    return LazyVideo(EncodedVideo(data, probe_video(data, sampling, limits)))


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
def test_the_plan_and_the_frames_are_decode_videos(videos, name):
    data, sampling, limits = videos[name]
    expected = decode_video(data, sampling, limits)
    video = lazy(data, sampling, limits)
    assert list(video.plan.frame_indices) == expected.frame_indices
    assert video.plan.total_frames == expected.total_frames
    assert video.plan.source_fps == pytest.approx(expected.source_fps)
    assert video.shape == expected.frames.shape and len(video) == len(expected.frames)
    np.testing.assert_array_equal(video.to_array(), expected.frames)
    # chunks of any even size, the last one shorter, concatenate to the same frames
    for chunk in (2, 4, 6):
        timings = {}
        chunks = list(video.chunks(chunk, timings))
        assert all(len(c) == chunk for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk
        np.testing.assert_array_equal(np.concatenate(chunks), expected.frames)
        assert timings["decode_ms"] > 0
    # indexing (the introspection endpoint's thumbnails) walks one pass forward
    for i in (0, 1, len(video) - 1, 1):
        np.testing.assert_array_equal(video[i], expected.frames[i])


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
@pytest.mark.parametrize("chunk", [2, 6])
def test_streamed_pixel_values_are_bit_identical_to_preprocess_frames(videos, name, chunk):
    """The ViT inputs of the streamed path, chunk by chunk, are today's whole-video inputs."""
    data, sampling, limits = videos[name]
    config = PreprocessConfig()
    expected = preprocess_frames(decode_video(data, sampling, limits).frames, config)
    video = lazy(data, sampling, limits)
    parts = list(iter_vision_inputs(video.chunks(chunk), video.shape, config))
    pixel_values = torch.cat([p for p, _ in parts])
    assert pixel_values.dtype == expected.pixel_values.dtype
    assert torch.equal(pixel_values, expected.pixel_values)
    grids = torch.cat([g for _, g in parts])
    assert (grids[:, 1:] == expected.grid_thw[:, 1:]).all()
    assert int(grids[:, 0].sum()) == int(expected.grid_thw[0, 0])


@pytest.mark.parametrize("count", [1, 3, 7, 10])
def test_eager_frames_in_chunks_are_bit_identical_including_an_odd_count(count):
    """Decoded frames (JPEG lists, images) go through the same chunks; an odd T gets its last frame repeated."""
    rng = np.random.default_rng(count)
    frames = rng.integers(0, 256, size=(count, 70, 90, 3), dtype=np.uint8)
    config = PreprocessConfig(max_pixels=64 * 28 * 28, min_pixels=16 * 28 * 28)
    expected = preprocess_frames(frames, config)
    parts = list(iter_vision_inputs(frame_chunks(frames, 4), frames.shape, config))
    assert torch.equal(torch.cat([p for p, _ in parts]), expected.pixel_values)


# -- vLLM's side of a lazy item -------------------------------------------------------------------


def test_vllm_passes_the_encoded_video_through_and_hashes_its_bytes(videos):
    """(a) vLLM's parser hands our array to the processor untouched, (b) its hasher hashes the
    encoded bytes, not a decoded copy (so its caches stay content-keyed at the cost of one pass)."""
    from vllm.multimodal.hasher import MultiModalHasher
    from vllm.multimodal.media import MediaWithBytes
    from vllm.multimodal.parse import MultiModalDataParser, VideoProcessorItems

    from qtsplus_vllm.serving.video_loader import QTSplusVideoLoader, register_video_loader

    register_video_loader()
    data, _, _ = videos["160x90-61f"]
    encoded, metadata = QTSplusVideoLoader.load_bytes(data, num_frames=32, fps=4.0)
    item = MediaWithBytes((encoded, metadata), data)
    items = MultiModalDataParser().parse_mm_data({"video": [item]})["video"]
    assert isinstance(items, VideoProcessorItems)
    assert items.get(0) is encoded and is_encoded_video(items.get(0))

    def digest(video_item):
        return MultiModalHasher.hash_kwargs("blake3", video=video_item)

    for_hash = items.get_item_for_hash(0)
    assert isinstance(for_hash, tuple) and for_hash[1] == metadata  # the plan's indices are hashed too
    # the digest is the encoded bytes': any other array of that size hashes the same, other bytes not
    other = EncodedVideo(np.zeros(len(data), np.uint8), encoded.plan)
    assert digest((MediaWithBytes(encoded, data), metadata)) == digest(
        (MediaWithBytes(other, data), metadata)
    )
    changed = data[:-1] + bytes([data[-1] ^ 1])
    assert digest((MediaWithBytes(encoded, data), metadata)) != digest(
        (MediaWithBytes(encoded, changed), metadata)
    )
    # another sampling of the same bytes is another item
    resampled, metadata2 = QTSplusVideoLoader.load_bytes(data, num_frames=32, fps=2.0)
    assert digest((MediaWithBytes(encoded, data), metadata)) != digest(
        (MediaWithBytes(resampled, data), metadata2)
    )


def test_an_encoded_video_survives_pickling(videos):
    import pickle

    data, sampling, limits = videos["96x64-37f"]
    encoded = EncodedVideo(data, probe_video(data, sampling, limits))
    copy = pickle.loads(pickle.dumps(encoded))
    assert is_encoded_video(copy) and copy.plan == encoded.plan and copy.tobytes() == data


# -- the runtime: chunked ViT, follow-ups, count mismatches, errors --------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("streaming") / "m", seed=4)


@pytest.fixture(scope="module")
def runtime(model):
    return SelectionRuntime(model, torch.float32, "cpu")


def test_chunked_vit_equals_one_pass_over_the_video(runtime, videos, monkeypatch):
    data, sampling, limits = videos["160x90-61f"]
    config = PreprocessConfig()
    inputs = preprocess_frames(decode_video(data, sampling, limits).frames, config)
    with torch.inference_mode():
        whole = runtime.vision(inputs.pixel_values, inputs.grid_thw)
    question = [5, 6, 7, 8]
    expected = runtime.selector.select(whole, runtime.embed_question(question))
    for chunk in ("2", "4", "32"):
        monkeypatch.setenv("QTSPLUS_STREAM_CHUNK_FRAMES", chunk)
        timings = {"decode_ms": 0.0, "decode_wait_ms": 0.0, "preprocess_ms": 0.0, "vit_ms": 0.0}
        with torch.inference_mode():
            features = runtime._encode(lazy(data, sampling, limits), config, timings)
        assert features.visual.shape == whole.shape
        assert features.grid_thw == tuple(int(v) for v in inputs.grid_thw[0])
        torch.testing.assert_close(features.visual, whole, rtol=1e-5, atol=1e-5)
        with torch.inference_mode():
            got = runtime.selector.select(features.visual, runtime.embed_question(question))
        assert torch.equal(got.indices, expected.indices)
        assert all(timings[k] > 0 for k in ("decode_ms", "preprocess_ms", "vit_ms"))


def test_lazy_and_eager_items_select_the_same_rows_and_a_follow_up_decodes_nothing(
    model, videos, monkeypatch
):
    data, sampling, limits = videos["160x90-61f"]
    frames = decode_video(data, sampling, limits).frames
    options = SelectionOptions()
    eager = SelectionRuntime(model, torch.float32, "cpu").select(frames, [5, 6, 7], options)
    warm = SelectionRuntime(model, torch.float32, "cpu")
    first = warm.select(lazy(data, sampling, limits), [5, 6, 7], options)
    assert not first.cache_hit and first.timings_ms["decode_ms"] > 0
    assert first.n == eager.n and torch.equal(first.indices, eager.indices)
    torch.testing.assert_close(first.embeds, eager.embeds, rtol=1e-5, atol=1e-5)
    assert (first.num_frames, first.grid_thw) == (eager.num_frames, eager.grid_thw)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a follow-up question decoded the video")

    monkeypatch.setattr(streaming, "iter_sampled_frames", no_decoding)
    follow_up = warm.select(lazy(data, sampling, limits), [9, 10, 11], options)  # a new request's item
    assert follow_up.cache_hit and follow_up.timings_ms["decode_ms"] == 0.0
    assert follow_up.timings_ms["vit_ms"] == 0.0 and follow_up.timings_ms["preprocess_ms"] == 0.0
    cold = SelectionRuntime(model, torch.float32, "cpu")
    monkeypatch.undo()
    expected = cold.select(lazy(data, sampling, limits), [9, 10, 11], options)
    assert torch.equal(follow_up.indices, expected.indices) and torch.equal(follow_up.embeds, expected.embeds)
    # another sampling or other preprocessing settings of the same bytes are other entries
    assert not warm.select(lazy(data, SamplingConfig(fps=2.0), limits), [5], options).cache_hit
    assert not warm.select(
        lazy(data, sampling, limits), [5], SelectionOptions(max_pixels=64 * 28 * 28, min_pixels=16 * 28 * 28)
    ).cache_hit


def test_a_wrong_frame_count_redoes_the_plan_like_decode_video(model, videos):
    """A stream whose decoder finds another frame count than planned is sampled again from the
    decoded count (decode_video's rule), also when chunks had already gone to the ViT."""
    data, sampling, limits = videos["160x90-61f"]
    expected = decode_video(data, sampling, limits)
    plan = probe_video(data, sampling, limits)
    for total in (plan.total_frames + 9, plan.total_frames - 5):
        wrong = dataclasses.replace(
            plan,
            total_frames=total,
            frame_indices=tuple(np.linspace(0, total - 1, 16).round().astype(int).tolist()),
        )
        video = LazyVideo(EncodedVideo(data, wrong))
        with pytest.raises(FrameCountMismatch):
            list(video.chunks(4))
        assert video.plan.frame_indices == tuple(expected.frame_indices)
        np.testing.assert_array_equal(LazyVideo(EncodedVideo(data, wrong)).to_array(), expected.frames)
        runtime = SelectionRuntime(model, torch.float32, "cpu")
        got = runtime.select(LazyVideo(EncodedVideo(data, wrong)), [5, 6], SelectionOptions())
        want = runtime.select(expected.frames, [5, 6], SelectionOptions())
        assert torch.equal(got.indices, want.indices) and got.num_frames == want.num_frames


def test_decoding_errors_in_the_processor_are_400s(runtime, videos, monkeypatch):
    from qtsplus_vllm.serving.errors import QTSplusHTTPError
    from qtsplus_vllm.serving.processor import _as_frames, _select

    data, sampling, limits = videos["96x64-37f"]
    encoded = EncodedVideo(data, probe_video(data, sampling, limits))
    video = _as_frames(encoded)
    assert isinstance(video, LazyVideo) and video.shape == encoded.plan.decode_shape

    def broken(source, plan, scale_to=None):
        yield np.zeros(plan.decode_shape[1:], np.uint8)
        raise VideoDecodeError("cannot decode the video (Invalid data found when processing input)")

    monkeypatch.setattr(streaming, "iter_sampled_frames", broken)
    runtime.feature_cache.clear()
    with pytest.raises(QTSplusHTTPError) as info:
        _select(runtime, video, [5], SelectionOptions())
    assert info.value.http_status == 400
    assert f"cannot load the video ({len(data)} bytes): cannot decode the video" in str(info.value)
    assert not [t for t in threading.enumerate() if t.name == "qtsplus-decode"]


def test_a_source_frame_limit_met_while_decoding_is_a_413(runtime, monkeypatch):
    """A header and packet count that understate the frames: the decoder stops at the limit (413)."""
    from qtsplus_vllm.serving.errors import QTSplusHTTPError
    from qtsplus_vllm.serving.processor import _select

    data = make_video_bytes(40, (64, 48), 10.0, seed=9)
    plan = probe_video(data, SamplingConfig(), Limits(max_source_frames=100))
    video = LazyVideo(EncodedVideo(data, dataclasses.replace(plan, limits=Limits(max_source_frames=20))))
    runtime.feature_cache.clear()
    with pytest.raises(QTSplusHTTPError) as info:
        _select(runtime, video, [5], SelectionOptions())
    assert info.value.http_status == 413 and "QTSPLUS_MAX_SOURCE_FRAMES" in str(info.value)


def test_the_decoder_thread_stops_when_the_consumer_fails(videos):
    data, sampling, limits = videos["160x90-61f"]
    video = lazy(data, sampling, limits)
    stream = video.chunks(2)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "qtsplus-decode"]


def test_the_decoder_holds_a_bounded_number_of_frames():
    """Decoded frames alive at once: at most the queue, the chunk being filled and the one consumed —
    not the video (numpy's allocations are traced by tracemalloc)."""
    data = make_video_bytes(120, (320, 240), 30.0, seed=3)
    video = lazy(data, SamplingConfig(fps=30.0), Limits())
    frame_bytes = 320 * 240 * 3
    assert len(video) == 120
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        total = 0
        for chunk in video.chunks(8):
            total += len(chunk)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 120
    bound = (streaming.QUEUE_CHUNKS + 3) * 8 * frame_bytes  # + one frame array per chunk being filled
    assert peak <= bound < 120 * frame_bytes / 2, (peak, bound)


def test_chunk_setting_is_validated(monkeypatch):
    monkeypatch.setenv("QTSPLUS_STREAM_CHUNK_FRAMES", "7")
    with pytest.raises(ValueError, match="QTSPLUS_STREAM_CHUNK_FRAMES"):
        streaming.stream_chunk_frames()
    monkeypatch.setenv("QTSPLUS_STREAM_CHUNK_FRAMES", "64")
    assert streaming.stream_chunk_frames() == 64


def test_chunks_and_resize_batches_shrink_for_large_frames():
    """Decoded bytes per chunk stay bounded whatever the resolution (README: memory per video)."""
    assert streaming.chunk_frames_for(720, 1280, 32) == 32
    assert streaming.chunk_frames_for(1080, 1920, 32) == 16
    assert streaming.chunk_frames_for(4096, 4096, 32) == 2  # one temporal patch at the least
    assert streaming.chunk_frames_for(48, 64, 6) == 6
    for height, width in ((720, 1280), (1080, 1920), (2160, 3840), (100, 100)):
        chunk = streaming.chunk_frames_for(height, width, 32)
        assert chunk % 2 == 0 and (chunk == 2 or chunk * height * width * 3 <= streaming.CHUNK_BYTES)
    assert (streaming.resize_batch_for(720, 1280), streaming.resize_batch_for(1080, 1920)) == (8, 3)


def test_decode_time_reaches_the_metrics():
    from types import SimpleNamespace

    from qtsplus_vllm.serving.metrics import metrics, observe_selection

    def count() -> float:
        return next(
            s.value
            for f in metrics().decode_seconds.collect()
            for s in f.samples
            if s.name.endswith("_count")
        )

    timings = {"decode_ms": 1500.0, "preprocess_ms": 10.0, "vit_ms": 20.0, "selector_ms": 1.0}
    result = SimpleNamespace(num_visual_tokens=100, n=10, cache_hit=False, timings_ms=timings)
    stats = {"bytes": 0, "entries": 0}
    before = count()
    observe_selection(result, stats)
    assert count() == before + 1
    observe_selection(SimpleNamespace(**{**vars(result), "cache_hit": True}), stats)  # a hit decodes nothing
    observe_selection(SimpleNamespace(**{**vars(result), "timings_ms": {**timings, "decode_ms": 0.0}}), stats)
    assert count() == before + 1  # eager frames were decoded elsewhere


def test_chunks_are_bounded_in_resized_patches():
    """A large max_pixels must not make one chunk as big as a whole video (issue 12, memory bound)."""
    from qtsplus_vllm.video import PreprocessConfig, target_size

    assert streaming.chunk_frames_for(720, 1280, 32, 720) == 32  # the default resize: bytes bound it
    big = PreprocessConfig(max_pixels=16384 * 28 * 28)
    h, w = target_size(720, 1280, 32, big)
    per_frame = (h // 14) * (w // 14)
    frames = streaming.chunk_frames_for(720, 1280, 32, per_frame)
    assert frames < 32 and frames % 2 == 0
    assert frames * per_frame <= streaming.CHUNK_PATCHES
