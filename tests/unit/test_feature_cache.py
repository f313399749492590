"""The ViT-feature cache: LRU order, the byte bound, keys and reported size."""

from __future__ import annotations

import numpy as np
import torch

from qtsplus_vllm.feature_cache import CachedFeatures, FeatureCache, frames_digest


def entry(rows: int, value: float = 0.0) -> CachedFeatures:
    return CachedFeatures(torch.full((rows, 8), value), (2, 4, 4), 4)  # rows * 32 bytes


def test_lru_eviction_keeps_the_byte_bound():
    cache = FeatureCache(max_bytes=100 * 32)
    for key in "abc":
        assert cache.put(key, entry(40))
    # 3 × 40 rows exceed 100 rows: "a" (least recently used) went
    assert cache.get("a", torch.device("cpu")) is None
    assert cache.get("b", torch.device("cpu")) is not None  # b is now the most recent
    cache.put("d", entry(40))
    assert cache.get("c", torch.device("cpu")) is None and cache.get("b", torch.device("cpu")) is not None
    stats = cache.stats()
    assert stats["bytes"] == 80 * 32 <= stats["max_bytes"] and stats["entries"] == 2
    assert stats["evictions"] == 2 and stats["hits"] == 2 and stats["misses"] == 2


def test_entries_over_the_bound_are_not_stored_and_replacing_a_key_keeps_the_count():
    cache = FeatureCache(max_bytes=10 * 32)
    assert not cache.put("big", entry(11))
    assert cache.stats()["bytes"] == 0
    cache.put("k", entry(4, 1.0))
    cache.put("k", entry(6, 2.0))
    assert cache.stats() | {} == {**cache.stats(), "bytes": 6 * 32, "entries": 1}
    assert float(cache.get("k", torch.device("cpu")).visual[0, 0]) == 2.0
    cache.clear()
    assert len(cache) == 0 and cache.stats()["bytes"] == 0


def test_digest_depends_on_content_shape_and_settings():
    frames = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    base = frames_digest(frames, (1, 2))
    assert base == frames_digest(frames.copy(), (1, 2))
    changed = frames.copy()
    changed[1, 3, 3, 2] = 1
    assert frames_digest(changed, (1, 2)) != base
    assert frames_digest(frames, (1, 3)) != base
    assert frames_digest(frames.reshape(2, 2, 8, 3), (1, 2)) != base
