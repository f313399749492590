"""The ViT-feature cache: LRU order, the byte bound, keys and reported size."""

from __future__ import annotations

import numpy as np
import pytest
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


# -- sizing and the host tier (issue 12 item 7) --------------------------------------------------

CPU = torch.device("cpu")


def tiered(first_rows: int, host_rows: int) -> FeatureCache:
    """A two-tier cache (both tiers in host memory here: the logic is the same as behind a GPU)."""
    return FeatureCache(max_bytes=first_rows * 32, device=CPU, host_max_bytes=host_rows * 32)


def test_evicted_entries_are_demoted_to_the_host_tier_not_dropped():
    cache = tiered(100, 100)
    for key in "abc":
        assert cache.put(key, entry(40, float(ord(key))))
    stats = cache.stats()
    # a went down to the host tier; b and c are in the first tier
    assert (stats["entries"], stats["bytes"], stats["host_entries"], stats["host_bytes"]) == (
        2,
        80 * 32,
        1,
        40 * 32,
    )
    assert stats["demotions"] == 1 and stats["evictions"] == 0 and len(cache) == 3
    hit = cache.get("a", CPU)
    assert hit is not None and float(hit.visual[0, 0]) == ord("a")


def test_a_host_tier_hit_is_promoted_and_demotes_the_least_recent():
    cache = tiered(100, 100)
    for key in "abc":
        cache.put(key, entry(40, float(ord(key))))
    cache.get("a", CPU)  # promoted: b (least recent in the first tier) goes down
    stats = cache.stats()
    assert stats["promotions"] == 1 and stats["host_hits"] == 1 and stats["hits"] == 1
    assert stats["demotions"] == 2 and stats["entries"] == 2 and stats["host_entries"] == 1
    assert stats["bytes"] <= stats["max_bytes"] and stats["host_bytes"] <= stats["host_max_bytes"]
    # a and c in the first tier, b in the host tier: a first-tier hit does not move anything
    cache.get("c", CPU)
    assert cache.stats()["promotions"] == 1 and cache.stats()["host_hits"] == 1
    assert float(cache.get("b", CPU).visual[0, 0]) == ord("b")  # served from the host tier, promoted
    assert cache.stats()["promotions"] == 2


def test_each_tier_keeps_its_byte_bound_and_the_host_tier_drops_its_least_recent():
    cache = tiered(100, 90)
    for key in "abcdef":  # 6 × 40 rows: 2 fit the first tier, 2 the host tier
        cache.put(key, entry(40))
        stats = cache.stats()
        assert stats["bytes"] <= stats["max_bytes"] and stats["host_bytes"] <= stats["host_max_bytes"]
    stats = cache.stats()
    assert stats["entries"] == 2 and stats["host_entries"] == 2
    assert stats["demotions"] == 4 and stats["evictions"] == 2  # a and b left the cache
    assert cache.get("a", CPU) is None and cache.get("b", CPU) is None
    assert all(cache.get(key, CPU) is not None for key in "cdef")


def test_an_entry_over_the_first_tier_goes_to_the_host_tier_and_over_both_is_refused():
    cache = tiered(30, 100)
    assert cache.put("big", entry(50))  # over the first tier (30 rows), within the host tier
    stats = cache.stats()
    assert stats["entries"] == 0 and stats["host_entries"] == 1 and stats["last_entry_bytes"] == 50 * 32
    assert cache.get("big", CPU) is not None
    assert cache.stats()["promotions"] == 0 and cache.stats()["host_entries"] == 1  # too big to promote
    assert not cache.put("huge", entry(101))
    assert cache.stats()["host_entries"] == 1
    cache.put("big", entry(10))  # replacing a key moves it to where it fits now, once
    stats = cache.stats()
    assert (stats["entries"], stats["host_entries"], stats["bytes"], stats["host_bytes"]) == (1, 0, 320, 0)


def test_stats_report_each_stored_entrys_size():
    cache = FeatureCache(max_bytes=100 * 32, device=CPU)
    assert cache.stats()["last_entry_bytes"] == 0
    cache.put("a", entry(40))
    assert cache.stats()["last_entry_bytes"] == 40 * 32 == cache.stats()["largest_entry_bytes"]
    cache.put("b", CachedFeatures(torch.zeros((10, 8), dtype=torch.bfloat16), (1, 2, 5), 2))
    stats = cache.stats()
    assert stats["last_entry_bytes"] == 10 * 8 * 2 and stats["largest_entry_bytes"] == 40 * 32
    # the keys vLLM's metrics read are still there, with the first tier's meaning
    assert {"entries", "bytes", "max_bytes", "hits", "misses", "evictions"} <= stats.keys()
    assert cache.stats()["host_max_bytes"] == 0  # no second tier unless asked for


def test_without_a_host_tier_evictions_drop_entries():
    cache = FeatureCache(max_bytes=100 * 32, device=CPU)
    for key in "abc":
        cache.put(key, entry(40))
    assert cache.stats()["evictions"] == 1 and cache.stats()["demotions"] == 0 and len(cache) == 2


def test_a_cache_turned_off_has_no_host_tier():
    cache = FeatureCache(max_bytes=0, device=CPU, host_max_bytes=1 << 20)
    assert cache.stats()["host_max_bytes"] == 0 and not cache.put("a", entry(1))


def test_automatic_sizing_rule(monkeypatch):
    import qtsplus_vllm.feature_cache as fc

    GiB = 1 << 30
    free = {"cpu": 12 * GiB, "cuda": 40 * GiB}
    monkeypatch.setattr(fc, "free_memory", lambda device: free[device.type])
    cuda = torch.device("cuda:0")
    # a quarter of what is free, capped: 8 GiB on the GPU (a quarter of 40 is 10), 3 GiB of host RAM
    assert fc.tier_sizes(cuda, None, None) == (8 * GiB, 3 * GiB)
    free["cuda"] = 6 * GiB  # a GPU shared with vLLM's engine: little left
    assert fc.tier_sizes(cuda, None, None) == (int(1.5 * GiB), 3 * GiB)
    free["cpu"] = 200 * GiB
    assert fc.tier_sizes(cuda, None, None)[1] == 16 * GiB
    # explicit sizes win; 0 turns the cache (both tiers) off
    assert fc.tier_sizes(cuda, 2 * GiB, 5 * GiB) == (2 * GiB, 5 * GiB)
    assert fc.tier_sizes(cuda, None, 0) == (int(1.5 * GiB), 0)
    assert fc.tier_sizes(cuda, 0, None) == (0, 0)
    # a CPU runtime: one tier in host RAM (a second would be the same memory)
    free["cpu"] = 12 * GiB
    assert fc.tier_sizes(CPU, None, None) == (3 * GiB, 0)
    assert fc.tier_sizes(CPU, None, 4 * GiB) == (3 * GiB, 0)
    free["cpu"] = 100 * GiB
    assert fc.tier_sizes(CPU, None, None) == (8 * GiB, 0)
    cache = fc.FeatureCache.sized(cuda, None, None)
    assert (cache.max_bytes, cache.host_max_bytes) == (int(1.5 * GiB), 16 * GiB)


def test_free_memory_reads_the_host_on_cpu():
    import psutil

    from qtsplus_vllm.feature_cache import free_memory

    assert abs(free_memory(CPU) - psutil.virtual_memory().available) < 1 << 30


def test_settings_from_the_environment(monkeypatch):
    from qtsplus_vllm.runtime import check_server_settings, feature_cache_settings

    for name in (
        "QTSPLUS_FEATURE_CACHE_BYTES",
        "QTSPLUS_FEATURE_CACHE_HOST_BYTES",
        "QTSPLUS_FEATURE_CACHE_DEVICE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert feature_cache_settings() == (None, None, None)  # sized from the machine
    monkeypatch.setenv("QTSPLUS_FEATURE_CACHE_BYTES", "0")
    monkeypatch.setenv("QTSPLUS_FEATURE_CACHE_HOST_BYTES", "4096")
    monkeypatch.setenv("QTSPLUS_FEATURE_CACHE_DEVICE", "cpu")
    assert feature_cache_settings() == (0, CPU, 4096)
    check_server_settings()
    for name, value in [
        ("QTSPLUS_FEATURE_CACHE_HOST_BYTES", "4GiB"),
        ("QTSPLUS_FEATURE_CACHE_BYTES", "-1"),
        ("QTSPLUS_FEATURE_CACHE_DEVICE", "gpu"),
        ("QTSPLUS_FEATURE_CACHE_DEVICE", "meta"),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            with pytest.raises(ValueError, match=name):
                check_server_settings()


def test_metrics_show_both_tiers_and_each_entrys_size():
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from qtsplus_vllm.serving.metrics import observe_selection

    def value(name: str, suffix: str = "") -> float:
        return REGISTRY.get_sample_value(name + suffix) or 0.0

    cache = tiered(100, 100)
    for key in "abc":
        cache.put(key, entry(40))
    before = (
        value("qtsplus_feature_cache_entry_bytes", "_sum"),
        value("qtsplus_feature_cache_entry_bytes", "_count"),
    )
    result = SimpleNamespace(
        num_visual_tokens=40,
        n=4,
        embeds=torch.zeros((4, 8), dtype=torch.float32),
        cache_hit=False,
        timings_ms={"preprocess_ms": 1.0, "vit_ms": 1.0, "selector_ms": 1.0},
    )
    observe_selection(result, cache.stats())
    assert value("qtsplus_feature_cache_entry_bytes", "_sum") == before[0] + 40 * 32
    assert value("qtsplus_feature_cache_entry_bytes", "_count") == before[1] + 1
    assert value("qtsplus_feature_cache_bytes") == 80 * 32 and value("qtsplus_feature_cache_entries") == 2
    assert (
        value("qtsplus_feature_cache_host_bytes") == 40 * 32
        and value("qtsplus_feature_cache_host_entries") == 1
    )
    assert value("qtsplus_feature_cache_max_bytes") == 100 * 32
    assert value("qtsplus_feature_cache_host_max_bytes") == 100 * 32
    observe_selection(result, {"bytes": 0, "entries": 0})  # a stats() without tiers still works


def test_each_stored_entry_is_logged_with_its_size(caplog):
    import logging

    cache = tiered(100, 100)
    with caplog.at_level(logging.INFO, logger="vllm.qtsplus"):
        cache.put("a", entry(40))
    assert any(
        "stored [40, 8] (1,280 bytes, M=40) in the first tier; first tier 0.00/0.00 GiB, host tier"
        in r.getMessage()
        for r in caplog.records
    ), caplog.text


@pytest.mark.parametrize(
    "size, minutes, frames, m",
    [((1280, 720), 10, 600, 54_000), ((1920, 1080), 10, 600, 54_000), ((1280, 720), 30, 768, 69_120),
     ((1920, 1080), 60, 768, 69_120)],
)  # fmt: skip
def test_the_readme_sizing_table(size, minutes, frames, m):
    """M and bytes per video at the reference settings (fps 1, <= 768 frames, max_pixels 360*420)."""
    from qwen_vl_utils import vision_process as qwen_vl

    from qtsplus_vllm.video import PreprocessConfig, target_size

    width, height = size
    t = qwen_vl.smart_nframes({"fps": 1.0, "max_frames": 768}, total_frames=minutes * 60 * 30, video_fps=30)
    h, w = target_size(height, width, t, PreprocessConfig())
    assert (t, (h, w)) == (frames, (280, 504))
    assert (t // 2) * (h // 28) * (w // 28) == m
    sizes = {model: round(m * d * 2 / 1e6) for model, d in (("3B", 2048), ("7B", 3584))}
    assert sizes == ({"3B": 221, "7B": 387} if m == 54_000 else {"3B": 283, "7B": 495})
    assert (8 << 30) // (m * 3584 * 2) == (22 if m == 54_000 else 17)
