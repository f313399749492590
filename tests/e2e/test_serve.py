"""`vllm serve` a tiny QTSplus checkpoint through the plugin and compare with the eager oracle.

One server per module (fp32, greedy). The oracle (qtsplus_vllm.reference) shares none of the
serving path's splicing or position code, so equal token ids mean equal selection, splice and
positions.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args
from qtsplus_vllm.testing.videos import render_frames

QUESTIONS = ["What is moving in the video?", "Which colour is the background?"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = write_tiny_checkpoint(root / "model", seed=7)
    videos = [
        make_video(root / "a.mp4", frames=24, size=(96, 64), fps=4.0, seed=1),
        make_video(root / "b.mp4", frames=40, size=(64, 96), fps=8.0, seed=2),
    ]
    return root, model, videos


@pytest.fixture(scope="module")
def server(assets, vllm_cache_root):
    root, model, _ = assets
    # the real process layout (API server, engine core, worker) and vLLM's default prefix caching
    args = cpu_serve_args(max_model_len=4096, in_process_worker=False, prefix_caching=True) + [
        "--dtype", "float32",
        "--allowed-local-media-path", str(root),
        "--trust-request-mm-kwargs",
    ]  # fmt: skip
    with RemoteServer(model, args, cache_root=vllm_cache_root) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server):
    return server.get_client()


@pytest.fixture(scope="module")
def oracle(assets):
    return ReferencePipeline(assets[1])


def chat(client, video, parts_after=(), parts_before=(), extra=None, **kw):
    content = [{"type": "text", "text": t} for t in parts_before]
    content.append({"type": "video_url", "video_url": {"url": f"file://{video}"}})
    content += [{"type": "text", "text": t} for t in parts_after]
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=kw.pop("max_tokens", MAX_TOKENS),
        extra_body={"return_token_ids": True, **(extra or {})},
        **kw,
    )


def test_served_answers_equal_the_oracle(assets, client, oracle):
    """Every (video, question): same expanded prompt ids, same n, same greedy tokens."""
    seen_n = set()
    for video in assets[2]:
        for question in QUESTIONS:
            expected = oracle.answer(video, question, max_new_tokens=MAX_TOKENS)
            response = chat(client, video, [question])
            assert response.prompt_token_ids == expected.prompt_ids
            assert response.usage.prompt_tokens == len(expected.prompt_ids)
            assert response.choices[0].token_ids == expected.token_ids
            assert (
                response.prompt_token_ids.count(oracle.video_pad_id)
                == expected.n
                < expected.num_visual_tokens
            )
            seen_n.add((str(video), expected.n))
    assert len(seen_n) >= 3  # the selection really depends on the video and the question


def test_cached_selection_never_crosses_questions(assets, client, oracle):
    """Same video, alternating questions: each answer stays its own (processor/encoder/prefix caches)."""
    video = assets[2][0]
    expected = {q: oracle.answer(video, q, max_new_tokens=MAX_TOKENS) for q in QUESTIONS}
    for question in QUESTIONS + QUESTIONS[::-1]:
        response = chat(client, video, [question])
        assert response.prompt_token_ids == expected[question].prompt_ids
        assert response.choices[0].token_ids == expected[question].token_ids


def test_query_rule_text_before_video_and_several_parts(assets, client, oracle):
    video = assets[2][1]
    question = QUESTIONS[0]
    n = oracle.answer(video, question, max_new_tokens=1).n
    before = chat(client, video, parts_before=[question], max_tokens=1)
    assert before.prompt_token_ids.count(oracle.video_pad_id) == n
    # two text parts are concatenated as the chat template renders them
    split = chat(client, video, parts_before=["What is moving "], parts_after=["in the video?"], max_tokens=1)
    joined = oracle.answer(video, "What is moving in the video?", max_new_tokens=1)
    assert split.prompt_token_ids.count(oracle.video_pad_id) == joined.n


def test_follow_up_turn_selects_for_the_new_question(assets, client, oracle):
    video = assets[2][0]
    messages = [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                     {"type": "text", "text": QUESTIONS[0]}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": QUESTIONS[1]},
    ]  # fmt: skip
    response = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, temperature=0, max_tokens=1,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert (
        response.prompt_token_ids.count(oracle.video_pad_id)
        == oracle.answer(video, QUESTIONS[1], max_new_tokens=1).n
    )


def test_selection_off_is_the_all_token_baseline(assets, client, oracle):
    video = assets[2][0]
    expected = oracle.answer(video, QUESTIONS[0], max_new_tokens=1)
    off = chat(
        client, video, [QUESTIONS[0]], extra={"mm_processor_kwargs": {"qtsplus_select": False}}, max_tokens=1
    )
    assert off.usage.prompt_tokens == len(expected.prompt_ids) - expected.n + expected.num_visual_tokens
    capped = chat(
        client, video, [QUESTIONS[0]], extra={"mm_processor_kwargs": {"qtsplus_max_tokens": 5}}, max_tokens=1
    )
    assert capped.usage.prompt_tokens == len(expected.prompt_ids) - expected.n + 5


def test_request_media_io_kwargs_change_the_frames(assets, client, oracle):
    """5 s at 8 fps: the default fps 1 samples 4 frames (2 temporal steps), fps 2 samples 10 (5 steps)."""
    video = assets[2][1]
    m_default = oracle.answer(video, "Count.", max_new_tokens=1).num_visual_tokens
    off = {"qtsplus_select": False}
    one = chat(client, video, ["Count."], extra={"mm_processor_kwargs": off}, max_tokens=1)
    two = chat(
        client, video, ["Count."], extra={"mm_processor_kwargs": off, "media_io_kwargs": {"video": {"fps": 2}}},
        max_tokens=1,
    )  # fmt: skip
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == m_default // 2 * 3


def test_streaming_equals_non_streaming(assets, client):
    video = assets[2][0]
    whole = chat(client, video, [QUESTIONS[0]])
    stream = chat(client, video, [QUESTIONS[0]], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content


def test_text_only_request(client):
    response = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hello"}],
        temperature=0, max_tokens=3,
    )  # fmt: skip
    assert response.usage.prompt_tokens > 0 and response.choices[0].finish_reason in {"length", "stop"}


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"mm_processor_kwargs": {"qtsplus_rho_scale": -1}}, "qtsplus_rho_scale"),
        ({"mm_processor_kwargs": {"qtsplus_selekt": False}}, "qtsplus_selekt"),
        ({"mm_processor_kwargs": {"qtsplus_max_tokens": 0}}, "qtsplus_max_tokens"),
        ({"media_io_kwargs": {"video": {"fps": -2}}}, "fps"),
        ({"media_io_kwargs": {"video": {"frames_per_second": 2}}}, "frames_per_second"),
    ],
)
def test_bad_settings_are_400_and_the_server_keeps_serving(assets, client, extra, fragment):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, assets[2][0], ["Hi"], extra=extra, max_tokens=1)
    assert fragment in str(err.value)
    assert chat(client, assets[2][0], ["Hi"], max_tokens=1).choices[0].token_ids


def test_undecodable_video_is_400(assets, client):
    bad = assets[0] / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(openai.BadRequestError, match="video"):
        chat(client, bad, ["Hi"], max_tokens=1)
    assert chat(client, assets[2][0], ["Hi"], max_tokens=1).choices[0].token_ids


def _image(seed: int) -> np.ndarray:
    return render_frames(1, (80, 56), seed=seed)[0]


def _png_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # lossless: the server sees these pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "kinds", [("video", "video"), ("image",), ("video", "image", "image")], ids=["2-videos", "image", "mixed"]
)
def test_several_items_and_images_equal_the_oracle(assets, client, oracle, kinds):
    """Each item is selected on its own against the turn's question, spliced at its own placeholder."""
    videos = iter(assets[2])
    items, content = [], []
    for k, kind in enumerate(kinds):
        if kind == "video":
            video = next(videos)
            items.append(("video", video))
            content.append({"type": "video_url", "video_url": {"url": f"file://{video}"}})
        else:
            image = _image(seed=30 + k)
            items.append(("image", image))
            content.append({"type": "image_url", "image_url": {"url": _png_url(image)}})
    content.append({"type": "text", "text": QUESTIONS[0]})
    expected = oracle.answer_items(items, QUESTIONS[0], max_new_tokens=MAX_TOKENS)
    response = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}],
        temperature=0, max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert response.prompt_token_ids == expected.prompt_ids
    assert response.choices[0].token_ids == expected.token_ids
    image_pad = oracle.image_pad_id
    n_images = sum(s.n for (kind, _), s in zip(items, expected.selections, strict=True) if kind == "image")
    assert response.prompt_token_ids.count(image_pad) == n_images


def test_metrics_report_the_selection_and_the_feature_cache(server, assets, client):
    video = assets[2][0]
    for question in QUESTIONS:  # the second question on the same video hits the feature cache
        chat(client, video, [question], max_tokens=1)
    text = httpx.get(server.url_for("metrics"), timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith("qtsplus_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["qtsplus_kept_ratio_count"] > 0 and values["qtsplus_visual_tokens_count"] > 0
    assert values["qtsplus_vit_seconds_count"] > 0 and values["qtsplus_selector_seconds_count"] > 0
    assert (
        values["qtsplus_feature_cache_hits_total"] >= 1 and values["qtsplus_feature_cache_misses_total"] >= 1
    )
    assert values["qtsplus_feature_cache_bytes"] > 0 and values["qtsplus_feature_cache_entries"] >= 1


def _uuid_chat(client, video, uuid: str, question: str, max_tokens: int = MAX_TOKENS):
    part = {"type": "video_url", "video_url": {"url": f"file://{video}"} if video else {}, "uuid": uuid}
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"return_token_ids": True},
    )


def test_a_client_uuid_cannot_stand_for_another_clients_video(assets, client, oracle):
    """Two tenants, one uuid, two videos, one question: each gets the answer for its own video.

    vLLM keys its processor cache, encoder cache and prefix caching by a client's ``uuid`` in place
    of the media; the plugin keys every item that carries data by its content.
    """
    x, y = assets[2]
    question = "Is anything red?"
    first = _uuid_chat(client, x, "tenant-shared-1", question)
    second = _uuid_chat(client, y, "tenant-shared-1", question)
    for video, response in ((x, first), (y, second)):
        expected = oracle.answer(video, question, max_new_tokens=MAX_TOKENS)
        assert response.prompt_token_ids == expected.prompt_ids
        assert response.choices[0].token_ids == expected.token_ids
    assert first.prompt_token_ids != second.prompt_token_ids


def test_media_by_uuid_alone_is_refused(assets, client):
    with pytest.raises(openai.BadRequestError, match="QTSPLUS_TRUST_CLIENT_UUIDS"):
        _uuid_chat(client, None, "tenant-shared-1", "Is anything red?", max_tokens=1)
    assert chat(client, assets[2][0], ["Hi"], max_tokens=1).choices[0].token_ids
