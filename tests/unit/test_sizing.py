"""The GPU sizing arithmetic (issue 22, item 4): known constants, the rule, and the docs' table."""

from __future__ import annotations

from pathlib import Path

from qtsplus_vllm.sizing import (
    GIB,
    MODELS,
    kept_tokens,
    kv_budget_bytes,
    requests_at_once,
    sizing_facts,
    sizing_table,
    video_tokens,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deploying.md"


def test_kv_bytes_and_parameters_of_the_released_models():
    assert MODELS["7B"].kv_bytes_per_token() == 57_344  # 2 × 28 layers × 4 KV heads × 128 × 2 B
    assert MODELS["3B"].kv_bytes_per_token() == 36_864  # 2 × 36 × 2 × 128 × 2 B
    assert 7.5e9 < MODELS["7B"].parameters() < 7.7e9  # Qwen2.5-VL-7B's LM, untied head
    assert 3.0e9 < MODELS["3B"].parameters() < 3.2e9  # 3B's, tied


def test_video_tokens_follow_the_resizing_rule():
    assert video_tokens(600) == 54_000  # DESIGN §10: 10-minute 720p at the defaults
    assert video_tokens(60) == 5_400
    assert video_tokens(3600) == 384 * 180  # 768 frames at most


def test_requests_at_once():
    model = MODELS["7B"]
    assert kept_tokens(54_000, model) == 2560 and kept_tokens(1000, model) == 500
    budget = kv_budget_bytes(model, 80e9 / GIB)
    tokens = 54_000 + 64 + 128
    assert requests_at_once(model, 80e9 / GIB, 600, selection=False) == budget // (tokens * 57_344)
    assert requests_at_once(model, 80e9 / GIB, 600, True) > 10 * requests_at_once(
        model, 80e9 / GIB, 600, False
    )


def test_the_docs_table_is_the_computed_one():
    text = DOCS.read_text()
    assert sizing_table() in text and sizing_facts() in text
