"""Server-wide settings and other checkpoint layouts: a sharded, tied checkpoint served with
``--mm-processor-kwargs`` / ``--media-io-kwargs`` defaults; an invalid default stops start-up."""

from __future__ import annotations

import json

import pytest

from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, ServerStartupError, cpu_serve_args
from qtsplus_vllm.video import SamplingConfig

QUESTION = "Where does the square go?"
PREFILL_CHUNK = 256


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    model = write_tiny_checkpoint(root / "model", seed=21, sharded=True, tied=True)
    video = make_video(root / "clip.mp4", frames=48, size=(80, 64), fps=8.0, seed=3)
    return root, model, video


@pytest.fixture(scope="module")
def client(assets, vllm_cache_root):
    root, model, _ = assets
    args = cpu_serve_args(max_model_len=4096) + [
        "--max-num-batched-tokens", str(PREFILL_CHUNK),  # prompts above it prefill in chunks
        "--allowed-local-media-path", str(root),
        "--trust-request-mm-kwargs",
        "--mm-processor-kwargs", json.dumps({"qtsplus_max_tokens": 9}),
        "--media-io-kwargs", json.dumps({"video": {"fps": 2}}),
    ]  # fmt: skip
    with RemoteServer(model, args, cache_root=vllm_cache_root) as server:
        yield server.get_client()


def ask(client, video, extra=None):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": f"file://{video}"}},
            {"type": "text", "text": QUESTION},
        ]}],
        temperature=0, max_tokens=6, extra_body={"return_token_ids": True, **(extra or {})},
    )  # fmt: skip


def test_server_defaults_apply_and_requests_override_them(assets, client):
    _, model, video = assets
    oracle = ReferencePipeline(model)
    at_2fps = oracle.answer(video, QUESTION, max_new_tokens=6, sampling=SamplingConfig(fps=2.0))
    served = ask(client, video)
    pad = oracle.video_pad_id
    assert served.prompt_token_ids.count(pad) == min(9, at_2fps.n)  # the server's cap
    # a request overrides the server default: no cap -> exactly the oracle, token for token
    uncapped = ask(client, video, {"mm_processor_kwargs": {"qtsplus_max_tokens": 100000}})
    assert uncapped.prompt_token_ids == at_2fps.prompt_ids
    assert uncapped.choices[0].token_ids == at_2fps.token_ids
    # and the request's fps replaces the server's
    at_1fps = oracle.answer(video, QUESTION, max_new_tokens=1)
    off = ask(
        client,
        video,
        {"mm_processor_kwargs": {"qtsplus_select": False}, "media_io_kwargs": {"video": {"fps": 1}}},
    )
    assert off.prompt_token_ids.count(pad) == at_1fps.num_visual_tokens


def test_an_unselected_video_larger_than_a_prefill_chunk_is_served(assets, client):
    """All M rows of one item (M > --max-num-batched-tokens): vLLM's encoder cache must hold the
    whole item, so the plugin declares the unselected maximum when requests may turn selection off;
    the prefill then runs in chunks instead of being refused."""
    _, model, video = assets
    oracle = ReferencePipeline(model)
    m = oracle.answer(video, QUESTION, max_new_tokens=1, sampling=SamplingConfig(fps=2.0)).num_visual_tokens
    assert m > PREFILL_CHUNK  # the item alone needs several prefill steps
    off = ask(client, video, {"mm_processor_kwargs": {"qtsplus_select": False}})
    assert off.prompt_token_ids.count(oracle.video_pad_id) == m
    assert len(off.choices[0].token_ids) == 6


def test_invalid_server_default_stops_start_up(assets, vllm_cache_root, tmp_path):
    _, model, _ = assets
    args = cpu_serve_args() + ["--mm-processor-kwargs", json.dumps({"qtsplus_rho_scale": 0})]
    with pytest.raises(ServerStartupError, match="qtsplus_rho_scale"):
        with RemoteServer(
            model, args, cache_root=vllm_cache_root, startup_timeout=300, log_path=tmp_path / "log"
        ):
            pass


def _without_a_selector_tensor(model, root):
    """A copy of ``model`` whose checkpoint lacks one selector tensor (the LM is intact)."""
    from safetensors.torch import load_file, save_file

    broken = root / "broken-model"
    broken.mkdir()
    for item in model.iterdir():
        if not item.name.startswith("model"):  # everything but the weights and their index
            (broken / item.name).symlink_to(item)
    tensors = {}
    for shard in sorted(model.glob("model*.safetensors")):
        tensors.update(load_file(shard))
    tensors.pop("model.qts_plus.selector.budget.mlp.2.weight")
    save_file(tensors, broken / "model.safetensors")
    return broken


@pytest.mark.parametrize("case", ["bad-variable", "broken-checkpoint"])
def test_bad_settings_and_broken_checkpoints_stop_start_up(assets, vllm_cache_root, tmp_path, case):
    """Refused when the server starts, not with an error on every request later."""
    _, model, _ = assets
    env, expected = {"QTSPLUS_MAX_VIDEO_SECONDS": "an hour"}, "QTSPLUS_MAX_VIDEO_SECONDS"
    if case == "broken-checkpoint":
        model, env, expected = _without_a_selector_tensor(model, tmp_path), {}, "budget.mlp.2.weight"
    with pytest.raises(ServerStartupError, match=expected):
        with RemoteServer(
            model, cpu_serve_args(), env=env, cache_root=vllm_cache_root, startup_timeout=300,
            log_path=tmp_path / "log",
        ):  # fmt: skip
            pass
