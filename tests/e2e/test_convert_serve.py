"""Stock vLLM serves the converted checkpoint (qtsplus_vllm.convert) with all M visual tokens.

A tiny QTSplus checkpoint is converted to plain Qwen2.5-VL and served by vLLM's own
``Qwen2_5_VLForConditionalGeneration`` (no plugin model, no selector), with our video loader
(``video_backend`` ``qtsplus_frames``) so both see the same frames. Its prompt must be the QTSplus
all-token baseline token for token: the oracle's prompt with the n selected placeholders replaced
by M, i.e. what the plugin serves with ``{"qtsplus_select": false}``.

EVS (``--video-pruning-rate``) does not work on vLLM 0.32's CPU backend: the processor shrinks the
placeholders (e.g. 420 → 140), but ``CPUModelRunner.load_model`` (vllm/v1/worker/cpu_model_runner.py)
overrides the GPU runner's and never sets ``is_multimodal_pruning_enabled``, so the runner never calls
``recompute_mrope_positions``, which strips the 4 M-RoPE position columns the model appends to pruned
video rows. The engine core then dies in ``_merge_multimodal_embeddings`` ("shape mismatch: value
tensor of shape [140, 132] cannot be broadcast to indexing result of shape [140, 128]", HTTP 500).
The EVS check therefore runs on CUDA only.
"""

from __future__ import annotations

import json

import pytest
import torch

from qtsplus_vllm.convert import convert_to_qwen2_5_vl
from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

QUESTION = "What is moving in the video?"
# (frames, (width, height), fps): upscaled to min_pixels; 12 s -> 12 frames; downscaled to max_pixels
VIDEOS = [(24, (96, 64), 4.0), (24, (96, 64), 2.0), (8, (640, 360), 4.0)]
EVS_RATE = 0.75


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert-serve")
    qtsplus = write_tiny_checkpoint(root / "qtsplus", seed=7)
    stock = convert_to_qwen2_5_vl(qtsplus, root / "stock")
    videos = [
        make_video(root / f"v{i}.mp4", frames=n, size=size, fps=fps, seed=i)
        for i, (n, size, fps) in enumerate(VIDEOS)
    ]
    return root, qtsplus, stock, videos


def stock_args(root, *extra: str) -> list[str]:
    return cpu_serve_args(max_model_len=4096) + [
        "--allowed-local-media-path", str(root),
        "--media-io-kwargs", json.dumps({"video": {"video_backend": "qtsplus_frames"}}),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def client(assets, vllm_cache_root):
    root, _, stock, _ = assets
    with RemoteServer(stock, stock_args(root), cache_root=vllm_cache_root) as server:
        yield server.get_client()


@pytest.fixture(scope="module")
def oracle(assets):
    return ReferencePipeline(assets[1])


def chat(client, video):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{video}"}},
            {"type": "text", "text": QUESTION},
        ]}],
        temperature=0, max_tokens=1, extra_body={"return_token_ids": True},
    )  # fmt: skip


def all_token_prompt(expected, pad: int, visual_tokens: int) -> list[int]:
    """The oracle's prompt with its n video placeholders replaced by ``visual_tokens`` placeholders."""
    at = expected.prompt_ids.index(pad)
    return expected.prompt_ids[:at] + [pad] * visual_tokens + expected.prompt_ids[at + expected.n :]


def test_stock_prompt_is_the_qtsplus_all_token_baseline(assets, client, oracle):
    pad = oracle.video_pad_id
    seen_m = set()
    for video in assets[3]:
        expected = oracle.answer(video, QUESTION, max_new_tokens=1)
        m = expected.num_visual_tokens
        response = chat(client, video)
        assert response.prompt_token_ids == all_token_prompt(expected, pad, m)
        assert response.usage.prompt_tokens == len(expected.prompt_ids) - expected.n + m
        assert expected.n < m
        seen_m.add(m)
    assert len(seen_m) == len(VIDEOS)  # three different geometries, three different M


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="EVS crashes vLLM 0.32's CPU engine (module docstring)"
)
def test_evs_prunes_video_tokens(assets, oracle, vllm_cache_root):
    root, _, stock, videos = assets
    video = videos[1]  # 6 temporal steps: pruning keeps more than the always-kept first step
    expected = oracle.answer(video, QUESTION, max_new_tokens=1)
    m = expected.num_visual_tokens
    per_step = m // 6
    kept = max(per_step, int(m * (1 - EVS_RATE)))  # vLLM's compute_retained_tokens_count
    args = stock_args(root, "--video-pruning-rate", str(EVS_RATE))
    with RemoteServer(stock, args, cache_root=vllm_cache_root) as server:
        response = chat(server.get_client(), video)
    assert response.prompt_token_ids == all_token_prompt(expected, oracle.video_pad_id, kept)
    assert per_step < kept < m
