"""The vLLM video loader: sampling, kwargs validation, registration and vLLM's selection chain."""

from __future__ import annotations

import base64

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
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.video import SamplingConfig, VideoDecodeError, decode_video


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


def test_output_equals_decode_video(clip_bytes):
    frames, meta = QTSplusVideoLoader.load_bytes(clip_bytes, num_frames=32, fps=2.0, max_frames=64)
    expected = decode_video(clip_bytes, SamplingConfig(fps=2.0, max_frames=64))
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
    assert frames.shape == (8, 48, 64, 3) and meta["video_backend"] == "qtsplus"


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
        len(frames) == 12 and meta["video_backend"] == "qtsplus"
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
    assert len(video.media[0]) == 10
