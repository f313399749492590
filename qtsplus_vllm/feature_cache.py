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

Bounded in bytes (``max_bytes``; entries over the bound are not stored), least recently used out
first, thread-safe, and it reports its size: :meth:`stats`. Entries live on the runtime's device,
or in (pinned, with CUDA) host memory when ``device="cpu"``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import blake3
import numpy as np
import torch


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


class FeatureCache:
    def __init__(self, max_bytes: int, device: torch.device | str | None = None):
        self.max_bytes = int(max_bytes)
        self.device = torch.device(device) if device is not None else None
        self._entries: OrderedDict[str, CachedFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str, device: torch.device) -> CachedFeatures | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        if entry.visual.device != device:
            entry = CachedFeatures(
                entry.visual.to(device, non_blocking=True), entry.grid_thw, entry.num_frames
            )
        return entry

    def put(self, key: str, entry: CachedFeatures) -> bool:
        """Store ``entry`` (evicting the least recently used); False when it alone exceeds the bound."""
        if entry.nbytes > self.max_bytes:
            return False
        if self.device is not None and entry.visual.device != self.device:
            visual = entry.visual.to(self.device)
            if self.device.type == "cpu" and torch.cuda.is_available():
                visual = visual.pin_memory()
            entry = CachedFeatures(visual, entry.grid_thw, entry.num_frames)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            while self._entries and self.bytes + entry.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes += entry.nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
