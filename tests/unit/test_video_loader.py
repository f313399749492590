"""The vLLM video loader: sampling, kwargs validation, registration and vLLM's selection chain."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from qwen_vl_utils import vision_process as qwen_vl
from transformers.models.auto.video_processing_auto import (
    VIDEO_PROCESSOR_MAPPING_NAMES,
    video_processor_class_from_name,
)
from vllm.multimodal.media import ImageMediaIO, MediaWithBytes, VideoMediaIO
from vllm.multimodal.media.connector import MediaConnector, merge_media_io_kwargs
from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, get_video_loader_backend_for_processor
from vllm.transformers_utils.processor import get_video_processor_cls_name_from_config

from qtsplus_vllm.config import MODEL_TYPE
from qtsplus_vllm.limits import Limits
from qtsplus_vllm.serving.video_loader import (
    LOADER_NAME,
    VIDEO_PROCESSOR_NAME,
    QTSplusVideoLoader,
    register_video_loader,
    sampling_from_kwargs,
)
from qtsplus_vllm.streaming import EncodedVideo, LazyVideo
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.video import SamplingConfig, VideoDecodeError, decode_video, target_size


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory) -> bytes:
    """100 frames at 10 fps (10 s), small frames so decoding stays fast."""
    path = make_video(
        tmp_path_factory.mktemp("videos") / "clip.mp4", frames=100, size=(64, 48), fps=10.0, seed=3
    )
    return path.read_bytes()


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_video_loader()


def decoded(item: np.ndarray) -> np.ndarray:
    """The frames a loaded item stands for: the loader returns the encoded bytes and a plan, which
    the processor decodes (``LazyVideo``); decoded frames pass through unchanged."""
    return LazyVideo(item).to_array() if isinstance(item, EncodedVideo) else item


def test_output_equals_decode_video(clip_bytes):
    encoded, meta = QTSplusVideoLoader.load_bytes(clip_bytes, num_frames=32, fps=2.0, max_frames=64)
    expected = decode_video(clip_bytes, SamplingConfig(fps=2.0, max_frames=64))
    # nothing decoded in the loader: the bytes themselves (a view, no copy) and the plan
    assert isinstance(encoded, EncodedVideo) and encoded.dtype == np.uint8 and encoded.ndim == 1
    assert encoded.nbytes == len(clip_bytes) and np.shares_memory(
        encoded, np.frombuffer(clip_bytes, np.uint8)
    )
    assert encoded.plan.decode_shape == (20, 48, 64, 3)
    frames = decoded(encoded)
    assert frames.dtype == np.uint8 and frames.shape == (20, 48, 64, 3)
    np.testing.assert_array_equal(frames, expected.frames)
    assert meta == {
        "total_num_frames": 100,
        "fps": pytest.approx(10.0),
        "duration": pytest.approx(10.0),
        "video_backend": "qtsplus",
        "frames_indices": expected.frame_indices,
        "do_sample_frames": False,
    }
    assert all(type(i) is int for i in meta["frames_indices"])


def test_frames_loader_returns_the_same_frames_decoded(clip_bytes):
    """``qtsplus_frames`` (stock baselines): the frames ``qtsplus`` plans, decoded in the loader."""
    from qtsplus_vllm.serving.video_loader import QTSplusFramesVideoLoader

    frames, meta = QTSplusFramesVideoLoader.load_bytes(clip_bytes, num_frames=32, fps=2.0, max_frames=64)
    expected = decode_video(clip_bytes, SamplingConfig(fps=2.0, max_frames=64))
    assert type(frames) is np.ndarray and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, expected.frames)
    assert meta["video_backend"] == "qtsplus_frames"
    assert meta["frames_indices"] == expected.frame_indices and meta["total_num_frames"] == 100


@pytest.mark.parametrize(
    "kwargs, count",
    [
        ({}, 10),  # defaults: 10 s at 1 fps; vLLM's num_frames=32 does not apply
        ({"fps": 0.2}, 4),  # 2 frames wanted, raised to min_frames 4
        ({"fps": 0.2, "min_frames": 6}, 6),
        ({"fps": 5, "max_frames": 16}, 16),
        ({"fps": 5, "max_frames": 15.0}, 14),  # integral float accepted, count rounded down to even
        ({"fps": 30}, 100),  # never more than the source has
    ],
)
def test_sampling_kwargs_are_honoured(clip_bytes, kwargs, count):
    frames, meta = QTSplusVideoLoader.load_bytes(clip_bytes, num_frames=32, **kwargs)
    frames = decoded(frames)
    assert len(frames) == len(meta["frames_indices"]) == count
    assert meta["frames_indices"][0] == 0 and meta["frames_indices"][-1] == 99


def test_defaults_are_the_reference_demos():
    assert sampling_from_kwargs({}) == SamplingConfig(fps=1.0, min_frames=4, max_frames=768)
    assert (qwen_vl.FPS_MIN_FRAMES, qwen_vl.FPS_MAX_FRAMES) == (4, 768)
    ignored = {"num_frames": 7, "video_backend": "qtsplus", "backend": "opencv", "device": "cpu"}
    assert sampling_from_kwargs(ignored) == SamplingConfig()


def test_unknown_key_is_named(clip_bytes):
    with pytest.raises(ValueError, match=r"'max_duration'.*accepted: \['fps', 'min_frames', 'max_frames'\]"):
        QTSplusVideoLoader.load_bytes(clip_bytes, num_frames=32, max_duration=60)


@pytest.mark.parametrize(
    "key, value",
    [
        ("fps", 0),
        ("fps", -1.0),
        ("fps", float("nan")),
        ("fps", float("inf")),
        ("fps", "2"),
        ("fps", True),
        ("max_frames", 1),
        ("max_frames", Limits().max_frames + 2),
        ("max_frames", 64.5),
        ("max_frames", "64"),
        ("max_frames", False),
        ("min_frames", 0),
        ("min_frames", 800),  # above the default max_frames 768
        ("min_frames", None),
    ],
)
def test_bad_value_names_key_value_and_range(clip_bytes, key, value):
    with pytest.raises(ValueError, match=rf"\['{key}'\]={value!r}.*allowed") as info:
        QTSplusVideoLoader.load_bytes(clip_bytes, **{key: value})
    assert not isinstance(info.value, VideoDecodeError)


def test_min_frames_above_max_frames_is_rejected():
    with pytest.raises(ValueError, match=r"\['min_frames'\]=32.*\[1, 16\]"):
        sampling_from_kwargs({"min_frames": 32, "max_frames": 16})


@pytest.mark.parametrize("data", [b"", b"not a video" * 50])
def test_undecodable_bytes_raise_video_decode_error(data):
    with pytest.raises(VideoDecodeError, match="empty|cannot load the video") as info:
        QTSplusVideoLoader.load_bytes(data, num_frames=32)
    assert isinstance(info.value, ValueError)  # vLLM answers HTTP 400


def test_register_is_idempotent():
    before = dict(VIDEO_PROCESSOR_MAPPING_NAMES)
    register_video_loader()
    register_video_loader()
    assert VIDEO_LOADER_REGISTRY.name2class[LOADER_NAME] is QTSplusVideoLoader
    assert VIDEO_LOADER_REGISTRY.processor2backend[VIDEO_PROCESSOR_NAME] == LOADER_NAME
    assert dict(VIDEO_PROCESSOR_MAPPING_NAMES) == before
    assert not VIDEO_LOADER_REGISTRY.backend_requires_gpu(LOADER_NAME)


def test_checkpoint_without_video_processor_type_selects_our_loader(tmp_path, monkeypatch):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    assert "video_processor_type" not in (ckpt / "preprocessor_config.json").read_text()
    name = get_video_processor_cls_name_from_config(str(ckpt))
    assert name == VIDEO_PROCESSOR_NAME
    assert get_video_loader_backend_for_processor(name) == LOADER_NAME
    assert VIDEO_PROCESSOR_MAPPING_NAMES[MODEL_TYPE] in (
        {"torchvision": VIDEO_PROCESSOR_NAME},
        VIDEO_PROCESSOR_NAME,
    )
    # transformers never resolves the name to a class (its lookups skip runtime model types)
    assert video_processor_class_from_name(VIDEO_PROCESSOR_NAME) is None
    # without our model_type entry vLLM would find no name and fall back to opencv (32 frames)
    monkeypatch.delitem(VIDEO_PROCESSOR_MAPPING_NAMES, MODEL_TYPE)
    assert get_video_processor_cls_name_from_config(str(ckpt)) is None


def test_video_media_io_end_to_end(clip_bytes):
    video = VideoMediaIO(ImageMediaIO(), video_backend=LOADER_NAME, fps=2, max_frames=8).load_bytes(
        clip_bytes
    )
    assert isinstance(video, MediaWithBytes) and video.original_bytes == clip_bytes
    frames, meta = video.media
    assert decoded(frames).shape == (8, 48, 64, 3) and meta["video_backend"] == "qtsplus"


def test_media_connector_merges_server_and_request_kwargs(clip_bytes):
    # the chat path: server --media-io-kwargs merged with the request's, the backend chosen from
    # the model's video processor name (MediaConnector.fetch_video), a base64 data URL
    server = {"video": {"fps": 2, "max_frames": 64}}
    merged = merge_media_io_kwargs(server, {"video": {"min_frames": 6, "max_frames": 12}})
    connector = MediaConnector(media_io_kwargs=merged)
    url = "data:video/mp4;base64," + base64.b64encode(clip_bytes).decode()
    video = connector.fetch_video(url, video_processor=VIDEO_PROCESSOR_NAME)
    frames, meta = video.media
    assert (
        len(decoded(frames)) == 12 and meta["video_backend"] == "qtsplus"
    )  # fps 2 from the server, 12 from the request
    with pytest.raises(ValueError, match="'fps'"):
        MediaConnector(media_io_kwargs={"video": {"fps": -2}}).fetch_video(
            url, video_processor=VIDEO_PROCESSOR_NAME
        )


def test_request_num_frames_drops_server_fps(clip_bytes):
    # vLLM's merge_kwargs drops the server's fps when a request sets only num_frames: our default
    # fps 1.0 then applies and num_frames itself is ignored
    merged = merge_media_io_kwargs({"video": {"fps": 2}}, {"video": {"num_frames": 64}})["video"]
    assert merged == {"num_frames": 64}
    video = VideoMediaIO(ImageMediaIO(), video_backend=LOADER_NAME, **merged).load_bytes(clip_bytes)
    assert len(decoded(video.media[0])) == 10


# -- sampling with few frames (issue 11 item 5) ------------------------------------------------------


@pytest.mark.parametrize("max_frames, count", [(2, 2), (3, 2), (4, 4), (5, 4)])
def test_small_max_frames_alone_is_served(clip_bytes, max_frames, count):
    """max_frames 2 or 3 without min_frames: min_frames follows it down (it was a 400 naming min_frames)."""
    frames, meta = QTSplusVideoLoader.load_bytes(clip_bytes, num_frames=32, max_frames=max_frames)
    assert len(decoded(frames)) == len(meta["frames_indices"]) == count
    assert sampling_from_kwargs({"max_frames": max_frames}).min_frames == min(4, count)


def test_min_frames_over_max_frames_names_both_keys():
    with pytest.raises(ValueError, match=r"\['min_frames'\]=4 .*may not exceed max_frames=3") as info:
        sampling_from_kwargs({"max_frames": 3, "min_frames": 4})
    assert "min_frames" in str(info.value)


@pytest.mark.parametrize("limit, count", [(2, 2), (3, 2)])
def test_a_server_frame_limit_of_2_or_3_serves_videos(clip_bytes, monkeypatch, limit, count):
    """QTSPLUS_MAX_FRAMES 2 or 3 used to break every video request (the default min_frames 4 > max)."""
    import qtsplus_vllm.serving.video_loader as video_loader

    limits = Limits.from_env({"QTSPLUS_MAX_FRAMES": str(limit)})
    monkeypatch.setattr(video_loader, "server_limits", lambda: limits)
    frames, _ = QTSplusVideoLoader.load_bytes(clip_bytes, num_frames=32)
    assert len(decoded(frames)) == count
    with pytest.raises(ValueError, match=rf"\['max_frames'\]=4 .*\[2, {limit}\]"):
        sampling_from_kwargs({"max_frames": 4})


# -- fetching over http: upstream errors and the download cap (issue 11 items 5) -----------------


@pytest.fixture(scope="module")
def media_server(clip_bytes):
    from qtsplus_vllm.testing import hostile

    with hostile.http_media_server({"clip.mp4": clip_bytes}) as url:
        yield url


def _rejections() -> dict[str, float]:
    from qtsplus_vllm.serving.metrics import metrics

    return {
        sample.labels["status"]: sample.value
        for family in metrics().rejected.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def _fetch(url: str, limits: Limits | None = None, monkeypatch=None):
    """fetch_video_async of the plugin's connector, in a fresh event loop and HTTP connection."""
    import asyncio

    from vllm.connections import HTTPConnection

    import qtsplus_vllm.serving.media as media

    if limits is not None:
        monkeypatch.setattr(media, "server_limits", lambda: limits)

    async def run():
        connector = media.QTSplusMediaConnector(connection=HTTPConnection(reuse_client=False))
        return await connector.fetch_video_async(url, video_processor=VIDEO_PROCESSOR_NAME)

    return asyncio.run(run())


@pytest.mark.parametrize(
    "path, status, pattern",
    [
        ("/status/503", 502, r"answered HTTP 503 Service Unavailable"),
        ("/status/500", 502, r"answered HTTP 500 Internal Server Error"),
        ("/status/429", 502, r"answered HTTP 429 Too Many Requests"),
        ("/status/408", 504, r"answered HTTP 408 Request Timeout"),
        ("/status/504", 504, r"answered HTTP 504 Gateway Timeout"),
        ("/status/404", 400, r"answered HTTP 404 Not Found"),
        ("/status/403", 400, r"answered HTTP 403 Forbidden"),
        ("/loop", 400, r"redirects in a loop"),
        ("/truncated/clip.mp4", 502, r"broke off"),
    ],
)
def test_upstream_failures_get_a_clear_status(media_server, monkeypatch, path, status, pattern):
    """The media server's error answers are ours, named and counted (503 used to be our 500)."""
    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", "1")
    before = _rejections().get(str(status), 0)
    url = media_server + path
    with pytest.raises(QTSplusHTTPError) as info:
        _fetch(url)
    assert info.value.http_status == status
    assert re.search(rf"cannot fetch the video_url {re.escape(url)}: .*{pattern}", str(info.value)), (
        info.value
    )
    assert _rejections()[str(status)] == before + 1


def test_a_fetched_video_still_loads(media_server):
    frames, meta = _fetch(media_server + "/files/clip.mp4").media
    assert meta["video_backend"] == LOADER_NAME and len(decoded(frames)) == 10


@pytest.mark.parametrize("path", ["/big/300000", "/big-chunked/300000"])
def test_http_download_over_the_byte_limit_is_our_413(media_server, monkeypatch, path):
    """Over QTSPLUS_MAX_VIDEO_BYTES while downloading: 413 naming it (was vLLM's 400 naming another)."""
    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    before = _rejections().get("413", 0)
    with pytest.raises(QTSplusHTTPError) as info:
        _fetch(media_server + path, Limits(max_video_bytes=100_000), monkeypatch)
    assert info.value.http_status == 413
    assert re.search(
        r"size in bytes of the video at http://\S+ is at least [\d,]+, over the limit of 100,000 "
        r"\(server setting QTSPLUS_MAX_VIDEO_BYTES\)",
        str(info.value),
    ), info.value
    assert _rejections()["413"] == before + 1


def test_http_download_over_vllms_lower_cap_names_that_cap(media_server, monkeypatch):
    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    monkeypatch.setenv("VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB", "1")
    with pytest.raises(QTSplusHTTPError) as info:
        _fetch(media_server + "/big/1100000", Limits(max_video_bytes=10 << 20), monkeypatch)
    assert info.value.http_status == 413
    assert "over the limit of 1,048,576 (server setting VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB)" in str(info.value)


# -- data:video/jpeg frame lists (issue 11 item 6) -----------------------------------------------


def _jpeg_io(monkeypatch, limits: Limits):
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO
    from vllm.multimodal.video import get_video_loader_backend_for_processor

    import qtsplus_vllm.serving.media as media

    monkeypatch.setattr(media, "server_limits", lambda: limits)
    # the IO vLLM's fetch_video builds for our model, as our connector's load_from_url receives it
    backend = get_video_loader_backend_for_processor(VIDEO_PROCESSOR_NAME)
    return media.with_limits(VideoMediaIO(ImageMediaIO(image_mode="RGB"), video_backend=backend))


def test_jpeg_frames_over_the_frame_pixel_limit_are_refused(monkeypatch):
    """Four 6000×6000 JPEG frames: 413 naming QTSPLUS_MAX_FRAME_PIXELS, before any is decoded."""
    from PIL import ImageFile

    from qtsplus_vllm.serving.errors import QTSplusHTTPError
    from qtsplus_vllm.testing import hostile

    url = hostile.jpeg_frames_url([hostile.jpeg_frame((6000, 6000))] * 4)
    video_io = _jpeg_io(monkeypatch, Limits())
    loads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or load(self))
    with pytest.raises(QTSplusHTTPError) as info:
        video_io.load_base64("video/jpeg", url.split(",", 1)[1])
    assert info.value.http_status == 413
    assert re.search(
        r"video/jpeg frame's size 6000x6000 in pixels is 36,000,000, over the limit of 16,777,216 "
        r"\(server setting QTSPLUS_MAX_FRAME_PIXELS\)",
        str(info.value),
    ), info.value
    assert not loads  # only the header was read
    # the same list under a higher frame limit decodes, through the hook above, at reduced size
    limits = Limits(max_frame_pixels=6000 * 6000)
    array, _ = _jpeg_io(monkeypatch, limits).load_base64("video/jpeg", url.split(",", 1)[1]).media
    assert set(loads) == {(3000, 3000)}  # each frame decoded at half size (JPEG DCT scaling)
    assert array.shape == (4, 1551, 1551, 3)  # decode_size(6000, 6000, QTSPLUS_DECODE_MAX_PIXELS)


def test_jpeg_frames_over_the_decode_limit_are_scaled_down_like_video_frames(monkeypatch):
    from qtsplus_vllm.testing import hostile
    from qtsplus_vllm.video import decode_size

    limits = Limits(decode_max_pixels=200 * 150)
    frames = [hostile.jpeg_frame((800, 600), (200, 40, 40)), hostile.jpeg_frame((800, 600), (40, 200, 40))]
    video_io = _jpeg_io(monkeypatch, limits)
    video = video_io.load_base64("video/jpeg", hostile.jpeg_frames_url(frames).split(",", 1)[1])
    array, meta = video.media
    assert array.shape == (2, 150, 200, 3) and array.dtype == np.uint8
    assert decode_size(800, 600, 200 * 150) == (200, 150)
    # flat colours survive the draft decode and the area filter (JPEG's own error aside)
    assert np.abs(array[0].astype(int) - (200, 40, 40)).max() <= 8
    assert np.abs(array[1].astype(int) - (40, 200, 40)).max() <= 8
    # frames within the limit are vLLM's own decode, untouched
    small = video_io.load_base64("video/jpeg", hostile.jpeg_frames_url(frames[:1] * 2).split(",", 1)[1])
    unlimited = _jpeg_io(monkeypatch, Limits()).load_base64(
        "video/jpeg", hostile.jpeg_frames_url(frames[:1] * 2).split(",", 1)[1]
    )
    assert small.media[0].shape == (2, 150, 200, 3) and unlimited.media[0].shape == (2, 600, 800, 3)


def test_vllm_keeps_the_first_32_frames_of_a_jpeg_list(monkeypatch):
    """Documented in the README: vLLM's num_frames (default 32) cuts a data:video/jpeg list."""
    from qtsplus_vllm.testing import hostile

    frames = [hostile.jpeg_frame((16, 16), (i * 5, 0, 0)) for i in range(40)]
    video_io = _jpeg_io(monkeypatch, Limits())
    array, meta = video_io.load_base64("video/jpeg", hostile.jpeg_frames_url(frames).split(",", 1)[1]).media
    assert array.shape[0] == 32 and meta["total_num_frames"] == 32


@pytest.mark.parametrize(
    "path, status, pattern",
    [
        ("/status/503", 502, r"answered HTTP 503 Service Unavailable"),
        ("/status/404", 400, r"answered HTTP 404 Not Found"),
        ("/loop", 400, r"redirects in a loop"),
        ("/big/300000", 413, r"over the limit of 100,000 \(server setting QTSPLUS_MAX_VIDEO_BYTES\)"),
    ],
)
def test_the_synchronous_fetch_maps_failures_the_same_way(media_server, monkeypatch, path, status, pattern):
    import qtsplus_vllm.serving.media as media
    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    monkeypatch.setenv("VLLM_MEDIA_FETCH_MAX_RETRIES", "1")
    monkeypatch.setattr(media, "server_limits", lambda: Limits(max_video_bytes=100_000))
    with pytest.raises(QTSplusHTTPError, match=pattern) as info:
        media.QTSplusMediaConnector().fetch_video(media_server + path, video_processor=VIDEO_PROCESSOR_NAME)
    assert info.value.http_status == status


# --- issue 18: our loader for a QTSplus checkpoint, whatever video processor its files name ------


class _MMConfig:
    def __init__(self, media_io_kwargs):
        self.media_io_kwargs = media_io_kwargs


@pytest.fixture
def unbound(monkeypatch):
    """Binding marks the process as a QTSplus server; restore the mark after the test."""
    from qtsplus_vllm.serving import video_loader

    monkeypatch.setattr(video_loader, "_BOUND", False)
    return video_loader


def test_binding_makes_our_loader_win_over_the_checkpoints_video_processor(clip_bytes, unbound):
    """The reference trainer's files name Qwen2VLVideoProcessor, which vLLM binds to its 2-fps loader."""
    assert get_video_loader_backend_for_processor("Qwen2VLVideoProcessor") not in (None, LOADER_NAME)
    mm_config = _MMConfig({"video": {"fps": 2}})
    assert unbound.bind_video_loader(mm_config) == LOADER_NAME
    assert mm_config.media_io_kwargs == {"video": {"fps": 2, "video_backend": LOADER_NAME}}
    # vLLM's chat path: the server's media_io_kwargs merged with the request's, then fetch_video
    merged = merge_media_io_kwargs(mm_config.media_io_kwargs, {"video": {"max_frames": 8}})
    url = "data:video/mp4;base64," + base64.b64encode(clip_bytes).decode()
    connector = MediaConnector(media_io_kwargs=merged)
    frames, meta = connector.fetch_video(url, video_processor="Qwen2VLVideoProcessor").media
    assert meta["video_backend"] == LOADER_NAME and len(decoded(frames)) == 8
    for empty in (None, {}):  # no --media-io-kwargs at all
        mm_config = _MMConfig(empty)
        unbound.bind_video_loader(mm_config)
        assert mm_config.media_io_kwargs == {"video": {"video_backend": LOADER_NAME}}


def test_a_server_configured_with_another_loader_does_not_start(unbound):
    with pytest.raises(unbound.LoaderBindingError, match="video_backend='opencv'.*Drop video_backend"):
        unbound.bind_video_loader(_MMConfig({"video": {"video_backend": "opencv"}}))


@pytest.mark.parametrize("backend", ["opencv", "qwen2_vl"])
def test_a_request_naming_another_loader_is_refused_when_fetched(clip_bytes, unbound, backend):
    """Only a request can name another loader (with --trust-request-mm-kwargs): 400, never its frames."""
    from qtsplus_vllm.serving.errors import QTSplusHTTPError
    from qtsplus_vllm.serving.media import QTSplusMediaConnector

    mm_config = _MMConfig({})
    unbound.bind_video_loader(mm_config)
    merged = merge_media_io_kwargs(mm_config.media_io_kwargs, {"video": {"video_backend": backend}})
    url = "data:video/mp4;base64," + base64.b64encode(clip_bytes).decode()
    with pytest.raises(
        QTSplusHTTPError, match="video loader: QTSplus models decode videos with 'qtsplus'"
    ) as err:
        QTSplusMediaConnector(media_io_kwargs=merged).fetch_video(url)
    assert err.value.http_status == 400
    ours = QTSplusMediaConnector(media_io_kwargs=mm_config.media_io_kwargs).fetch_video(url)
    assert ours.media[1]["video_backend"] == LOADER_NAME


class _DecodedBudget:
    """vLLM 0.33/0.34's ``MediaDecodedBudget.charge`` as it behaves (``multimodal/media/base.py``):
    adds to ``used``, ``ValueError`` naming the variable past the limit."""

    def __init__(self, limit: int, used: int = 0):
        self.limit, self.used, self.charges = limit, used, []

    def charge(self, decoded_bytes: int) -> None:
        if self.used + decoded_bytes > self.limit:
            raise ValueError(
                f"Request decoded media exceeds VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES={self.limit}"
            )
        self.used += decoded_bytes
        self.charges.append(decoded_bytes)


def _budgeted_io(budget) -> VideoMediaIO:
    from qtsplus_vllm.serving.media import with_limits

    image_io = ImageMediaIO()
    image_io.decoded_budget = budget  # what 0.33's connector gives the frame IO of a video fetch
    return with_limits(VideoMediaIO(image_io, video_backend=LOADER_NAME, fps=2, max_frames=8))


def test_the_resized_frames_of_a_video_are_charged_to_the_requests_decoded_budget(clip_bytes):
    """vLLM >= 0.33 charges only loaders that return frames; ours returns encoded bytes and charges
    the resized frames it holds itself: once per video, before decoding."""
    from qtsplus_vllm.runtime import loader_preprocess
    from qtsplus_vllm.serving.video_loader import resized_frame_bytes

    budget = _DecodedBudget(limit=10**9)
    frames, _ = _budgeted_io(budget).load_bytes(clip_bytes).media
    h, w = target_size(48, 64, 8, loader_preprocess())
    assert budget.charges == [8 * h * w * 3] == [resized_frame_bytes(frames.plan, loader_preprocess())]


def test_a_video_over_the_requests_decoded_budget_is_413_naming_vllms_variable(clip_bytes, monkeypatch):
    import vllm.envs as envs

    from qtsplus_vllm.serving.errors import QTSplusHTTPError

    monkeypatch.setattr(envs, "VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES", 1000, raising=False)
    budget = _DecodedBudget(limit=1000, used=900)  # the request's images took most of it
    with pytest.raises(QTSplusHTTPError) as info:
        _budgeted_io(budget).load_bytes(clip_bytes)
    assert info.value.http_status == 413
    assert "VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES" in str(info.value) and "limit of 1,000" in str(info.value)
    assert budget.charges == []


def test_without_a_budget_nothing_is_charged(clip_bytes):
    """vLLM 0.32: no budget on the frame IO; the loader runs as before."""
    frames, _ = _budgeted_io(None).load_bytes(clip_bytes).media
    assert decoded(frames).shape[0] == 8
