"""vLLM video loader that samples frames like qwen-vl-utils (DESIGN §2.1, §9 trap 7).

vLLM loads ``video_url`` parts in the API server's media thread pool with ``VideoMediaIO``, which
calls ``loader.load_bytes(data, num_frames=..., **media_io_kwargs["video"])``. Its default loader
keeps 32 frames; :class:`QTSplusVideoLoader` plans qwen-vl-utils' frames (PyAV, ``smart_nframes``,
even count): it checks the header and the limits, counts the frames with a demux pass and returns
the encoded bytes with the plan (:class:`~qtsplus_vllm.streaming.EncodedVideo`). By default it then
decodes the planned frames as a stream into the ViT right here, in the media thread pool
(``runtime.encode_ahead``), so that no video's decoding runs on the processor's single thread, which
then only runs the selector (``QTSPLUS_PREPARE_IN_LOADER=vit``; ``1``: decode and resize only,
``0``: the processor decodes, ``auto``: ``1`` while another video is in flight, else ``0``). Nothing
is decoded when the ViT features of this video are cached. Every pass stops within a frame when the
request is cancelled (``qtsplus_vllm.cancel``). Errors found here (an unreadable file, a limit, a stream
that cannot be decoded) are the request's 400/413.

Selection, in vLLM's order (media/connector.py ``fetch_video`` then ``VideoMediaIO.__init__``):

1. ``media_io_kwargs["video"]["video_backend"]`` (server ``--media-io-kwargs`` or, with
   ``--trust-request-mm-kwargs``, the request);
2. the loader bound to the model's video processor name: :func:`register_video_loader` binds
   ``"qtsplus"`` to ``QTSplusVideoProcessor`` and maps our model_type to that name, for checkpoints
   whose files name no ``video_processor_type``;
3. only then ``VLLM_VIDEO_LOADER_BACKEND`` (default ``"opencv"``).

A checkpoint's files may name another video processor (the reference trainer's say
``Qwen2VLVideoProcessor``, which rule 2 binds to vLLM's ``qwen2_vl`` loader), so rule 2 alone is not
enough: :func:`bind_video_loader` sets rule 1 server-wide when the QTSplus processor is built, a server
configured with another ``video_backend`` does not start, and a request naming one gets 400
(:func:`check_video_loader`).

``media_io_kwargs["video"]`` keys (server ``--media-io-kwargs '{"video": {"fps": 2, "max_frames": 64}}'``,
request values win key by key):

==========  ================================================  =====================================
key         meaning                                           allowed (default)
==========  ================================================  =====================================
fps         frames kept per second of video                   finite number > 0 (1.0, the demo's)
min_frames  lower bound on the frame count                    integer 1 .. max_frames
                                                              (4, or max_frames rounded down to
                                                              even when that is smaller)
max_frames  upper bound on the frame count                    integer 2 .. QTSPLUS_MAX_FRAMES (768)
==========  ================================================  =====================================

The count is ``smart_nframes``: clamp(duration · fps, min_frames, max_frames), at most the
source's frames, rounded down to even (qwen-vl-utils rounds min_frames up and max_frames down to
even first, so ``max_frames`` 2 and 3 both keep 2 frames). ``num_frames`` (always passed by ``VideoMediaIO``,
default 32) is ignored: use ``max_frames`` / ``fps``. Because ``VideoMediaIO.merge_kwargs``
drops the server's ``fps`` when a request sets only ``num_frames``, such a request gets our
default fps 1.0 (with the server's min/max_frames). ``video_backend``, ``backend`` and ``device``
are ignored too: vLLM itself may put them there (``backend``/``device`` for encode-only GPU
instances, config/vllm.py), and we always decode with PyAV on the CPU. Any other key, or a bad
value, raises ``ValueError`` (HTTP 400).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoLoader

from ..cancel import CancelToken, VideoCancelled, current_token
from ..config import MODEL_TYPE
from ..limits import LimitExceeded, RequestError, SelectionUnavailable, server_limits
from ..runtime import (
    encode_ahead,
    loader_preprocess,
    prepare_mode,
    prepare_video,
    release_video,
    should_prepare,
    track_video,
)
from ..streaming import EncodedVideo, LazyVideo
from ..video import SamplingConfig, VideoDecodeError, VideoPlan, probe_video, target_size
from . import compat
from .errors import as_http_error

LOADER_NAME = "qtsplus"
FRAMES_LOADER_NAME = "qtsplus_frames"  # the same frames, decoded (stock baselines)
VIDEO_PROCESSOR_NAME = "QTSplusVideoProcessor"  # a name only: no such class exists or is needed

ACCEPTED_KWARGS = ("fps", "min_frames", "max_frames")
_FRAME_FACTOR = 2  # frames per temporal patch: the fewest frames a video can keep
IGNORED_KWARGS = ("num_frames", "video_backend", "backend", "device")


def _bad(key: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"media_io_kwargs['video'][{key!r}]={value!r} is invalid: allowed {allowed}")


def _is_integer(value: object) -> bool:
    # JSON may spell an integer as 64.0; bool is an int subclass but never a frame count
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return ok and not isinstance(value, bool)


def _integer(key: str, value: object, lo: int, hi: int) -> int:
    if not _is_integer(value) or not lo <= value <= hi:
        raise _bad(key, value, f"an integer in [{lo}, {hi}]")
    return int(value)


def sampling_from_kwargs(kwargs: Mapping[str, Any]) -> SamplingConfig:
    """Validate ``media_io_kwargs["video"]`` and build the frame sampling settings."""
    unknown = sorted(set(kwargs) - set(ACCEPTED_KWARGS) - set(IGNORED_KWARGS))
    if unknown:
        raise ValueError(
            f"media_io_kwargs['video'] has unknown key(s) {unknown} for the {LOADER_NAME!r} video loader; "
            f"accepted: {list(ACCEPTED_KWARGS)} (ignored: {list(IGNORED_KWARGS)})"
        )
    defaults = SamplingConfig()
    fps = kwargs.get("fps", defaults.fps)
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not (math.isfinite(fps) and fps > 0):
        raise _bad("fps", fps, "a finite number > 0")
    # kept frames stay at (at most QTSPLUS_DECODE_MAX_PIXELS) decode size until the processor
    # resizes them: the frame limit bounds the API server's memory per video
    limit = server_limits().max_frames  # at least 2: Limits refuses less
    if "max_frames" in kwargs:
        max_frames = _integer("max_frames", kwargs["max_frames"], _FRAME_FACTOR, limit)
    else:
        max_frames = min(defaults.max_frames, limit)
    if "min_frames" in kwargs:
        min_frames = kwargs["min_frames"]
        if _is_integer(min_frames) and min_frames > max_frames >= 1:
            # name both keys: max_frames may be the server's or QTSPLUS_MAX_FRAMES, not the client's
            source = "" if "max_frames" in kwargs else f" (the default: at most QTSPLUS_MAX_FRAMES={limit})"
            raise ValueError(
                f"media_io_kwargs['video']['min_frames']={min_frames!r} is invalid: allowed an integer in "
                f"[1, {max_frames}], it may not exceed max_frames={max_frames}{source}"
            )
        min_frames = _integer("min_frames", min_frames, 1, max_frames)
    else:
        # qwen-vl-utils' floor of 4 frames, lowered with a smaller max_frames (never above it)
        min_frames = min(defaults.min_frames, max_frames - max_frames % _FRAME_FACTOR)
    return SamplingConfig(fps=float(fps), min_frames=min_frames, max_frames=max_frames)


def resized_frame_bytes(plan: VideoPlan, preprocess) -> int:
    """Bytes of the video's kept frames resized for the ViT (uint8 RGB): the most of its frames a
    request holds at once on any path (decoded ahead: all of them; streamed: fewer)."""
    _, height, width, _ = plan.decode_shape
    h, w = target_size(height, width, plan.num_frames, preprocess)
    return plan.num_frames * h * w * 3


def _final_plan(metadata: dict[str, Any], video: LazyVideo) -> None:
    """Report the plan a decode ended with (a count found wrong while decoding re-plans the video)."""
    metadata.update(
        total_num_frames=video.plan.total_frames,
        duration=video.plan.total_frames / video.plan.source_fps,
        frames_indices=[int(i) for i in video.plan.frame_indices],
    )


def _decoding(video: LazyVideo, decode):
    """Run ``decode()`` on ``video`` with a limit met while decoding (more frames than the header
    said) as the request's HTTP error."""
    try:
        return decode()
    except (LimitExceeded, SelectionUnavailable) as err:
        raise as_http_error(err) from err


class QTSplusVideoLoader(VideoLoader):
    """Checks, plans and (by default) decodes and resizes a video in vLLM's media threads (module docstring)."""

    @classmethod
    def probe(
        cls, data: bytes, kwargs: Mapping[str, Any], cancel: CancelToken | None = None
    ) -> tuple[EncodedVideo, dict[str, Any]]:
        """Video file bytes -> (an :class:`~qtsplus_vllm.streaming.EncodedVideo`, metadata), decoding nothing.

        The header checks and limits, a demux pass that counts the frames (and stops at
        ``QTSPLUS_MAX_SOURCE_FRAMES``) and the sampling plan. The first value is the encoded bytes
        as a 1-D uint8 array (a view of ``data``, no copy) carrying the plan. The metadata has the
        keys of ``VideoLoader.create_hf_metadata``; vLLM hashes it with the bytes, so the same video
        sampled differently is a different cache entry. ``cancel`` (the request's
        :class:`~qtsplus_vllm.cancel.CancelToken`) stops the demux pass within a packet and rides on
        the plan to every later pass over the video.
        """
        sampling = sampling_from_kwargs(kwargs)
        if not data:
            raise VideoDecodeError("the video is empty (0 bytes)")
        limits = server_limits()
        try:
            limits.check_video_bytes(len(data))
            plan = probe_video(data, sampling, limits, cancel)
        except LimitExceeded as err:
            raise as_http_error(err) from err
        except VideoDecodeError as err:
            raise VideoDecodeError(f"cannot load the video ({len(data)} bytes): {err}") from err
        metadata = {
            "total_num_frames": plan.total_frames,
            "fps": plan.source_fps,
            "duration": plan.total_frames / plan.source_fps,
            "video_backend": LOADER_NAME,
            "frames_indices": [int(i) for i in plan.frame_indices],
            # the frames are already sampled: a Hugging Face video processor must not sample again
            "do_sample_frames": False,
        }
        return EncodedVideo(data, plan), metadata

    @classmethod
    def load_bytes(
        cls, data: bytes, /, num_frames: int = -1, **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Video file bytes -> (an :class:`~qtsplus_vllm.streaming.EncodedVideo`, metadata).

        :meth:`probe`, then — with ``QTSPLUS_PREPARE_IN_LOADER=vit`` (the default) — the planned frames
        are decoded into the ViT at the server's default preprocessing here, in the media thread, and
        the rows attached to the item (``EncodedVideo.features``); with ``1``, or ``auto`` while
        another video is in flight, they are decoded and resized only (``EncodedVideo.prepared``,
        uint8, 1,176 B per ViT patch). vLLM still sees and hashes the encoded bytes only. Skipped when the ViT-feature cache already holds the video (a
        follow-up question decodes nothing). ``num_frames`` is accepted and ignored. Every pass
        stops within a frame when the request is cancelled (:mod:`qtsplus_vllm.cancel`).
        """
        cancel = current_token()  # the request's, set by the media connector (serving.cancellation)
        if cancel is None:
            return cls._load(data, kwargs, None)
        cancel.begin()
        try:
            return cls._load(data, kwargs, cancel)
        except VideoCancelled:
            raise
        except BaseException:
            cancel.finish()  # failed on its own: an error, not a cancellation
            raise

    @classmethod
    def _load(
        cls, data: bytes, kwargs: Mapping[str, Any], cancel: CancelToken | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        encoded, metadata = cls.probe(data, kwargs, cancel)
        others = track_video(encoded)
        if cancel is not None:  # cancelled: the frames decoded ahead go, the video leaves the count
            cancel.release(encoded, release_video)
        # the request's own settings when it has some (a second decode in the processor otherwise)
        preprocess = loader_preprocess(cancel.mm_processor_kwargs if cancel is not None else None)
        # vLLM >= 0.33 charges a request's decoded media to its budget; our item is the encoded bytes,
        # so charge the frames the video holds at most (resized, uint8) before decoding any
        compat.charge_video_frames(resized_frame_bytes(encoded.plan, preprocess))
        if prepare_mode() == "vit":  # decoded into the ViT here: the processor only selects
            video = LazyVideo(encoded)
            features = _decoding(video, lambda: encode_ahead(video, preprocess))
            if features is not None:
                encoded.plan, encoded.features = video.plan, features
                _final_plan(metadata, video)
                if cancel is not None and cancel.cancelled:
                    release_video(encoded)
        elif should_prepare(others):
            video = LazyVideo(encoded)
            prepared = _decoding(video, lambda: prepare_video(video, preprocess))
            if prepared is not None:
                encoded.plan, encoded.prepared = video.plan, prepared
                _final_plan(metadata, video)
                if cancel is not None and cancel.cancelled:  # cancelled while the last chunk was resized
                    release_video(encoded)
        return encoded, metadata


class QTSplusFramesVideoLoader(QTSplusVideoLoader):
    """The same checks, limits and frames as ``"qtsplus"``, returned decoded: uint8 [T, H, W, 3].

    For models whose processor expects frames — a stock Qwen2.5-VL baseline served on the same
    frames as QTSplus (``--media-io-kwargs '{"video": {"video_backend": "qtsplus_frames"}}'``,
    ``qtsplus_vllm.convert``). QTSplus models use ``"qtsplus"``, whose items are the encoded bytes
    with the frames resized for the ViT; this one holds every kept frame at the decode size.
    """

    @classmethod
    def load_bytes(
        cls, data: bytes, /, num_frames: int = -1, **kwargs: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        encoded, metadata = cls.probe(data, kwargs, current_token())
        video = LazyVideo(encoded)
        frames = _decoding(video, video.to_array)
        _final_plan(metadata, video)
        metadata["video_backend"] = FRAMES_LOADER_NAME
        return frames, metadata


_BOUND = False  # set in a process whose QTSplus processor bound our loader (bind_video_loader)


class LoaderBindingError(ValueError):
    """The server's settings would decode a QTSplus model's videos with another loader (start-up)."""


def bind_video_loader(mm_config) -> str:
    """Make every video of a QTSplus server go through :class:`QTSplusVideoLoader`; return its name.

    vLLM picks a video loader per request: ``media_io_kwargs["video"]["video_backend"]`` first, then
    the loader bound to the video processor the checkpoint's files name
    (``video_preprocessor_config.json``'s ``video_processor_type``: the reference trainer's files say
    ``Qwen2VLVideoProcessor``, bound to vLLM's ``qwen2_vl`` loader, which samples at 2 fps with
    other limits), then ``VLLM_VIDEO_LOADER_BACKEND``. Setting the server-wide ``video_backend`` here
    (``mm_config.media_io_kwargs``, read by vLLM for every request) makes the first rule name ours,
    whatever the checkpoint's files say. A server configured with another loader
    (``--media-io-kwargs '{"video": {"video_backend": ...}}'``) is refused: its frames would not be
    the ones the model was trained on. A request that names another loader (only possible with
    ``--trust-request-mm-kwargs``) is refused when its video is fetched (:func:`check_video_loader`).
    """
    global _BOUND
    bound = VIDEO_LOADER_REGISTRY.load(LOADER_NAME)  # an instance of the registered class
    if not (bound is QTSplusVideoLoader or type(bound) is QTSplusVideoLoader):
        raise LoaderBindingError(
            f"vLLM's video loader registry maps {LOADER_NAME!r} to {type(bound).__name__}, not "
            "QTSplusVideoLoader: another plugin replaced it"
        )
    media = mm_config.media_io_kwargs
    if media is None:
        media = mm_config.media_io_kwargs = {}
    video = dict(media.get("video") or {})
    backend = video.get("video_backend")
    if backend not in (None, LOADER_NAME):
        raise LoaderBindingError(
            f"--media-io-kwargs sets video_backend={backend!r}: QTSplus models decode videos with the "
            f"{LOADER_NAME!r} loader, which samples frames by the rules the model was trained with "
            "(qwen-vl-utils: fps, min_frames, max_frames). Drop video_backend; set fps / max_frames there instead"
        )
    video["video_backend"] = LOADER_NAME
    media["video"] = video
    _BOUND = True
    return LOADER_NAME


def check_video_loader(loader: object) -> None:
    """Refuse (HTTP 400) a video fetch that would use another loader on a QTSplus server.

    Called with the loader vLLM chose for a fetch (``VideoMediaIO.video_loader``). Only a request can
    name another one, through ``media_io_kwargs`` (with ``--trust-request-mm-kwargs``): its frames
    would be sampled by other rules and answered with HTTP 200. Frames a client sends itself
    (``data:video/jpeg``) never reach a loader and stay accepted. A server that serves no QTSplus model
    (a stock baseline using ``qtsplus_frames``) never bound our loader: nothing is checked there.
    """
    if not _BOUND or isinstance(loader, QTSplusVideoLoader) or loader is None:
        return
    name = getattr(type(loader), "__name__", type(loader))
    raise as_http_error(
        RequestError(
            f"media_io_kwargs['video']['video_backend'] chose vLLM's {name} video loader: QTSplus models "
            f"decode videos with {LOADER_NAME!r}, whose frames are sampled the way the model was trained; "
            "remove video_backend from the request (use fps / max_frames to change the sampling)"
        )
    )


def register_video_loader() -> None:
    """Register :class:`QTSplusVideoLoader` as ``"qtsplus"`` and make it our model's default.

    Cheap and idempotent (no CUDA); run in every vLLM process by the plugin, before vLLM reads the
    model's video processor name (which it caches per model).
    """
    VIDEO_LOADER_REGISTRY.register(LOADER_NAME, video_processor=VIDEO_PROCESSOR_NAME)(QTSplusVideoLoader)
    VIDEO_LOADER_REGISTRY.register(FRAMES_LOADER_NAME)(QTSplusFramesVideoLoader)
    # For checkpoints that name no video_processor_type, vLLM falls back to this mapping by
    # model_type (those that name one are covered by bind_video_loader). Only vLLM's loader selection reads it by key: transformers' own lookups go
    # through VIDEO_PROCESSOR_MAPPING, which skips model types absent from CONFIG_MAPPING_NAMES
    # (ours is registered at runtime), so nothing tries to import the class.
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    if MODEL_TYPE not in VIDEO_PROCESSOR_MAPPING_NAMES:
        # transformers >= 5.19 maps to {backend: name}, earlier versions to a name
        sample = next(iter(VIDEO_PROCESSOR_MAPPING_NAMES.values()), None)
        entry = {"torchvision": VIDEO_PROCESSOR_NAME} if isinstance(sample, dict) else VIDEO_PROCESSOR_NAME
        VIDEO_PROCESSOR_MAPPING_NAMES[MODEL_TYPE] = entry
