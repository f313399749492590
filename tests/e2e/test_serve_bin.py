"""`vllm serve` a checkpoint whose weights are ``torch.save`` pickles (``pytorch_model-*.bin`` + index).

The reference trainer saves ``pytorch_model.bin`` files. vLLM loads the LM from them; the plugin's
ViT and selector must load from them too (qtsplus_vllm.checkpoint, weights-only, memory-mapped).
One server, one video, two questions: the answers must equal, token for token, the oracle's on the
same weights written as safetensors, so the .bin path is checked against a reader it does not use.
"""

from __future__ import annotations

import pytest

from qtsplus_vllm.checkpoint import BIN_INDEX_FILE
from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

SEED = 31
QUESTIONS = ["What is moving in the video?", "Which colour is the background?"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-bin")
    model = write_tiny_checkpoint(root / "model", seed=SEED, sharded=True, weight_format="bin")
    twin = write_tiny_checkpoint(root / "twin", seed=SEED, sharded=True)  # same weights, safetensors
    video = make_video(root / "clip.mp4", frames=24, size=(96, 64), fps=4.0, seed=5)
    return root, model, twin, video


@pytest.fixture(scope="module")
def client(assets, vllm_cache_root):
    root, model, _, _ = assets
    args = cpu_serve_args(max_model_len=4096) + ["--allowed-local-media-path", str(root)]
    with RemoteServer(model, args, cache_root=vllm_cache_root) as server:
        yield server.get_client()


def test_bin_checkpoint_serves_the_oracle_answers(assets, client):
    _, model, twin, video = assets
    assert (model / BIN_INDEX_FILE).is_file() and not list(model.glob("*.safetensors"))
    oracle = ReferencePipeline(twin)
    name = client.models.list().data[0].id
    for question in QUESTIONS:
        expected = oracle.answer(video, question, max_new_tokens=MAX_TOKENS)
        assert expected.n < expected.num_visual_tokens  # the selector chose a subset
        served = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                {"type": "text", "text": question},
            ]}],
            temperature=0, max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True},
        )  # fmt: skip
        assert served.prompt_token_ids == expected.prompt_ids, question
        assert served.choices[0].token_ids == expected.token_ids, question
