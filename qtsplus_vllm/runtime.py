"""The selection runtime: frames + question ids -> the n rows a video contributes (torch only).

One runtime per (checkpoint, device, dtype) and process, loaded lazily by :func:`get_runtime` the
first time a real video arrives — never at import, never for profiling dummies — because vLLM
creates processor objects in every process (API server, engine core, workers).

It holds the Qwen2.5-VL ViT, the QTS+ selector and the LM's ``embed_tokens`` matrix (kept on the
CPU: only the L question rows are gathered and moved). Frames are resized, normalised and
patchified on the runtime's device.

Device: ``QTSPLUS_DEVICE`` (e.g. ``cuda:1``), else the first CUDA device when there is one, else
the CPU. On the CPU the runtime uses ``QTSPLUS_CPU_THREADS`` torch threads (default: all cores):
vLLM runs multimodal processing under ``OMP_NUM_THREADS`` threads (1 when unset), which would leave
the ViT single-threaded while an engine-side ViT gets every core. One core fewer while a decoder
runs next to the ViT — the processor's own stream, or the media loader decoding other videos ahead
(:func:`vit_threads`) — so that torch's threads do not spin against it.

ViT features are kept in a :class:`~qtsplus_vllm.feature_cache.FeatureCache` keyed by the video
(its encoded bytes and sampling plan, or the decoded frames of an eager item) and the preprocessing
settings, so a follow-up question on a video runs only the selector: ``QTSPLUS_FEATURE_CACHE_BYTES``
bounds its first tier (default: sized from the memory free when the runtime loads; 0 turns the cache
off), ``QTSPLUS_FEATURE_CACHE_HOST_BYTES`` a second tier in host memory behind a GPU first tier, and
``QTSPLUS_FEATURE_CACHE_DEVICE`` (default: the runtime's device; ``cpu`` for host memory, pinned
with CUDA) says where the first tier lives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import astuple, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cancel import CancelToken
from .cancel import check as check_cancelled
from .checkpoint import CheckpointReader, load_config, validate_checkpoint
from .config import SELECTOR_PREFIX
from .devices import default_device, feature_cache_device
from .feature_cache import CachedFeatures, FeatureCache, frames_digest
from .hub import EMBED_KEY, download_dir_from_argv, resolve_hub_checkpoint
from .limits import SelectionUnavailable, server_limits
from .options import SelectionOptions
from .selector import QTSplusSelector
from .settings import settings, unknown_variables
from .streaming import (
    LazyVideo,
    PreparedFrames,
    chunk_frames_for,
    chunk_geometry,
    decoder_scale,
    frame_chunks,
    iter_vision_inputs,
    prepare_frames,
    prepared_vision_inputs,
    stream_chunk_frames,
)
from .video import FrameCountMismatch, PreprocessConfig, vit_patch_count
from .vision import VisionEncoder

logger = logging.getLogger(__name__)


def cpu_threads() -> int:
    """Torch threads for CPU selection work: ``QTSPLUS_CPU_THREADS`` or every core this process may use
    (its CPU affinity, as FFmpeg's decoder threads count them; ``os.cpu_count()`` counts the machine's)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return settings().cpu_threads or usable or 1


def feature_cache_settings() -> tuple[int | None, torch.device | None, int | None]:
    """(first-tier bytes, its device or None for the runtime's, host-tier bytes) from the settings.

    ``QTSPLUS_FEATURE_CACHE_BYTES`` (0 turns the cache off), ``QTSPLUS_FEATURE_CACHE_DEVICE``,
    ``QTSPLUS_FEATURE_CACHE_HOST_BYTES`` (the host-memory tier behind a GPU first tier). Bytes None
    (unset): sized from the machine when the runtime loads (:func:`feature_cache.tier_sizes`).
    """
    values = settings()
    return values.feature_cache_bytes, feature_cache_device(), values.feature_cache_host_bytes


def vit_threads() -> int:
    """Torch threads for the CPU ViT of frames decoded elsewhere (prepared ahead, or eager frames).

    :func:`cpu_threads`, less one core while the media loader is decoding other videos ahead
    (:func:`videos_preparing`): the same rule as the streamed path, whose own decoder runs next to
    the ViT. All cores for the ViT oversubscribe them, and torch's OpenMP threads spin against the
    decoders (measured on 2 cores: the ViT several times slower).
    """
    threads = cpu_threads()
    return max(1, threads - 1) if videos_preparing() > 0 else threads


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op torch threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_RESOLVED: dict[tuple[str, str | None, str | None], Path] = {}
_RESOLVE_LOCK = threading.Lock()


def resolve_model_dir(model: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local directory for ``model``: the path itself, or what :mod:`qtsplus_vllm.hub` resolves for a repo id.

    Resolved once per process and remembered (the server does it at start-up, in
    :func:`check_server_settings`): later calls never ask the Hub again, so a request costs no
    network round trip and never downloads, and a moving ``main`` cannot swap the weights under a
    running server. Only the shards holding the ViT, selector and embedding tensors are fetched;
    ``download_dir`` (default: vLLM's ``--download-dir`` from the command line) is searched first, then
    the Hugging Face cache.
    """
    if os.path.isdir(model):
        return Path(model)
    download_dir = download_dir or download_dir_from_argv()
    key = (model, revision, download_dir)
    with _RESOLVE_LOCK:
        if key not in _RESOLVED:
            _RESOLVED[key] = resolve_hub_checkpoint(model, revision, download_dir)
        return _RESOLVED[key]


def trust_client_uuids() -> bool:
    """``QTSPLUS_TRUST_CLIENT_UUIDS``: whether a client's media ``uuid`` may stand for the media.

    Off (the default), every item that carries data is keyed by its content and a request that
    names media by uuid alone is refused; on, vLLM's own rule applies (the uuid is the item's
    identity in every cache) — only for deployments whose clients are all trusted.
    """
    return settings().trust_client_uuids


def runtime_retry_seconds() -> float:
    """``QTSPLUS_RUNTIME_RETRY_SECONDS`` (default 30): how long a failed runtime load is not retried."""
    return settings().runtime_retry_seconds


def check_server_settings(model: str | None = None, revision: str | None = None) -> None:
    """Refuse bad ``QTSPLUS_*`` values and a checkpoint the runtime cannot load, when the server starts.

    Raises :class:`~qtsplus_vllm.settings.SettingsError` (a ``ValueError``) naming every bad variable,
    its value and what is allowed; ``CheckpointError`` for missing or misshapen ViT or
    selector tensors, a LoRA state dict, an index naming files outside the checkpoint, or a Hub
    checkpoint whose ViT/selector shards cannot be had (:func:`resolve_model_dir`). Reads headers
    only: no weights, no CUDA.
    """
    settings()  # every QTSPLUS_* variable, validated together: SettingsError (a ValueError) names each bad one
    for name in unknown_variables():
        logger.warning("%s is set but is no QTSplus setting (docs/configuration.md): ignored", name)
    if model is not None:
        # a Hub id is resolved here, once: the shards with the ViT and selector tensors are fetched
        # now or the server does not start (no request ever downloads)
        model_dir = resolve_model_dir(model, revision)
        validate_checkpoint(load_config(model_dir), CheckpointReader(model_dir))


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or host)."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    # the CPU allocator reports a failed allocation as a plain RuntimeError
    return isinstance(err, RuntimeError) and "allocate" in str(err) and "memory" in str(err)


def release_device_memory(device: torch.device) -> None:
    """Give cached allocator blocks back after a failure (call it once the exception is gone)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# CUDA errors after which the process's CUDA context is unusable (every later call fails too).
_STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "device-side assert",
    "unspecified launch failure",
    "ECC error",
    "hardware stack error",
    "uncorrectable",
)
_DEVICE_FAILURE: str | None = None


def sticky_device_error(err: BaseException) -> bool:
    """Whether ``err`` is a CUDA error that leaves the device unusable for this process."""
    text = str(err)
    accelerator_error = getattr(torch, "AcceleratorError", ())
    cuda_error = isinstance(err, accelerator_error) or "CUDA error" in text
    return cuda_error and any(marker.lower() in text.lower() for marker in _STICKY_CUDA_ERRORS)


def report_device_failure(runtime: SelectionRuntime, err: BaseException) -> SelectionUnavailable | None:
    """Handle a runtime failure that is not the request's fault; None if ``err`` is not one.

    A sticky CUDA error poisons this process's CUDA context: the runtime is dropped and the server
    reports itself unhealthy (:func:`device_failure` -> ``/health`` 503) so an orchestrator restarts
    it; until then every selection answers 503.
    """
    global _DEVICE_FAILURE
    if not sticky_device_error(err):
        return None
    with _RUNTIMES_LOCK:
        _DEVICE_FAILURE = f"{runtime.device}: {err}"
        for key, value in list(_RUNTIMES.items()):
            if value is runtime:
                del _RUNTIMES[key]
    return SelectionUnavailable(
        f"the selection device failed ({str(err).splitlines()[0]}); this server must be restarted"
    )


def device_failure() -> str | None:
    """Why this process's selection runtime cannot run any more, or None while it is healthy."""
    return _DEVICE_FAILURE


@dataclass
class VideoSelection:
    """What one video contributes to the prompt.

    embeds:  [n, D] CPU rows in the model dtype (re-encoded kept tokens, or all M ViT tokens when
             selection is off).
    indices: [n] int64 CPU, ascending positions of the kept tokens among the M.
    scores:  [M] fp32 CPU relevance r of every visual token (None when selection is off).
    cache_hit: the ViT features came from the feature cache.
    """

    embeds: torch.Tensor
    indices: torch.Tensor
    num_visual_tokens: int  # M
    rho: float | None  # None when selection is off
    num_frames: int
    grid_thw: tuple[int, int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    cache_hit: bool = False
    merge_size: int = 2

    @property
    def n(self) -> int:
        return int(self.embeds.shape[0])


def _patches_per_frame(shape: tuple[int, ...], preprocess: PreprocessConfig) -> int:
    """ViT patches of one frame of a [T, H, W, 3] video after qwen-vl-utils' resize."""
    _, (h, w), _ = chunk_geometry(shape, preprocess)
    return (h // preprocess.patch_size) * (w // preprocess.patch_size)


class SelectionRuntime:
    """ViT + selector + question embeddings for one checkpoint on one device."""

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype, device: str | torch.device):
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = load_config(model_dir)
        reader = CheckpointReader(model_dir)
        validate_checkpoint(self.config, reader)
        self.vision = VisionEncoder.from_checkpoint(reader, self.config, device=self.device, dtype=dtype)
        self.selector = QTSplusSelector.from_config(self.config).to(device=self.device, dtype=dtype).eval()
        self.selector.load_state_dict(reader.load_prefix(SELECTOR_PREFIX, dtype=dtype, device=self.device))
        self.embed_tokens = reader.load([EMBED_KEY], dtype=dtype)[EMBED_KEY]  # [V, D], stays on CPU
        self.lock = threading.Lock()  # one selection at a time (select)
        # one ViT chunk at a time: media threads encoding their videos (encode_ahead) and the
        # processor take turns chunk by chunk, so no video holds the ViT for its whole length
        self.vit_lock = threading.Lock()
        max_bytes, cache_device, host_bytes = feature_cache_settings()
        self.feature_cache = FeatureCache.sized(cache_device or self.device, max_bytes, host_bytes)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def embed_question(self, question_ids: list[int]) -> torch.Tensor:
        """[L, D] raw LM embeddings of the question tokens, on the runtime's device."""
        ids = torch.tensor(question_ids, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("the question has no tokens")
        if int(ids.max()) >= self.embed_tokens.shape[0] or int(ids.min()) < 0:
            raise ValueError(f"question token ids outside the vocabulary [0, {self.embed_tokens.shape[0]})")
        return self.embed_tokens[ids].to(self.device, non_blocking=True)

    def _encode_inputs(
        self,
        inputs: Iterator[tuple[torch.Tensor, torch.Tensor]],
        shape: tuple[int, int, int, int],
        preprocess: PreprocessConfig,
        timings: dict[str, float],
        cancel: CancelToken | None = None,
    ) -> CachedFeatures:
        """ViT features of a video of ``shape`` [T, H, W, 3] from its ViT inputs, chunk by chunk.

        Each chunk (:func:`~qtsplus_vllm.streaming.iter_vision_inputs` or
        :func:`~qtsplus_vllm.streaming.prepared_vision_inputs`: bit-identical to preprocessing the
        whole video) is encoded on its own; its rows go into one preallocated [M, D] tensor. Chunks
        hold whole temporal patches and the ViT attends only within a temporal patch, so the rows
        are those of one pass over the whole video (up to floating-point blocking). Only one chunk's
        pixels and activations exist at a time. A cancelled ``cancel`` stops it before the next chunk
        (:class:`~qtsplus_vllm.cancel.VideoCancelled`).
        """
        padded, size, m = chunk_geometry(shape, preprocess)
        visual, row = None, 0
        for pixel_values, grid_thw in inputs:
            check_cancelled(cancel, row)  # a cancelled request's frames go now, not after the ViT
            clock = time.perf_counter()
            with self.vit_lock:
                rows = self.vision(pixel_values, grid_thw)  # [c/2 · gh · gw / merge², D]
            del pixel_values
            if visual is None:
                visual = torch.empty(m, rows.shape[1], dtype=rows.dtype, device=rows.device)
            if row + rows.shape[0] > m:
                raise RuntimeError(f"the ViT produced more than the {m} rows planned")
            visual[row : row + rows.shape[0]] = rows
            row += rows.shape[0]
            del rows
            self._sync()
            timings["vit_ms"] += (time.perf_counter() - clock) * 1e3
        if row != m:
            raise RuntimeError(f"the ViT produced {row} of the {m} rows planned")
        p = preprocess.patch_size
        return CachedFeatures(
            visual, (padded // preprocess.temporal_patch_size, size[0] // p, size[1] // p), padded
        )

    def _encode_chunks(
        self,
        chunks: Iterator[np.ndarray],
        shape: tuple[int, int, int, int],
        preprocess: PreprocessConfig,
        timings: dict[str, float],
        cancel: CancelToken | None = None,
    ) -> CachedFeatures:
        """ViT features of a video given as uint8 chunks [c, H, W, 3] of its ``shape[0]`` frames."""
        inputs = iter_vision_inputs(chunks, shape, preprocess, self.device, self.dtype, timings)
        return self._encode_inputs(inputs, shape, preprocess, timings, cancel)

    def _encode_prepared(
        self, video: LazyVideo, preprocess: PreprocessConfig, timings: dict[str, float]
    ) -> CachedFeatures:
        """ViT features from the frames the media loader decoded and resized (``PreparedFrames``)."""
        prepared = video.prepared
        for stage in ("decode_ms", "decode_wait_ms", "preprocess_ms"):
            timings[stage] += prepared.timings_ms.get(stage, 0.0)
        chunk = chunk_frames_for(
            *video.shape[1:3], stream_chunk_frames(), _patches_per_frame(video.shape, preprocess)
        )
        inputs = prepared_vision_inputs(prepared, preprocess, chunk, self.device, self.dtype, timings)
        return self._encode_inputs(
            self._beside_decoders(inputs), video.shape, preprocess, timings, video.plan.cancel
        )

    def _beside_decoders(self, inputs: Iterator) -> Iterator:
        """``inputs``, with the CPU torch threads set by :func:`vit_threads` before each chunk (its
        preprocessing and its ViT pass): a core is left to the loader's decoders while any run."""
        if self.device.type != "cpu":
            yield from inputs
            return
        while True:
            torch.set_num_threads(vit_threads())  # select() restores the caller's setting
            try:
                item = next(inputs)
            except StopIteration:
                return
            yield item

    def _encode(self, frames, preprocess: PreprocessConfig, timings: dict[str, float]) -> CachedFeatures:
        if isinstance(frames, LazyVideo):
            check_cancelled(frames.plan.cancel, 0)
        chunk = stream_chunk_frames()
        if isinstance(frames, LazyVideo) and frames.prepared is not None:
            if frames.prepared.matches(frames, preprocess):  # the loader decoded and resized it
                return self._encode_prepared(frames, preprocess, timings)
        if isinstance(frames, LazyVideo):
            # The decoder thread (with FFmpeg's own threads) runs next to the ViT: torch keeps one
            # core fewer meanwhile. All cores for both oversubscribe them and torch's OpenMP threads
            # spin against the decoder (measured on 2 cores: the ViT 5x slower, the video 2x).
            threads = max(1, cpu_threads() - 1) if self.device.type == "cpu" else None
            chunk = chunk_frames_for(*frames.shape[1:3], chunk, _patches_per_frame(frames.shape, preprocess))
            with torch_threads(threads) if threads else contextlib.nullcontext():
                return self._encode_stream(frames, chunk, preprocess, timings)
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        chunk = chunk_frames_for(*frames.shape[1:3], chunk, _patches_per_frame(frames.shape, preprocess))
        inputs = iter_vision_inputs(
            frame_chunks(frames, chunk), frames.shape, preprocess, self.device, self.dtype, timings
        )
        return self._encode_inputs(self._beside_decoders(inputs), frames.shape, preprocess, timings)

    def _encode_stream(
        self, video: LazyVideo, chunk: int, preprocess: PreprocessConfig, timings: dict[str, float]
    ) -> CachedFeatures:
        while True:
            plan = video.plan
            if plan.limits is not None:  # a plan redone from the decoded count is checked again
                t, h, w, _ = video.shape
                plan.limits.check_vit_patches(vit_patch_count(t, h, w, preprocess))
            stream = video.chunks(chunk, timings, decoder_scale(video.shape, preprocess))
            try:
                return self._encode_chunks(stream, video.shape, preprocess, timings, video.plan.cancel)
            except FrameCountMismatch:  # the stream held another frame count: video.plan is redone
                continue
            finally:
                stream.close()  # stops the decoder thread on any failure

    @torch.inference_mode()
    def encode_ahead(self, video: LazyVideo, preprocess: PreprocessConfig) -> LoaderFeatures | None:
        """The ViT's rows of ``video`` computed in the calling thread (a media thread), for the processor.

        Decoded as a stream next to the ViT, exactly as :meth:`select` does, without the selection's
        lock: only each ViT chunk holds :attr:`vit_lock`. None when the feature cache already holds
        the video with these settings (the processor's selection finds them there).
        """
        if self.feature_cache.max_bytes and self.feature_cache.contains(video.digest(astuple(preprocess))):
            return None
        timings = {"decode_ms": 0.0, "decode_wait_ms": 0.0, "preprocess_ms": 0.0, "vit_ms": 0.0}
        threads = torch_threads(cpu_threads()) if self.device.type == "cpu" else contextlib.nullcontext()
        with threads:
            features = self._encode(video, preprocess, timings)
        return LoaderFeatures(features, astuple(preprocess), video.plan.key(), timings)

    @torch.inference_mode()
    def select(
        self, frames: np.ndarray | LazyVideo, question_ids: list[int], options: SelectionOptions
    ) -> VideoSelection:
        """Video frames and question token ids -> the rows for the LM (thread-safe).

        ``frames``: uint8 [T, H, W, 3], or a :class:`~qtsplus_vllm.streaming.LazyVideo` (encoded
        bytes + sampling plan), which is decoded here as a stream overlapping the ViT — and not at
        all when the feature cache holds this video with these settings (a follow-up question).
        """
        threads = torch_threads(cpu_threads()) if self.device.type == "cpu" else contextlib.nullcontext()
        with self.lock, threads:
            timings = {"decode_ms": 0.0, "decode_wait_ms": 0.0, "preprocess_ms": 0.0, "vit_ms": 0.0}
            clock = time.perf_counter()
            preprocess = options.preprocess_config()
            key = None
            if self.feature_cache.max_bytes:
                if isinstance(frames, LazyVideo):  # the encoded bytes: a follow-up skips all decoding
                    key = frames.digest(astuple(preprocess))
                else:
                    key = frames_digest(np.asarray(frames), astuple(preprocess))
            cached = self.feature_cache.get(key, self.device) if key is not None else None
            timings["hash_ms"] = (time.perf_counter() - clock) * 1e3

            ahead = getattr(frames, "features", None) if isinstance(frames, LazyVideo) else None
            if cached is None and ahead is not None and ahead.matches(frames, preprocess):
                cached = ahead.features  # the loader encoded it (encode_ahead): no decoding, no ViT here
                for stage, ms in ahead.timings_ms.items():
                    timings[stage] = timings.get(stage, 0.0) + ms
                if key is not None:
                    self.feature_cache.put(key, cached)
                hit = False
            elif cached is None:
                cached = self._encode(frames, preprocess, timings)
                if key is not None:
                    self.feature_cache.put(key, cached)
                hit = False
            else:
                hit = True
            visual = cached.visual

            clock = time.perf_counter()
            m = visual.shape[0]
            scores = None
            if options.select:
                selection = self.selector.select(
                    visual,
                    self.embed_question(question_ids),
                    rho_scale=options.rho_scale,
                    rho_bounds=(options.rho_min, options.rho_max),
                    max_tokens=options.max_tokens,
                )
                rows, indices, rho = selection.embeds, selection.indices, selection.rho
                scores = selection.scores.float().cpu()
            else:  # the no-selection baseline: every ViT token, in temporal order, no re-encode
                rows, indices, rho = visual, torch.arange(m, device=visual.device), None
            rows = rows.to("cpu", self.dtype)
            self._sync()
            timings["selector_ms"] = (time.perf_counter() - clock) * 1e3
        return VideoSelection(
            embeds=rows.contiguous(),
            indices=indices.cpu(),
            num_visual_tokens=m,
            rho=rho,
            num_frames=cached.num_frames,
            grid_thw=cached.grid_thw,
            timings_ms=timings,
            scores=scores,
            cache_hit=hit,
            merge_size=preprocess.merge_size,
        )


# -- decoding ahead, in the media loader -----------------------------------------------------------


@dataclass
class LoaderFeatures:
    """A video's ViT rows computed in the media loader (:meth:`SelectionRuntime.encode_ahead`), for
    the settings and plan they were computed with, and the loader's stage timings."""

    features: CachedFeatures
    settings: tuple
    plan_key: tuple
    timings_ms: dict[str, float]

    def matches(self, video: LazyVideo, config: PreprocessConfig) -> bool:
        return self.settings == astuple(config) and self.plan_key == video.plan.key()


_LOADER_PREPROCESS: PreprocessConfig | None = None
_IN_FLIGHT = 0  # videos our loader returned that are still alive (loading, queued or being encoded)
_PREPARING = 0  # videos being decoded and resized ahead in the loader right now
_IN_FLIGHT_LOCK = threading.Lock()


def prepare_mode() -> str:
    """``QTSPLUS_PREPARE_IN_LOADER``: ``vit`` (default), ``auto``, ``1`` or ``0`` — where a video is decoded.

    ``vit``: the loader decodes the video as a stream into the ViT, in vLLM's media thread pool
    (:func:`encode_ahead`), so that no video's decoding ever runs on the processing thread (one per
    API server, which every request needs): the processor runs only the selector. ``1``: the loader decodes and resizes each video as soon as it is fetched, in vLLM's media
    thread pool, where the videos of concurrent requests are decoded in parallel; the processor
    (one thread per API server) then runs only the ViT and the selector. ``0``: the loader only
    plans the video and the processor decodes it as a stream next to the ViT — one video at a time
    per API server, but decoding overlaps the ViT and nothing waits decoded. ``auto``: ``1`` while
    another video is in flight on this API server (throughput under load), ``0`` for a video alone
    (its latency).
    """
    return settings().prepare_in_loader


def track_video(video: object) -> int:
    """Count ``video`` (our loader's item) as in flight until it is garbage or :func:`release_video`-d;
    the number of other videos in flight before it."""
    global _IN_FLIGHT
    with _IN_FLIGHT_LOCK:
        others = _IN_FLIGHT
        _IN_FLIGHT += 1
    done = weakref.finalize(video, _video_done)
    with contextlib.suppress(AttributeError):  # kept to end the count early (release_video)
        video._qtsplus_in_flight = done
    _notify_in_flight()
    return others


def _video_done() -> None:
    global _IN_FLIGHT
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT -= 1
    _notify_in_flight()


def release_video(video: object) -> None:
    """A cancelled request's video: drop the frames (or ViT rows) it holds from the loader and count
    it out of the videos in flight now, not when vLLM lets go of the item (idempotent)."""
    if getattr(video, "prepared", None) is not None:
        video.prepared = None
    if getattr(video, "features", None) is not None:
        video.features = None
    done = getattr(video, "_qtsplus_in_flight", None)
    if done is not None:
        done()  # a finalizer runs once: the item's garbage collection will not count it again


_IN_FLIGHT_LISTENER = None  # called after each change (the serving layer's gauge)


def set_in_flight_listener(listener) -> None:
    """``listener()`` after every change of :func:`videos_in_flight`, outside the count's lock (a
    finalizer may run in any thread at any allocation): it reads the count itself, so the last call
    sees the last value. None: no listener."""
    global _IN_FLIGHT_LISTENER
    _IN_FLIGHT_LISTENER = listener


def _notify_in_flight() -> None:
    listener = _IN_FLIGHT_LISTENER
    if listener is not None:
        with contextlib.suppress(Exception):  # runs in finalizers: never let a metric break that
            listener()


def videos_in_flight() -> int:
    with _IN_FLIGHT_LOCK:
        return _IN_FLIGHT


@contextlib.contextmanager
def preparing_video() -> Iterator[None]:
    """Count the block as a video being decoded ahead (:func:`videos_preparing`)."""
    global _PREPARING
    with _IN_FLIGHT_LOCK:
        _PREPARING += 1
    try:
        yield
    finally:
        with _IN_FLIGHT_LOCK:
            _PREPARING -= 1


def videos_preparing() -> int:
    """Videos the media loader is decoding and resizing ahead right now (in vLLM's media threads)."""
    with _IN_FLIGHT_LOCK:
        return _PREPARING


def should_prepare(others_in_flight: int) -> bool:
    """Whether the loader decodes a video ahead, given the other videos in flight (:func:`prepare_mode`)."""
    mode = prepare_mode()
    return mode == "1" or (mode == "auto" and others_in_flight > 0)


def set_loader_preprocess(config: PreprocessConfig) -> None:
    """The server's default preprocessing (its ``--mm-processor-kwargs``), which the loader resizes to.

    Set by the processor when the server starts; a request whose own kwargs change the
    preprocessing has its video decoded again by the processor.
    """
    global _LOADER_PREPROCESS
    _LOADER_PREPROCESS = config


_REQUEST_PREPROCESS = None  # (request mm_processor_kwargs) -> PreprocessConfig (set by the processor)


def set_request_preprocess(resolve) -> None:
    """How the loader finds a request's preprocessing from its own ``mm_processor_kwargs`` (the
    server's defaults merged with them, as the processor does)."""
    global _REQUEST_PREPROCESS
    _REQUEST_PREPROCESS = resolve


def loader_preprocess(request_kwargs=None) -> PreprocessConfig:
    """The preprocessing the loader prepares a video for: the request's when it sets its own (and
    they are valid: else the processor refuses the request), else the server's defaults."""
    if request_kwargs and _REQUEST_PREPROCESS is not None:
        try:
            return _REQUEST_PREPROCESS(request_kwargs)
        except (ValueError, TypeError):
            pass
    return _LOADER_PREPROCESS or PreprocessConfig(resize=settings().resize)


def loaded_runtime() -> SelectionRuntime | None:
    """This process's selection runtime if one is loaded (a server loads one)."""
    with _RUNTIMES_LOCK:
        return next(iter(_RUNTIMES.values()), None)


def prepare_video(video: LazyVideo, preprocess: PreprocessConfig | None = None) -> PreparedFrames | None:
    """Decode and resize ``video`` ahead of the processor (:func:`~qtsplus_vllm.streaming.prepare_frames`),
    or None where that would be wasted or cannot be done here.

    None when the ViT-feature cache already holds the video with these settings (a follow-up question
    needs neither frames nor decoding), when the video is over the ViT-patch limit at these settings
    (the processor refuses it, or decodes it at a request's own lower settings), after a device
    failure, and when the resize runs out of memory (the processor then streams the video, with its
    own handling of that). Decode errors and limits met while decoding raise.
    """
    preprocess = preprocess or loader_preprocess()
    if not _loader_may_take(video, preprocess):
        return None
    runtime = loaded_runtime()
    if runtime is not None and runtime.feature_cache.max_bytes:
        if runtime.feature_cache.contains(video.digest(astuple(preprocess))):
            return None
    device = runtime.device if runtime is not None else default_device()
    try:
        with preparing_video():
            return prepare_frames(video, preprocess, device)
    except (RuntimeError, MemoryError) as err:
        if not (out_of_memory(err) or sticky_device_error(err)):
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    release_device_memory(device)
    logger.warning(
        "QTSplus: decoding a %s video ahead failed (%s); the processor decodes it", list(video.shape), reason
    )
    return None


def _loader_may_take(video: LazyVideo, preprocess: PreprocessConfig) -> bool:
    """Whether the media loader may work on ``video`` ahead of the processor: not after a device
    failure, nor over the ViT-patch limit at these settings (the processor refuses it, or decodes it
    at a request's own lower settings)."""
    if _DEVICE_FAILURE is not None:
        return False
    t, h, w, _ = video.shape
    return vit_patch_count(t, h, w, preprocess) <= server_limits().max_vit_patches


_LOADER_RUNTIME = None  # () -> SelectionRuntime: the server's, for encode_ahead (set by the processor)


def set_loader_runtime(load) -> None:
    """How the media loader gets the server's runtime (``load()``; loads it on the first video)."""
    global _LOADER_RUNTIME
    _LOADER_RUNTIME = load


def encode_ahead(video: LazyVideo, preprocess: PreprocessConfig | None = None) -> LoaderFeatures | None:
    """The ViT's rows of ``video`` computed here, in the media loader (``QTSPLUS_PREPARE_IN_LOADER=vit``),
    or None where that would be wasted or cannot be done here (as :func:`prepare_video`; also when no
    runtime is known to this process). A runtime that cannot be loaded raises its 503."""
    preprocess = preprocess or loader_preprocess()
    if not _loader_may_take(video, preprocess):
        return None
    runtime = loaded_runtime()
    if runtime is None and _LOADER_RUNTIME is not None:
        runtime = _LOADER_RUNTIME()
    if runtime is None:
        return None
    try:
        with preparing_video():
            return runtime.encode_ahead(video, preprocess)
    except (RuntimeError, MemoryError) as err:
        if not (out_of_memory(err) or sticky_device_error(err)):
            raise
        failure = report_device_failure(runtime, err)  # a poisoned device: the request's 503
        if failure is not None:
            raise failure from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    release_device_memory(runtime.device)
    logger.warning(
        "QTSplus: encoding a %s video in the loader failed (%s); the processor decodes it",
        list(video.shape),
        reason,
    )
    return None


_RUNTIMES: dict[tuple[str, str, torch.dtype], SelectionRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()
# (checkpoint, device, dtype) -> (monotonic time of the failed load, the reason)
_FAILED_LOADS: dict[tuple[str, str, torch.dtype], tuple[float, str]] = {}


def get_runtime(
    model: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | None = None,
    revision: str | None = None,
) -> SelectionRuntime:
    """The process-global runtime for this checkpoint (a directory or a Hub repo id), device and dtype.

    Loaded on first use. A load that fails for lack of memory raises :class:`SelectionUnavailable`
    (HTTP 503); the failure is remembered for ``QTSPLUS_RUNTIME_RETRY_SECONDS`` so that a stream of
    requests does not reload the checkpoint once each. A sticky device error while loading poisons
    the process's CUDA context like one while selecting (:func:`report_device_failure`): the runtime
    is dead for this process (``/health`` 503, every selection 503, no retry).
    """
    global _DEVICE_FAILURE
    if _DEVICE_FAILURE is not None:
        raise SelectionUnavailable(
            f"the selection device failed earlier ({_DEVICE_FAILURE.splitlines()[0]}); "
            "this server must be restarted"
        )
    model_dir = resolve_model_dir(str(model), revision)
    device = device or default_device()
    key = (str(Path(model_dir).resolve()), str(device), dtype)
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is not None:
            return runtime
        failed = _FAILED_LOADS.get(key)
        if failed is not None and time.monotonic() - failed[0] < runtime_retry_seconds():
            raise SelectionUnavailable(f"the selection runtime could not be loaded: {failed[1]}; retry later")
        reason = None
        try:
            runtime = _RUNTIMES[key] = SelectionRuntime(model_dir, dtype, device)
            _FAILED_LOADS.pop(key, None)
            return runtime
        except (RuntimeError, MemoryError) as err:
            if sticky_device_error(err):  # the CUDA context is poisoned: a retry cannot succeed
                _DEVICE_FAILURE = f"{device} (while loading the selection runtime): {err}"
                raise SelectionUnavailable(
                    f"the selection device failed while loading the runtime ({str(err).splitlines()[0]}); "
                    "this server must be restarted"
                ) from None
            if not out_of_memory(err):
                raise
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            _FAILED_LOADS[key] = (time.monotonic(), reason)
    # the failed load's tensors are unreachable once the exception is gone
    release_device_memory(device)
    raise SelectionUnavailable(f"the selection runtime could not be loaded: {reason}; retry later")
