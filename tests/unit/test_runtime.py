"""The selection runtime the vLLM processor calls (torch only)."""

from __future__ import annotations

import pytest
import torch

from qtsplus_vllm.options import SelectionOptions
from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.runtime import default_device, get_runtime
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.videos import render_frames

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("runtime") / "m", seed=4)


@pytest.fixture(scope="module")
def runtime(model):
    return get_runtime(model, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def frames():
    return render_frames(8, (96, 64), seed=2)


def test_rows_equal_the_oracle_selection(model, runtime, frames):
    oracle = ReferencePipeline(model)
    q_ids = oracle.question_ids(QUESTION)
    result = runtime.select(frames, q_ids, SelectionOptions())
    expected = oracle.answer(frames, QUESTION, max_new_tokens=1).selection
    assert result.n == expected.n and result.rho == pytest.approx(expected.rho)
    assert torch.equal(result.indices, expected.indices.cpu())
    torch.testing.assert_close(result.embeds, expected.embeds.cpu(), rtol=1e-5, atol=1e-6)
    assert result.embeds.device.type == "cpu" and result.embeds.dtype == torch.float32
    assert result.num_visual_tokens == 4 * 10 * 14 and result.num_frames == 8
    assert set(result.timings_ms) == {
        "hash_ms",
        "decode_ms",
        "decode_wait_ms",
        "preprocess_ms",
        "vit_ms",
        "selector_ms",
    }
    assert result.scores.shape == (result.num_visual_tokens,) and result.scores.dtype == torch.float32


def test_follow_up_question_reuses_the_vit_features_and_equals_a_cold_run(model, frames):
    from qtsplus_vllm.runtime import SelectionRuntime

    warm = SelectionRuntime(model, torch.float32, "cpu")
    options = SelectionOptions()
    first = warm.select(frames, [5, 6, 7], options)
    follow_up = warm.select(frames, [9, 10, 11, 12], options)
    assert not first.cache_hit and follow_up.cache_hit
    assert follow_up.timings_ms["vit_ms"] == 0.0
    cold = SelectionRuntime(model, torch.float32, "cpu").select(frames, [9, 10, 11, 12], options)
    assert not cold.cache_hit
    assert torch.equal(follow_up.indices, cold.indices) and torch.equal(follow_up.embeds, cold.embeds)
    # other preprocessing settings or other frames are other entries
    assert not warm.select(
        frames, [5], SelectionOptions(max_pixels=64 * 28 * 28, min_pixels=64 * 28 * 28)
    ).cache_hit
    assert not warm.select(frames[::-1].copy(), [5], options).cache_hit
    stats = warm.feature_cache.stats()
    assert stats["entries"] == 3 and stats["hits"] == 1 and stats["misses"] == 3
    assert 0 < stats["bytes"] <= stats["max_bytes"]


def test_feature_cache_can_be_turned_off(model, frames, monkeypatch):
    from qtsplus_vllm.runtime import SelectionRuntime

    monkeypatch.setenv("QTSPLUS_FEATURE_CACHE_BYTES", "0")
    runtime = SelectionRuntime(model, torch.float32, "cpu")
    runtime.select(frames, [5], SelectionOptions())
    assert not runtime.select(frames, [5], SelectionOptions()).cache_hit
    assert runtime.feature_cache.stats()["entries"] == 0


def test_selection_off_keeps_every_vit_token(model, runtime, frames):
    oracle = ReferencePipeline(model)
    result = runtime.select(frames, oracle.question_ids(QUESTION), SelectionOptions(select=False))
    assert result.n == result.num_visual_tokens and result.rho is None
    assert torch.equal(result.indices, torch.arange(result.n))


def assert_top_n_by_relevance(indices: torch.Tensor, scores: torch.Tensor, n: int) -> None:
    """``indices`` are the n most relevant tokens, ascending. Ties at the cut may be broken either way:
    every kept score is >= every dropped one, and every token strictly above the cut is kept."""
    kept = indices.tolist()
    assert len(kept) == n and kept == sorted(set(kept)), kept
    values = scores.tolist()
    ranked = sorted(range(len(values)), key=lambda m: (-values[m], m))
    cut = values[ranked[n - 1]]
    dropped = sorted(set(range(len(values))) - set(kept))
    assert min(values[m] for m in kept) >= max((values[m] for m in dropped), default=-1.0), (kept, cut)
    assert {m for m in range(len(values)) if values[m] > cut} <= set(kept)
    if n == len(values) or values[ranked[n]] < cut:  # no tie at the cut: exactly one answer
        assert kept == sorted(ranked[:n])


def test_budget_controls(runtime, frames):
    q = [5, 6, 7]
    base = runtime.select(frames, q, SelectionOptions())
    capped = runtime.select(frames, q, SelectionOptions(max_tokens=7))
    assert base.n > 7 and capped.n == 7  # the cap binds
    # the cap keeps the 7 most relevant tokens of the same relevance, not any 7 of the uncapped ones
    torch.testing.assert_close(capped.scores, base.scores, rtol=0, atol=0)
    assert_top_n_by_relevance(capped.indices, capped.scores, 7)
    assert_top_n_by_relevance(base.indices, base.scores, base.n)
    doubled = runtime.select(frames, q, SelectionOptions(rho_scale=2.0))
    assert doubled.rho == pytest.approx(min(2 * base.rho, 1.0), rel=1e-6)
    floor = runtime.select(frames, q, SelectionOptions(rho_min=0.9))
    assert floor.rho == pytest.approx(0.9)
    assert floor.n == min(-(-9 * floor.num_visual_tokens // 10), runtime.config.qts_plus_nmax)  # nmax binds
    smaller = runtime.select(frames, q, SelectionOptions(max_pixels=28 * 28 * 4, min_pixels=28 * 28))
    assert smaller.num_visual_tokens < base.num_visual_tokens


def test_runtime_is_process_global(model, runtime):
    assert get_runtime(model, torch.float32, torch.device("cpu")) is runtime
    assert get_runtime(model, torch.bfloat16, torch.device("cpu")) is not runtime


def test_bad_question_ids_are_rejected(runtime, frames):
    with pytest.raises(ValueError, match="vocabulary"):
        runtime.select(frames, [10**7], SelectionOptions())


def test_device_from_environment(monkeypatch):
    monkeypatch.setenv("QTSPLUS_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("QTSPLUS_DEVICE", "cuda:1")
        with pytest.raises(RuntimeError, match="QTSPLUS_DEVICE"):
            default_device()


def test_cpu_threads_setting(monkeypatch, runtime, frames):
    import os

    from qtsplus_vllm.runtime import cpu_threads, torch_threads

    monkeypatch.delenv("QTSPLUS_CPU_THREADS", raising=False)
    assert cpu_threads() == len(os.sched_getaffinity(0))  # the cores it may use, not the machine's
    monkeypatch.setenv("QTSPLUS_CPU_THREADS", "1")
    assert cpu_threads() == 1
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    runtime.select(frames, [5, 6], SelectionOptions())
    assert torch.get_num_threads() == before  # restored after a selection
    monkeypatch.setenv("QTSPLUS_CPU_THREADS", "zero")
    with pytest.raises(ValueError, match="QTSPLUS_CPU_THREADS"):
        cpu_threads()
