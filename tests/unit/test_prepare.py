"""Decoding ahead in the media loader (issue 12: concurrent requests decode in parallel).

With ``QTSPLUS_PREPARE_IN_LOADER`` on (the default), vLLM's media threads decode each video and
resize its frames (``prepare_frames``); the processor then only normalises, patchifies and runs the
ViT. These tests hold that path to the streamed and eager ones — the same ViT inputs bit for bit,
the same selection — and check when the loader must not decode (a follow-up, other settings, over
the patch limit, out of memory), that vLLM still sees and hashes the encoded bytes only, and that
errors met while decoding in the loader are the request's 400/413.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

import qtsplus_vllm.runtime as runtime_module
import qtsplus_vllm.streaming as streaming
from qtsplus_vllm.limits import Limits
from qtsplus_vllm.options import SelectionOptions
from qtsplus_vllm.runtime import SelectionRuntime, get_runtime, prepare_video
from qtsplus_vllm.streaming import EncodedVideo, LazyVideo, prepare_frames, prepared_vision_inputs
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.videos import make_video_bytes
from qtsplus_vllm.video import (
    PreprocessConfig,
    SamplingConfig,
    VideoDecodeError,
    decode_video,
    preprocess_frames,
    probe_video,
)

VIDEOS = [  # (id, frames, (width, height), fps, sampling, limits)
    ("96x64-37f", 37, (96, 64), 5.0, SamplingConfig(fps=2.0), None),
    ("64x48-7f-odd", 7, (64, 48), 2.0, SamplingConfig(fps=2.0), None),
    ("160x90-61f", 61, (160, 90), 10.0, SamplingConfig(fps=4.0), Limits()),
    ("one-frame", 1, (64, 64), 4.0, SamplingConfig(), Limits()),
    ("320x240-scaled", 50, (320, 240), 10.0, SamplingConfig(fps=2.0), Limits(decode_max_pixels=160 * 100)),
]
SMALL = PreprocessConfig(max_pixels=64 * 28 * 28, min_pixels=16 * 28 * 28)


@pytest.fixture(scope="module")
def videos():
    return {
        name: (make_video_bytes(frames, size, fps, seed=10 + i), sampling, limits)
        for i, (name, frames, size, fps, sampling, limits) in enumerate(VIDEOS)
    }


def lazy(data: bytes, sampling: SamplingConfig, limits: Limits | None) -> LazyVideo:
    return LazyVideo(EncodedVideo(data, probe_video(data, sampling, limits)))


def prepared_item(data, sampling, limits, config=None) -> EncodedVideo:
    encoded = EncodedVideo(data, probe_video(data, sampling, limits))
    video = LazyVideo(encoded)
    encoded.prepared = prepare_frames(video, config or PreprocessConfig())
    encoded.plan = video.plan
    return encoded


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("prepare") / "m", seed=6)


@pytest.mark.parametrize("name", [v[0] for v in VIDEOS])
@pytest.mark.parametrize("config", [PreprocessConfig(), SMALL], ids=["default", "small"])
def test_prepared_frames_give_bit_identical_vit_inputs(videos, name, config):
    data, sampling, limits = videos[name]
    expected = preprocess_frames(decode_video(data, sampling, limits).frames, config)
    video = lazy(data, sampling, limits)
    prepared = prepare_frames(video, config)
    assert prepared.frames.dtype == torch.uint8 and prepared.frames.device.type == "cpu"
    t, _, h, w = prepared.frames.shape
    assert t % 2 == 0 and (h, w) == expected.resized_size
    # one byte per pixel and channel: 1,176 B per ViT patch (2 frames x 14 x 14 x 3)
    assert prepared.nbytes == expected.pixel_values.shape[0] * 2 * 14 * 14 * 3
    assert prepared.matches(video, config) and not prepared.matches(
        video, dataclasses.replace(config, max_pixels=config.max_pixels + 1)
    )
    assert prepared.timings_ms["decode_ms"] > 0 and prepared.timings_ms["preprocess_ms"] > 0
    for chunk in (2, 4, 32):
        parts = list(prepared_vision_inputs(prepared, config, chunk))
        pixel_values = torch.cat([p for p, _ in parts])
        assert torch.equal(pixel_values, expected.pixel_values)
        grids = torch.cat([g for _, g in parts])
        assert int(grids[:, 0].sum()) == int(expected.grid_thw[0, 0])
    with pytest.raises(ValueError, match="even"):
        next(prepared_vision_inputs(prepared, config, 3))


def test_prepared_selection_equals_the_streamed_one_and_the_processor_decodes_nothing(
    model, videos, monkeypatch
):
    data, sampling, limits = videos["160x90-61f"]
    options = SelectionOptions()
    streamed = SelectionRuntime(model, torch.float32, "cpu").select(
        lazy(data, sampling, limits), [5, 6], options
    )
    item = prepared_item(data, sampling, limits)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the processor decoded a prepared video")

    monkeypatch.setattr(streaming, "iter_sampled_frames", no_decoding)
    got = SelectionRuntime(model, torch.float32, "cpu").select(LazyVideo(item), [5, 6], options)
    assert torch.equal(got.embeds, streamed.embeds) and torch.equal(got.indices, streamed.indices)
    assert torch.equal(got.scores, streamed.scores)
    assert (got.num_frames, got.grid_thw) == (streamed.num_frames, streamed.grid_thw)
    # the loader's decode and resize time is reported with the request
    assert got.timings_ms["decode_ms"] == item.prepared.timings_ms["decode_ms"] > 0
    assert got.timings_ms["preprocess_ms"] > item.prepared.timings_ms["preprocess_ms"] > 0


def test_frames_prepared_for_other_settings_are_decoded_again(model, videos):
    """A request whose own kwargs change the preprocessing gets its video decoded by the processor."""
    data, sampling, limits = videos["160x90-61f"]
    item = prepared_item(data, sampling, limits)  # the server's default settings
    frames = decode_video(data, sampling, limits).frames
    runtime = SelectionRuntime(model, torch.float32, "cpu")
    small = SelectionOptions(max_pixels=SMALL.max_pixels, min_pixels=SMALL.min_pixels)
    got = runtime.select(LazyVideo(item), [5, 6], small)
    want = SelectionRuntime(model, torch.float32, "cpu").select(frames, [5, 6], small)
    assert torch.equal(got.indices, want.indices) and got.grid_thw == want.grid_thw
    torch.testing.assert_close(got.embeds, want.embeds, rtol=1e-5, atol=1e-5)


def test_a_wrong_frame_count_while_preparing_redoes_the_plan(model, videos):
    data, sampling, limits = videos["160x90-61f"]
    expected = decode_video(data, sampling, limits)
    plan = probe_video(data, sampling, limits)
    wrong = dataclasses.replace(
        plan,
        total_frames=plan.total_frames + 9,
        frame_indices=tuple(np.linspace(0, plan.total_frames + 8, 16).round().astype(int).tolist()),
    )
    video = LazyVideo(EncodedVideo(data, wrong))
    prepared = prepare_frames(video, PreprocessConfig())
    assert video.plan.frame_indices == tuple(expected.frame_indices)
    assert prepared.plan_key == video.plan.key() and prepared.matches(video, PreprocessConfig())
    inputs = preprocess_frames(expected.frames, PreprocessConfig())
    got = torch.cat([p for p, _ in prepared_vision_inputs(prepared, PreprocessConfig(), 4)])
    assert torch.equal(got, inputs.pixel_values)
    # frames prepared from the old plan do not match a video on the corrected one
    stale = dataclasses.replace(prepared, plan_key=wrong.key())
    assert not stale.matches(video, PreprocessConfig())


def test_vllm_still_sees_and_hashes_the_encoded_bytes_only(videos):
    from vllm.multimodal.hasher import MultiModalHasher
    from vllm.multimodal.media import MediaWithBytes

    data, sampling, limits = videos["96x64-37f"]
    item = prepared_item(data, sampling, limits)
    bare = EncodedVideo(data, item.plan)
    assert item.shape == (len(data),) and item.dtype == np.uint8

    def digest(video):
        return MultiModalHasher.hash_kwargs("blake3", video=(MediaWithBytes(video, data), {"fps": 1.0}))

    assert digest(item) == digest(bare)
    assert item[:].prepared is item.prepared  # a view keeps the frames...
    copy = pickle.loads(pickle.dumps(item))  # ...a copy in another process decodes again
    assert copy.prepared is None and copy.plan == item.plan and copy.tobytes() == data


# -- the loader ------------------------------------------------------------------------------------


@pytest.fixture
def loader(monkeypatch):
    """Our loader, told to decode ahead always (``auto`` has its own test)."""
    from qtsplus_vllm.serving.video_loader import QTSplusVideoLoader, register_video_loader

    register_video_loader()
    monkeypatch.setenv("QTSPLUS_PREPARE_IN_LOADER", "1")
    return QTSplusVideoLoader


@pytest.fixture
def no_runtimes():
    """No process-global runtime before or after (the loader asks the loaded one's cache)."""
    saved = dict(runtime_module._RUNTIMES)
    runtime_module._RUNTIMES.clear()
    yield
    runtime_module._RUNTIMES.clear()
    runtime_module._RUNTIMES.update(saved)


def test_the_loader_decodes_ahead_while_another_video_is_in_flight(loader, videos, monkeypatch, no_runtimes):
    """``auto`` (the default before ``vit``): a video alone is left to the processor's stream (decoding
    overlaps the ViT); while another video is in flight — being loaded, waiting or being encoded —
    the loader decodes ahead, in parallel with the others. ``1`` always, ``0`` never."""
    import gc

    data, _, _ = videos["160x90-61f"]
    monkeypatch.setenv("QTSPLUS_PREPARE_IN_LOADER", "auto")
    assert runtime_module.prepare_mode() == "auto"
    gc.collect()
    base = runtime_module.videos_in_flight()
    alone, metadata = loader.load_bytes(data, num_frames=32, fps=4.0)
    assert alone.prepared is None and runtime_module.videos_in_flight() == base + 1
    assert metadata["frames_indices"] == list(alone.plan.frame_indices)
    second, _ = loader.load_bytes(data, num_frames=32, fps=4.0)  # the first is still in flight
    assert second.prepared is not None and second.prepared.matches(LazyVideo(second), PreprocessConfig())
    view = second[:]  # vLLM may hold a view: the video stays in flight while it lives
    del alone, second
    gc.collect()
    assert runtime_module.videos_in_flight() == base + 1
    del view
    gc.collect()
    assert runtime_module.videos_in_flight() == base
    assert loader.load_bytes(data, num_frames=32, fps=4.0)[0].prepared is None  # alone again
    monkeypatch.setenv("QTSPLUS_PREPARE_IN_LOADER", "1")
    assert loader.load_bytes(data, num_frames=32, fps=4.0)[0].prepared is not None
    held = loader.load_bytes(data, num_frames=32, fps=4.0)[0]
    monkeypatch.setenv("QTSPLUS_PREPARE_IN_LOADER", "0")
    assert loader.load_bytes(data, num_frames=32, fps=4.0)[0].prepared is None
    del held
    monkeypatch.setenv("QTSPLUS_PREPARE_IN_LOADER", "maybe")
    with pytest.raises(ValueError, match="QTSPLUS_PREPARE_IN_LOADER"):
        runtime_module.check_server_settings()


def test_the_loader_resizes_to_the_servers_default_settings(loader, videos, monkeypatch, no_runtimes):
    data, _, _ = videos["160x90-61f"]
    monkeypatch.setattr(runtime_module, "_LOADER_PREPROCESS", None)
    runtime_module.set_loader_preprocess(SMALL)
    encoded, _ = loader.load_bytes(data, num_frames=32, fps=4.0)
    assert encoded.prepared.settings == dataclasses.astuple(SMALL)


def test_a_follow_up_question_is_not_decoded_by_the_loader(loader, model, videos, monkeypatch, no_runtimes):
    data, _, _ = videos["160x90-61f"]
    runtime = get_runtime(model, torch.float32, torch.device("cpu"))
    first, _ = loader.load_bytes(data, num_frames=32, fps=4.0)
    assert first.prepared is not None
    runtime.select(LazyVideo(first), [5, 6], SelectionOptions())  # the features are now cached

    def no_decoding(*args, **kwargs):
        raise AssertionError("a follow-up question was decoded")

    with monkeypatch.context() as patch:
        patch.setattr(streaming, "iter_sampled_frames", no_decoding)
        again, _ = loader.load_bytes(data, num_frames=32, fps=4.0)
        assert again.prepared is None
        follow_up = runtime.select(LazyVideo(again), [7, 8], SelectionOptions())
        assert follow_up.cache_hit and follow_up.timings_ms["decode_ms"] == 0.0
    # another sampling of the same bytes is another video: decoded ahead
    other, _ = loader.load_bytes(data, num_frames=32, fps=2.0)
    assert other.prepared is not None


def test_no_decoding_ahead_over_the_patch_limit_or_out_of_memory(videos, monkeypatch, no_runtimes, caplog):
    data, sampling, limits = videos["160x90-61f"]
    monkeypatch.setattr(runtime_module, "server_limits", lambda: Limits(max_vit_patches=16))
    assert prepare_video(lazy(data, sampling, limits)) is None  # the processor refuses it (413)
    monkeypatch.undo()

    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(runtime_module, "prepare_frames", oom)
    assert prepare_video(lazy(data, sampling, limits)) is None
    assert "the processor decodes it" in caplog.text

    def bug(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(runtime_module, "prepare_frames", bug)
    with pytest.raises(RuntimeError, match="some other failure"):
        prepare_video(lazy(data, sampling, limits))


def test_errors_met_while_decoding_in_the_loader_are_the_requests(loader, monkeypatch, no_runtimes):
    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    data = make_video_bytes(40, (64, 48), 10.0, seed=9)

    def broken(source, plan, scale_to=None):
        yield np.zeros(plan.decode_shape[1:], np.uint8)
        raise VideoDecodeError("cannot decode the video (Invalid data found when processing input)")

    with monkeypatch.context() as patch:
        patch.setattr(streaming, "iter_sampled_frames", broken)
        with pytest.raises(
            VideoDecodeError, match=f"cannot load the video \\({len(data)} bytes\\): cannot decode"
        ):
            loader.load_bytes(data, num_frames=32)
    # a header and packet count that understate the frames: the decoder stops at the limit (413)
    plan = probe_video(data, SamplingConfig(), Limits(max_source_frames=100))
    understated = dataclasses.replace(plan, limits=Limits(max_source_frames=20))
    monkeypatch.setattr("qtsplus_vllm.serving.video_loader.probe_video", lambda *args, **kwargs: understated)
    with pytest.raises(QTSplusHTTPError) as info:
        loader.load_bytes(data, num_frames=32)
    assert info.value.http_status == 413 and "QTSPLUS_MAX_SOURCE_FRAMES" in str(info.value)


def test_the_vit_leaves_a_core_to_the_loaders_decoders(model, videos, monkeypatch, no_runtimes):
    """Issue 19 item 5: while the loader decodes other videos ahead, the ViT of a prepared video (and
    of eager frames) runs on QTSPLUS_CPU_THREADS - 1 torch threads, as the streamed path always does
    next to its own decoder; on all of them otherwise. Decided chunk by chunk: a decode that ends
    mid-video gives the core back."""
    import contextlib

    monkeypatch.setenv("QTSPLUS_CPU_THREADS", "3")
    monkeypatch.setenv("QTSPLUS_FEATURE_CACHE_BYTES", "0")  # every select runs the ViT
    monkeypatch.setenv("QTSPLUS_STREAM_CHUNK_FRAMES", "2")  # several chunks per video
    data, sampling, limits = videos["160x90-61f"]
    item = prepared_item(data, sampling, limits)
    runtime = SelectionRuntime(model, torch.float32, "cpu")
    vision, seen, on_call = runtime.vision, [], []

    def counting(pixel_values, grid_thw):
        seen.append(torch.get_num_threads())
        for hook in on_call:
            hook()
        return vision(pixel_values, grid_thw)

    runtime.vision = counting
    before = torch.get_num_threads()

    def threads_used(frames) -> list[int]:
        seen.clear()
        runtime.select(frames, [5, 6], SelectionOptions())
        assert torch.get_num_threads() == before  # restored after the selection
        return list(seen)

    alone = threads_used(LazyVideo(item))
    assert len(alone) > 2 and set(alone) == {3}  # nothing decoding: every core
    with runtime_module.preparing_video():  # another video is being decoded in the loader
        assert runtime_module.videos_preparing() == 1
        assert set(threads_used(LazyVideo(item))) == {2}
        assert set(threads_used(decode_video(data, sampling, limits).frames)) == {2}  # eager frames
        assert set(threads_used(lazy(data, sampling, limits))) == {2}  # streamed: its own decoder
    assert runtime_module.videos_preparing() == 0
    assert set(threads_used(lazy(data, sampling, limits))) == {2}  # streamed, alone: unchanged rule

    with contextlib.ExitStack() as decoding:  # the other video's decode ends after the first chunk
        decoding.enter_context(runtime_module.preparing_video())
        on_call.append(decoding.close)
        mixed = threads_used(LazyVideo(item))
    assert mixed[0] == 2 and set(mixed[1:]) == {3}, mixed


def test_a_video_being_decoded_ahead_is_counted(videos, monkeypatch, no_runtimes):
    data, sampling, limits = videos["64x48-7f-odd"]
    during = []

    def prepare(video, config, device):
        during.append(runtime_module.videos_preparing())
        return "prepared"

    monkeypatch.setattr(runtime_module, "prepare_frames", prepare)
    assert prepare_video(lazy(data, sampling, limits)) == "prepared"

    def fail(video, config, device):
        during.append(runtime_module.videos_preparing())
        raise RuntimeError("some other failure")

    monkeypatch.setattr(runtime_module, "prepare_frames", fail)
    with pytest.raises(RuntimeError):
        prepare_video(lazy(data, sampling, limits))
    assert during == [1, 1] and runtime_module.videos_preparing() == 0


def test_by_default_the_loader_encodes_and_the_processor_only_selects(
    loader, model, videos, monkeypatch, no_runtimes
):
    """``vit`` (the default): the media loader decodes the video into the ViT; the processor's
    selection decodes nothing and runs no ViT, and equals the streamed one. Without a runtime known to
    the process nothing is encoded; a follow-up whose features are cached is not encoded again."""
    data, sampling, limits = videos["160x90-61f"]
    monkeypatch.delenv("QTSPLUS_PREPARE_IN_LOADER")
    assert runtime_module.prepare_mode() == "vit"
    monkeypatch.setattr(runtime_module, "_LOADER_RUNTIME", None)
    assert loader.load_bytes(data, num_frames=32, fps=4.0)[0].features is None  # no runtime here

    options = SelectionOptions()
    streamed = SelectionRuntime(model, torch.float32, "cpu").select(
        lazy(data, sampling, limits), [5, 6], options
    )
    runtime = SelectionRuntime(model, torch.float32, "cpu")
    runtime_module.set_loader_runtime(lambda: runtime)
    item, _ = loader.load_bytes(data, num_frames=32, fps=4.0)
    assert item.features is not None and item.prepared is None
    assert item.features.timings_ms["vit_ms"] > 0 and item.features.timings_ms["decode_ms"] > 0

    def no_decoding(*args, **kwargs):
        raise AssertionError("the processor decoded a video the loader encoded")

    monkeypatch.setattr(streaming, "iter_sampled_frames", no_decoding)
    vision = runtime.vision
    runtime.vision = lambda *args: pytest.fail("the processor ran the ViT")
    got = runtime.select(LazyVideo(item), [5, 6], options)
    runtime.vision = vision
    assert torch.equal(got.embeds, streamed.embeds) and torch.equal(got.indices, streamed.indices)
    assert not got.cache_hit and got.timings_ms["vit_ms"] == item.features.timings_ms["vit_ms"]
    # the features are in the cache now: a follow-up is neither decoded nor encoded by the loader
    follow_up, _ = loader.load_bytes(data, num_frames=32, fps=4.0)
    assert follow_up.features is None and runtime.select(LazyVideo(follow_up), [7], options).cache_hit


def test_a_request_with_its_own_settings_is_decoded_once(loader, model, videos, monkeypatch, no_runtimes):
    """A request's own ``max_pixels``/``min_pixels`` reach only vLLM's processor; the chat render hands
    them to the request's token (``serving.cancellation``), so the loader prepares the video at the
    request's settings and the processor neither decodes it again nor runs the ViT."""
    from qtsplus_vllm.cancel import CancelToken, working_for

    data, sampling, limits = videos["160x90-61f"]
    monkeypatch.delenv("QTSPLUS_PREPARE_IN_LOADER")
    runtime = SelectionRuntime(model, torch.float32, "cpu")
    runtime_module.set_loader_runtime(lambda: runtime)
    from qtsplus_vllm.options import parse_options

    monkeypatch.setattr(
        runtime_module, "_REQUEST_PREPROCESS", lambda kwargs: parse_options(kwargs).preprocess_config()
    )
    token = CancelToken()
    token.mm_processor_kwargs = {"max_pixels": SMALL.max_pixels, "min_pixels": SMALL.min_pixels}
    with working_for(token):
        item, _ = loader.load_bytes(data, num_frames=32, fps=4.0)
    assert item.features.settings == dataclasses.astuple(SMALL)
    small = SelectionOptions(max_pixels=SMALL.max_pixels, min_pixels=SMALL.min_pixels)
    with monkeypatch.context() as patch:
        patch.setattr(streaming, "iter_sampled_frames", lambda *a, **k: pytest.fail("decoded twice"))
        got = runtime.select(LazyVideo(item), [5, 6], small)
    want = SelectionRuntime(model, torch.float32, "cpu").select(lazy(data, sampling, limits), [5, 6], small)
    assert torch.equal(got.indices, want.indices) and got.grid_thw == want.grid_thw
    # settings that cannot be parsed: the server's defaults (the processor refuses the request)
    assert runtime_module.loader_preprocess(token.mm_processor_kwargs) == SMALL
    assert runtime_module.loader_preprocess({"max_pixels": "lots"}) == runtime_module.loader_preprocess()
