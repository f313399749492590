"""Every checkpoint layout serves with plain ``vllm serve``, answering like the oracle (issue 18).

One server per layout (qtsplus_vllm.testing.layouts), no ``--hf-overrides``, no ``--trust-remote-code``:

- ``trainer``: the reference trainer's output (``pytorch_model.bin``, ``architectures``
  ``Qwen2_5_VLTextForCausalLM``, ``video_preprocessor_config.json`` naming ``Qwen2VLVideoProcessor``,
  which vLLM binds to its own 2-fps ``qwen2_vl`` loader, ``training_args.bin``, a tied head saved twice);
- ``trainer-safetensors``: the same after the reference demo's ``.bin`` -> safetensors conversion;
- ``published``: a remote-code repository (sharded safetensors, ``auto_map`` + a ``*.py`` file, a
  video processor config);
- ``published``, no ``architectures`` key and no video processor config.

For each: the prompt (so the number of kept tokens) and the greedy answer equal the oracle's token for
token; the frames the server sampled (its log line) equal the oracle's; the start-up line says how the
checkpoint is served; the pickle and the code files were never loaded (their traps left no mark). The
16-second clip makes the loaders disagree: ours keeps 16 frames (1 fps), vLLM's ``qwen2_vl`` 32.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import openai
import pytest
from PIL import Image

from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.layouts import IMPORTED_SENTINEL, UNPICKLED_SENTINEL
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

SEED = 41
QUESTION = "What is moving in the video?"
MAX_TOKENS = 8
CASES = {
    "trainer": dict(layout="trainer", tied=True),
    "trainer-safetensors": dict(layout="trainer-safetensors"),
    "published": dict(layout="published"),
    "published-bare": dict(layout="published", architecture="none", video_processor_type="none"),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts-media")
    video = make_video(root / "clip-16s.mp4", frames=64, size=(96, 64), fps=4.0, seed=9)
    image = np.random.default_rng(3).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    return root, video, image


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory, media, vllm_cache_root):
    root, _, _ = media
    model = write_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param) / "model", seed=SEED, **CASES[request.param]
    )
    args = cpu_serve_args(max_model_len=4096) + [
        "--allowed-local-media-path",
        str(root),
        "--trust-request-mm-kwargs",
    ]
    with RemoteServer(model, args, cache_root=vllm_cache_root) as server:
        yield request.param, model, server


def _png_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ask(client, content):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}],
        temperature=0, max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True},
    )  # fmt: skip


def test_layout_serves_the_oracle_answer_with_the_oracle_frames(served, media):
    case, model, server = served
    _, video, image = media
    oracle = ReferencePipeline(model)
    expected = oracle.answer(video, QUESTION, max_new_tokens=MAX_TOKENS)
    assert expected.num_frames == 16  # 1 fps of a 16-second clip: vLLM's qwen2_vl loader would take 32

    client = server.get_client()
    response = _ask(client, [{"type": "video_url", "video_url": {"url": f"file://{video}"}}])
    assert response.prompt_token_ids == expected.prompt_ids, case  # the kept tokens included
    assert response.choices[0].token_ids == expected.token_ids, case
    assert response.prompt_token_ids.count(oracle.video_pad_id) == expected.n
    logged = re.findall(r"QTSplus video: frames=(\d+) M=(\d+) n=(\d+)", server.log_tail(400))
    assert logged and logged[-1] == (
        str(expected.num_frames),
        str(expected.num_visual_tokens),
        str(expected.n),
    )

    # images take the same path (a one-frame video), whatever the checkpoint's image processor says
    expected_image = oracle.answer_items([("image", image)], QUESTION, max_new_tokens=MAX_TOKENS)
    response = _ask(client, [{"type": "image_url", "image_url": {"url": _png_url(image)}}])
    assert response.prompt_token_ids == expected_image.prompt_ids, case
    assert response.choices[0].token_ids == expected_image.token_ids, case


def test_start_up_line_says_how_the_checkpoint_is_served(served):
    case, model, server = served
    lines = [line for line in server.log_tail(4000).splitlines() if "QTSplus checkpoint" in line]
    assert lines, "no start-up line in the server log"
    line = lines[0]
    assert "served as QTSplusQwen2_5_VLTextForCausalLM (by model_type)" in line
    assert "video loader: 'qtsplus' (qwen-vl-utils rules: fps 1, frames 4..768" in line
    assert "ViT and selector: cpu" in line and "dtype: served float32" in line
    if case.startswith("trainer"):
        assert "layout: reference trainer output" in line
        assert "['Qwen2_5_VLTextForCausalLM']" in line
        assert "pickles never loaded: training_args.bin" in line
        assert "Qwen2VLVideoProcessor (video_preprocessor_config.json)" in line
    if case == "trainer":
        assert "head: tied (lm_head.weight is saved too" in line
    if case.startswith("published"):
        assert "remote code ignored (never imported)" in line and "qts_plus_qwen2_5_lm.py" in line
    if case == "published-bare":
        assert "architectures in config.json: ['(none)']" in line
        assert "video processor named by the checkpoint" not in line


def test_pickles_and_repository_code_are_never_loaded(served):
    _, model, _ = served
    assert not (model / UNPICKLED_SENTINEL).exists()
    assert not (model / IMPORTED_SENTINEL).exists()


def test_a_request_naming_another_video_loader_gets_400(served, media):
    """Even with --trust-request-mm-kwargs, a request cannot get another loader's frames (HTTP 200 with them)."""
    case, _, server = served
    if case != "trainer":
        pytest.skip("one layout is enough: the check does not depend on the checkpoint's files")
    _, video, _ = media
    client = server.get_client()
    with pytest.raises(openai.BadRequestError, match="QTSplus models decode videos with 'qtsplus'"):
        client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                {"type": "text", "text": QUESTION},
            ]}],
            max_tokens=2, extra_body={"media_io_kwargs": {"video": {"video_backend": "qwen2_vl"}}},
        )  # fmt: skip
    assert _ask(
        client, [{"type": "video_url", "video_url": {"url": f"file://{video}"}}]
    ).choices  # still serving
