"""Prometheus metrics of the selection, exported on vLLM's ``/metrics`` (API-server process).

vLLM serves ``prometheus_client``'s registry (multiprocess-aware when it runs several API
servers), so metrics created here appear next to vLLM's own. Created on first use, once per process (thread-safe).

- ``qtsplus_kept_ratio``: n / M per video (histogram);
- ``qtsplus_visual_tokens`` (M) and ``qtsplus_selected_tokens`` (n) per video (histograms);
- ``qtsplus_decode_seconds``, ``qtsplus_preprocess_seconds``, ``qtsplus_vit_seconds``,
  ``qtsplus_selector_seconds`` (histograms; decoding, preprocessing and ViT are not observed on
  feature-cache hits, decoding only for videos decoded as a stream into the ViT (by default in the media loader) — whose
  decoder runs on its own thread next to preprocessing and the ViT, so the stages overlap);
- ``qtsplus_feature_cache_hits_total`` / ``_misses_total`` (counters), ``qtsplus_feature_cache_bytes``
  and ``qtsplus_feature_cache_entries`` (gauges: the first tier, on the selection device),
  ``qtsplus_feature_cache_host_bytes`` / ``_host_entries`` (gauges: the host-memory tier),
  ``qtsplus_feature_cache_max_bytes`` / ``_host_max_bytes`` (gauges: each tier's bound) and
  ``qtsplus_feature_cache_entry_bytes`` (histogram: the size M × D × dtype of each video's ViT
  features, observed when they are computed);
- ``qtsplus_rejected_requests_total{status}``: requests refused by a limit (413), bad input or an
  unusable URL (400), a failed or timed-out upstream (502, 504) or an unavailable selection
  runtime (503), by HTTP status;
- ``qtsplus_cancelled_videos_total`` (counter): videos whose decoding or processing stopped because
  their request was cancelled (the client went away, or another video of the request failed);
  ``qtsplus_videos_in_flight`` (gauge): videos loaded and not yet released (``serving.cancellation``).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from prometheus_client import Counter, Gauge, Histogram

_TOKENS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_BYTES = (1e5, 1e6, 1e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2e9, 4e9)
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_METRICS: SimpleNamespace | None = None
_LOCK = threading.Lock()


def metrics() -> SimpleNamespace:
    """The process's metrics, created once even when two threads ask first at the same moment.

    prometheus_client refuses a second metric of one name ("Duplicated timeseries"), and vLLM's
    processing thread and the media or endpoint threads can both be first here.
    """
    global _METRICS
    if _METRICS is None:
        with _LOCK:
            if _METRICS is None:
                _METRICS = _create()
    return _METRICS


def _create() -> SimpleNamespace:
    return SimpleNamespace(
        kept_ratio=Histogram(
            "qtsplus_kept_ratio",
            "Fraction n/M of a video's visual tokens kept by the QTS+ selector",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0),
        ),
        visual_tokens=Histogram(
            "qtsplus_visual_tokens", "Visual tokens M of a video (ViT output)", buckets=_TOKENS
        ),
        selected_tokens=Histogram(
            "qtsplus_selected_tokens", "Tokens n a video contributes to the prompt", buckets=_TOKENS
        ),
        decode_seconds=Histogram(
            "qtsplus_decode_seconds",
            "Video decode time per video (the decoder thread's own time; overlaps preprocess and ViT)",
            buckets=_SECONDS,
        ),
        preprocess_seconds=Histogram(
            "qtsplus_preprocess_seconds",
            "Frame resize, normalise and patchify time per video",
            buckets=_SECONDS,
        ),
        vit_seconds=Histogram("qtsplus_vit_seconds", "ViT time per video", buckets=_SECONDS),
        selector_seconds=Histogram(
            "qtsplus_selector_seconds", "QTS+ selector time per video", buckets=_SECONDS
        ),
        cache_hits=Counter("qtsplus_feature_cache_hits", "ViT-feature cache hits"),
        cache_misses=Counter("qtsplus_feature_cache_misses", "ViT-feature cache misses"),
        cache_bytes=Gauge(
            "qtsplus_feature_cache_bytes", "Bytes held by the ViT-feature cache", multiprocess_mode="livesum"
        ),
        cache_entries=Gauge(
            "qtsplus_feature_cache_entries",
            "Videos held by the ViT-feature cache",
            multiprocess_mode="livesum",
        ),
        cache_host_bytes=Gauge(
            "qtsplus_feature_cache_host_bytes",
            "Bytes held by the ViT-feature cache's host-memory tier",
            multiprocess_mode="livesum",
        ),
        cache_host_entries=Gauge(
            "qtsplus_feature_cache_host_entries",
            "Videos held by the ViT-feature cache's host-memory tier",
            multiprocess_mode="livesum",
        ),
        cache_max_bytes=Gauge(
            "qtsplus_feature_cache_max_bytes",
            "Bound of the ViT-feature cache's first tier (selection device)",
            multiprocess_mode="livesum",
        ),
        cache_host_max_bytes=Gauge(
            "qtsplus_feature_cache_host_max_bytes",
            "Bound of the ViT-feature cache's host-memory tier",
            multiprocess_mode="livesum",
        ),
        cache_entry_bytes=Histogram(
            "qtsplus_feature_cache_entry_bytes",
            "Size of one video's ViT features (M x D in the model dtype), as computed",
            buckets=_BYTES,
        ),
        rejected=Counter("qtsplus_rejected_requests", "Requests refused by QTSplus checks", ["status"]),
        cancelled_videos=Counter(
            "qtsplus_cancelled_videos",
            "Videos whose decoding or processing stopped because their request was cancelled",
        ),
        videos_in_flight=Gauge(
            "qtsplus_videos_in_flight",
            "Videos loaded and not yet released (loading, waiting for the processor or being encoded)",
            multiprocess_mode="livesum",
        ),
    )


def observe_selection(result, cache_stats: dict[str, int]) -> None:
    """Record one video's selection (a ``runtime.VideoSelection``) and the cache's size."""
    m = metrics()
    m.visual_tokens.observe(result.num_visual_tokens)
    m.selected_tokens.observe(result.n)
    m.kept_ratio.observe(result.n / result.num_visual_tokens)
    timings = result.timings_ms
    if result.cache_hit:
        m.cache_hits.inc()
    else:
        m.cache_misses.inc()
        if timings.get("decode_ms", 0.0) > 0:
            m.decode_seconds.observe(timings["decode_ms"] / 1e3)
        m.preprocess_seconds.observe(timings["preprocess_ms"] / 1e3)
        m.vit_seconds.observe(timings["vit_ms"] / 1e3)
        embeds = getattr(result, "embeds", None)
        if embeds is not None and embeds.dim() == 2:  # the features are M rows of the embeddings' D
            m.cache_entry_bytes.observe(result.num_visual_tokens * embeds.shape[1] * embeds.element_size())
    m.selector_seconds.observe(timings["selector_ms"] / 1e3)
    m.cache_bytes.set(cache_stats["bytes"])
    m.cache_entries.set(cache_stats["entries"])
    for gauge, key in [
        (m.cache_host_bytes, "host_bytes"),
        (m.cache_host_entries, "host_entries"),
        (m.cache_max_bytes, "max_bytes"),
        (m.cache_host_max_bytes, "host_max_bytes"),
    ]:
        if key in cache_stats:
            gauge.set(cache_stats[key])


def observe_rejection(status: int) -> None:
    metrics().rejected.labels(status=str(int(status))).inc()
