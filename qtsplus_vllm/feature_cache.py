"""A bounded LRU cache of ViT features, so a follow-up question on a video skips decode-side work.

The ViT output of a video does not depend on the question. :class:`FeatureCache` keeps it keyed by
the video's content and every preprocessing setting, so a second question about the same video runs
only the selector, and gets exactly the rows a cold run would (the cached tensor *is* the cold run's
ViT output). Two kinds of keys:

- a video our loader planned (encoded bytes + sampling plan, ``streaming.LazyVideo``):
  :func:`encoded_digest`, BLAKE3 of the *encoded* bytes, the plan (sampled frame indices, frame
  count, fps, source and decode sizes) and the settings — computed before any decoding, so a
  follow-up question decodes nothing (BLAKE3 over a 100 MB file takes tens of milliseconds;
  decoding it takes seconds);
- decoded frames (``data:video/jpeg`` frame lists, images, arrays from offline use):
  :func:`frames_digest`, BLAKE3 of the frames, their shape and dtype and the settings.

Two tiers, each bounded in bytes and least recently used out first, thread-safe:

- the first tier (``max_bytes``) on the cache's device: the runtime's (a GPU), or host memory
  (pinned, with CUDA) when ``device="cpu"``;
- a second tier in host memory (``host_max_bytes``; pinned with CUDA) behind a GPU first tier: an
  entry evicted from the first tier is *demoted* there rather than dropped, and a hit there
  *promotes* it back (demoting others if need be). An entry over the first tier's bound goes
  straight to the second; one over both bounds is not stored. Entries leave the cache only from
  the second tier (or the first when there is no second).

One video's features are M × D in the model dtype (7B: D = 3584, bf16: about 0.39 GB for a
10-minute 720p video at the reference settings, 0.5 GB at the 768-frame cap); :func:`tier_sizes`
sizes both tiers from the machine when they are not set (docs/long-videos.md, "Follow-up questions"), and
:meth:`stats` reports both tiers and the size of every entry stored.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import blake3
import numpy as np
import torch

logger = logging.getLogger("vllm.qtsplus")

GiB = 1 << 30
# Automatic sizing (a tier whose variable is unset): this fraction of the memory free when the
# runtime loads, up to a cap.
AUTO_FRACTION = 0.25
AUTO_DEVICE_CAP = 8 * GiB  # the first tier, on a GPU or (CPU runtime) in host memory
AUTO_HOST_CAP = 16 * GiB  # the host tier behind a GPU first tier


def frames_digest(frames: np.ndarray, settings: tuple) -> str:
    """A key for ``frames`` (uint8 [T, H, W, 3]) preprocessed with ``settings``."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update(repr((frames.shape, str(frames.dtype), settings)).encode())
    hasher.update(memoryview(np.ascontiguousarray(frames)).cast("B"))
    return hasher.hexdigest()


def encoded_digest(data: np.ndarray, settings: tuple) -> str:
    """A key for an encoded video (1-D uint8 bytes) decoded and preprocessed as ``settings`` say
    (the sampling plan and the preprocessing settings)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update(repr(("encoded", int(data.nbytes), settings)).encode())
    hasher.update(memoryview(np.ascontiguousarray(data)).cast("B"))
    return hasher.hexdigest()


@dataclass
class CachedFeatures:
    visual: torch.Tensor  # [M, D] ViT output
    grid_thw: tuple[int, int, int]
    num_frames: int

    @property
    def nbytes(self) -> int:
        return self.visual.numel() * self.visual.element_size()


def free_memory(device: torch.device) -> int:
    """Bytes free for a cache on ``device``: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def auto_bytes(free: int, cap: int) -> int:
    """The automatic size of a tier: :data:`AUTO_FRACTION` of ``free`` bytes, at most ``cap``."""
    return max(0, min(int(free * AUTO_FRACTION), cap))


def tier_sizes(device: torch.device, max_bytes: int | None, host_max_bytes: int | None) -> tuple[int, int]:
    """(first tier, host tier) bytes for a cache on ``device``; None: size it from the machine.

    First tier: ``max_bytes``, else a quarter of ``device``'s free memory (CUDA) or of the host's
    available RAM (CPU), at most 8 GiB. Host tier, only behind a GPU first tier (on the CPU both
    would be the same memory) and only when the cache is on: ``host_max_bytes``, else a quarter of
    the host's available RAM, at most 16 GiB. Measured when the runtime loads (after the ViT and
    selector weights), per process: every API server sizes its own cache.
    """
    first = auto_bytes(free_memory(device), AUTO_DEVICE_CAP) if max_bytes is None else int(max_bytes)
    if device.type == "cpu" or first == 0:
        return first, 0
    host = (
        auto_bytes(free_memory(torch.device("cpu")), AUTO_HOST_CAP)
        if host_max_bytes is None
        else host_max_bytes
    )
    return first, int(host)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in host memory, pinned when CUDA is there (fast copies back to the GPU)."""
    if not torch.cuda.is_available():
        return tensor.to("cpu")
    if tensor.device.type == "cpu" and tensor.is_pinned():
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    host.copy_(tensor)
    return host


class FeatureCache:
    """Two-tier LRU cache of :class:`CachedFeatures` (module docstring)."""

    def __init__(self, max_bytes: int, device: torch.device | str | None = None, *, host_max_bytes: int = 0):
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device) if device is not None else None
        self.host_max_bytes = int(host_max_bytes) if self.max_bytes > 0 else 0
        self._entries: OrderedDict[str, CachedFeatures] = OrderedDict()  # first tier
        self._host: OrderedDict[str, CachedFeatures] = OrderedDict()  # second tier
        self._lock = threading.Lock()
        self.bytes = 0
        self.host_bytes = 0
        self.hits = 0
        self.host_hits = 0
        self.misses = 0
        self.evictions = 0  # entries that left the cache
        self.demotions = 0
        self.promotions = 0
        self.last_entry_bytes = 0
        self.largest_entry_bytes = 0

    @classmethod
    def sized(
        cls, device: torch.device, max_bytes: int | None = None, host_max_bytes: int | None = None
    ) -> FeatureCache:
        """A cache on ``device`` with tiers from :func:`tier_sizes` (None: from the machine); logs them."""
        device = torch.device(device)
        first, host = tier_sizes(device, max_bytes, host_max_bytes)
        if first == 0:
            logger.info("QTSplus ViT-feature cache: off (QTSPLUS_FEATURE_CACHE_BYTES=0)")
        else:
            how = "QTSPLUS_FEATURE_CACHE_BYTES" if max_bytes is not None else "automatic"
            line = f"QTSplus ViT-feature cache: {first / GiB:.2f} GiB on {device} ({how})"
            if host:
                how = "QTSPLUS_FEATURE_CACHE_HOST_BYTES" if host_max_bytes is not None else "automatic"
                line += f", then {host / GiB:.2f} GiB of host memory ({how})"
            logger.info(line)
        return cls(first, device, host_max_bytes=host)

    # -- the two tiers (call with the lock held) -----------------------------------------------

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        old = self._host.pop(key, None)
        if old is not None:
            self.host_bytes -= old.nbytes

    def _store_host(self, key: str, entry: CachedFeatures) -> bool:
        if entry.nbytes > self.host_max_bytes:
            return False
        while self._host and self.host_bytes + entry.nbytes > self.host_max_bytes:
            _, evicted = self._host.popitem(last=False)
            self.host_bytes -= evicted.nbytes
            self.evictions += 1
        if entry.visual.device.type != "cpu" or torch.cuda.is_available():
            entry = CachedFeatures(_to_host(entry.visual), entry.grid_thw, entry.num_frames)
        self._host[key] = entry
        self.host_bytes += entry.nbytes
        return True

    def _store_first(self, key: str, entry: CachedFeatures) -> None:
        """``entry`` (on the cache's device, within ``max_bytes``) into the first tier; the least
        recently used entries make room, demoted to the host tier or dropped."""
        while self._entries and self.bytes + entry.nbytes > self.max_bytes:
            victim_key, victim = self._entries.popitem(last=False)
            self.bytes -= victim.nbytes
            if self._store_host(victim_key, victim):
                self.demotions += 1
            else:
                self.evictions += 1
        self._entries[key] = entry
        self.bytes += entry.nbytes

    def _on_device(self, entry: CachedFeatures) -> CachedFeatures:
        if self.device is None or entry.visual.device == self.device:
            return entry
        visual = entry.visual.to(self.device, non_blocking=entry.visual.is_pinned())
        if self.device.type == "cpu" and torch.cuda.is_available():
            visual = visual.pin_memory()
        return CachedFeatures(visual, entry.grid_thw, entry.num_frames)

    # -- the interface -------------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        """Whether either tier holds ``key`` (no statistics, no reordering)."""
        with self._lock:
            return key in self._entries or key in self._host

    def get(self, key: str, device: torch.device) -> CachedFeatures | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                entry = self._host.get(key)
                if entry is None:
                    self.misses += 1
                    return None
                self.hits += 1
                self.host_hits += 1
                if entry.nbytes <= self.max_bytes:  # promote: back to the first tier
                    self._host.pop(key)
                    self.host_bytes -= entry.nbytes
                    entry = self._on_device(entry)
                    self._store_first(key, entry)
                    self.promotions += 1
                else:
                    self._host.move_to_end(key)
        if entry.visual.device != device:
            entry = CachedFeatures(
                entry.visual.to(device, non_blocking=entry.visual.is_pinned()),
                entry.grid_thw,
                entry.num_frames,
            )
        return entry

    def put(self, key: str, entry: CachedFeatures) -> bool:
        """Store ``entry``: in the first tier (demoting its least recently used entries), or in the
        host tier when it is over the first tier's bound; False when it is over both."""
        size = entry.nbytes
        if size > self.max_bytes and size > self.host_max_bytes:
            return False
        first = size <= self.max_bytes
        if first:
            entry = self._on_device(entry)
        with self._lock:
            self.last_entry_bytes = size
            self.largest_entry_bytes = max(self.largest_entry_bytes, size)
            self._drop(key)
            if first:
                self._store_first(key, entry)
            else:
                self._store_host(key, entry)
            tiers = f"first tier {self.bytes / GiB:.2f}/{self.max_bytes / GiB:.2f} GiB"
            if self.host_max_bytes:
                tiers += f", host tier {self.host_bytes / GiB:.2f}/{self.host_max_bytes / GiB:.2f} GiB"
        logger.info(
            "QTSplus ViT-feature cache: stored %s (%s bytes, M=%d) in the %s tier; %s",
            list(entry.visual.shape),
            f"{size:,}",
            entry.visual.shape[0],
            "first" if first else "host",
            tiers,
        )
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._host.clear()
            self.bytes = self.host_bytes = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._host)

    def stats(self) -> dict[str, int]:
        """``entries`` / ``bytes`` / ``max_bytes``: the first tier; ``host_*``: the host tier; ``hits``
        (either tier, ``host_hits`` of them in the host tier), ``misses``, ``evictions`` (entries that
        left the cache), ``demotions``, ``promotions``; ``last_entry_bytes``: the size of the entry
        stored last, ``largest_entry_bytes``: of the largest so far."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "host_entries": len(self._host),
                "host_bytes": self.host_bytes,
                "host_max_bytes": self.host_max_bytes,
                "host_hits": self.host_hits,
                "demotions": self.demotions,
                "promotions": self.promotions,
                "last_entry_bytes": self.last_entry_bytes,
                "largest_entry_bytes": self.largest_entry_bytes,
            }
