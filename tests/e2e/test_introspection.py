"""``POST /v1/qtsplus/selection`` and the ``/qtsplus`` page on a real ``vllm serve`` (endpoint plugin).

One server per module (fp32, ``VLLM_PLUGINS=qtsplus``). The endpoint must report the selection the
chat endpoint uses for the same inputs (n = the chat prompt's ``<|video_pad|>`` count) and the eager
oracle computes; the page is rendered by a real headless Chromium when the machine has one.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import urllib.parse

import httpx
import numpy as np
import pytest
from PIL import Image

from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args
from qtsplus_vllm.video import SamplingConfig, decode_video

QUESTIONS = ["What is moving in the video?", "Which colour is the background?"]
KEPT_COLOUR = (255, 0, 128)  # the page's KEPT_COLOUR, #ff0080
SOURCE_FPS = {"a.mp4": 4.0, "b.mp4": 8.0}
MAX_QUESTION_TOKENS = 64  # QTSPLUS_MAX_QUESTION_TOKENS of the server


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("introspection")
    model = write_tiny_checkpoint(root / "model", seed=7)
    videos = [
        make_video(root / "a.mp4", frames=24, size=(96, 64), fps=4.0, seed=1),
        make_video(root / "b.mp4", frames=40, size=(64, 96), fps=8.0, seed=2),
    ]
    (root / "bad.mp4").write_bytes(b"not a video at all" * 100)
    return root, model, videos


@pytest.fixture(scope="module")
def server(assets, vllm_cache_root):
    root, model, _ = assets
    args = cpu_serve_args(max_model_len=4096) + [
        "--dtype", "float32",
        "--allowed-local-media-path", str(root),
        "--trust-request-mm-kwargs",
    ]  # fmt: skip
    with RemoteServer(
        model,
        args,
        env={"VLLM_PLUGINS": "qtsplus", "QTSPLUS_MAX_QUESTION_TOKENS": str(MAX_QUESTION_TOKENS)},
        cache_root=vllm_cache_root,
    ) as remote:
        yield remote


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url_root, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def oracle(assets):
    return ReferencePipeline(assets[1])


def select(http, video, question=None, **extra) -> httpx.Response:
    body = {"video": f"file://{video}", **extra}
    if question is not None:
        body["question"] = question
    return http.post("/v1/qtsplus/selection", json=body)


def chat(http, messages, **extra) -> httpx.Response:
    body = {"messages": messages, "max_tokens": 1, "temperature": 0, "return_token_ids": True, **extra}
    return http.post("/v1/chat/completions", json=body)


def video_turn(video, question) -> list[dict]:
    parts = [
        {"type": "video_url", "video_url": {"url": f"file://{video}"}},
        {"type": "text", "text": question},
    ]
    return [{"role": "user", "content": parts}]


def pad_count(response: httpx.Response, oracle) -> int:
    assert response.status_code == 200, response.text
    return response.json()["prompt_token_ids"].count(oracle.video_pad_id)


def test_selection_equals_the_chat_endpoint_and_the_oracle(assets, http, oracle):
    for video in assets[2]:
        for question in QUESTIONS:
            got = select(http, video, question)
            assert got.status_code == 200, got.text
            got = got.json()
            expected = oracle.answer(video, question, max_new_tokens=1)
            assert got["n"] == pad_count(chat(http, video_turn(video, question)), oracle) == expected.n
            assert got["M"] == expected.num_visual_tokens > got["n"]
            assert [k["token"] for k in got["kept"]] == expected.selection.indices.tolist()
            assert got["rho"] == pytest.approx(expected.selection.rho, rel=1e-6)
            assert got["kept_ratio"] == pytest.approx(got["n"] / got["M"])
            assert got["question"] == question


def test_messages_follow_the_chat_query_rule(assets, http, oracle):
    """``messages`` as sent to the chat endpoint: system prompt, text before the video, a follow-up turn."""
    video = assets[2][1]
    url = {"type": "video_url", "video_url": {"url": f"file://{video}"}}
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is moving "}, url, {"type": "text", "text": "here?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": QUESTIONS[1]},
    ]  # fmt: skip
    for turns, question in ((messages[:2], "What is moving here?"), (messages, QUESTIONS[1])):
        got = http.post("/v1/qtsplus/selection", json={"messages": turns}).json()
        assert got["question"] == question
        assert got["n"] == pad_count(chat(http, turns), oracle) == oracle.answer(video, question, 1).n


def test_settings_apply_as_in_chat(assets, http, oracle):
    """Selection off gives all M tokens (the chat prompt's pad count); a cap bounds n."""
    video = assets[2][0]
    off = {"mm_processor_kwargs": {"qtsplus_select": False}}
    got = select(http, video, QUESTIONS[0], **off).json()
    assert got["n"] == got["M"] == pad_count(chat(http, video_turn(video, QUESTIONS[0]), **off), oracle)
    assert got["rho"] is None and all(f["relevance_max"] is None for f in got["frames"])
    capped = select(http, video, QUESTIONS[0], mm_processor_kwargs={"qtsplus_max_tokens": 5}).json()
    assert capped["n"] == 5


def test_frames_map_kept_tokens_to_time(assets, http, oracle):
    for video in assets[2]:
        got = select(http, video, QUESTIONS[0], include_frames=True).json()
        expected = oracle.answer(video, QUESTIONS[0], max_new_tokens=1).selection
        grid, steps = got["grid"], got["frames"]
        per_step = grid["h"] * grid["w"]
        assert grid["t"] * per_step == got["M"] and len(steps) == grid["t"]
        assert sum(f["kept_tokens"] for f in steps) == got["n"]

        # sampled frames as the loader picks them; a step is two of them, at its first one's time
        sampled = decode_video(video, SamplingConfig()).frame_indices
        fps = SOURCE_FPS[video.name]
        assert [f["source_indices"] for f in steps] == [
            list(sampled[2 * k : 2 * k + 2]) for k in range(len(steps))
        ]
        times = [f["timestamp_s"] for f in steps]
        assert times == pytest.approx([f["index"] / fps for f in steps]) and times == sorted(set(times))

        scores = expected.scores.float().view(grid["t"], per_step)  # r, [t, gh·gw]
        assert [f["relevance_max"] for f in steps] == pytest.approx(scores.amax(1).tolist(), rel=1e-5)
        assert [f["relevance_mean"] for f in steps] == pytest.approx(scores.mean(1).tolist(), rel=1e-5)
        for kept in got["kept"]:
            step = steps[kept["step"]]
            assert kept["token"] == kept["step"] * per_step + kept["row"] * grid["w"] + kept["col"]
            assert (kept["frame_index"], kept["timestamp_s"]) == (step["index"], step["timestamp_s"])
            assert kept["relevance"] == pytest.approx(float(expected.scores[kept["token"]]), rel=1e-5)
        for step in steps:  # thumbnails exactly for the steps with kept tokens
            assert (step["thumbnail"] is not None) == (step["kept_tokens"] > 0)
            if step["thumbnail"]:
                header, data = step["thumbnail"].split(",", 1)
                assert header == "data:image/jpeg;base64"
                assert Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"


def _feature_cache_hits(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("qtsplus_feature_cache_hits_total "):
            return float(line.split()[1])
    return 0.0


def test_follow_up_shares_the_feature_cache_without_telling_the_caller(assets, http, oracle):
    """The endpoint shares the processor's ViT-feature cache in both directions, per video, but its
    answer says nothing of it: whether the ViT ran would tell a caller that someone else sent the
    video. Hits show in the operator's /metrics only."""
    root = assets[0]
    fresh = make_video(root / "c.mp4", frames=16, size=(80, 64), fps=4.0, seed=3)
    hits = _feature_cache_hits(http)
    first, second = (select(http, fresh, q).json() for q in QUESTIONS)
    assert _feature_cache_hits(http) == hits + 1
    assert second["n"] == oracle.answer(fresh, QUESTIONS[1], max_new_tokens=1).n
    for answer in (first, second):
        assert not {"cache_hit", "feature_cache"} & answer.keys()
        assert set(answer["timings_ms"]) == {"render_ms", "selection_ms", "total_ms"}

    chatted = make_video(root / "d.mp4", frames=16, size=(80, 64), fps=4.0, seed=4)
    assert pad_count(chat(http, video_turn(chatted, QUESTIONS[0])), oracle) > 0
    hits = _feature_cache_hits(http)
    assert select(http, chatted, QUESTIONS[1]).status_code == 200
    assert _feature_cache_hits(http) == hits + 1


@pytest.mark.parametrize(
    "name, question, extra, status",
    [
        ("bad.mp4", "Hi", {}, 400),  # undecodable
        ("a.mp4", "Hi", {"mm_processor_kwargs": {"qtsplus_selekt": False}}, 400),
        ("a.mp4", "Hi", {"media_io_kwargs": {"video": {"fps": -2}}}, 400),
        ("/etc/passwd", "Hi", {}, 400),  # outside --allowed-local-media-path
        ("a.mp4", "why " * (MAX_QUESTION_TOKENS + 1), {}, 413),
    ],
    ids=["undecodable", "unknown-mm-key", "bad-fps", "outside-allowed-path", "question-too-long"],
)
def test_bad_inputs_get_the_chat_endpoints_error(assets, http, name, question, extra, status):
    url = f"file://{assets[0] / name}"  # an absolute name stays itself
    got = http.post("/v1/qtsplus/selection", json={"video": url, "question": question, **extra})
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]
    want = chat(http, [{"role": "user", "content": parts}], **extra)
    assert got.status_code == want.status_code == status
    error = got.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == status and error["message"]
    assert error["message"] == want.json()["error"]["message"]
    assert http.get("/health").status_code == 200
    assert select(http, assets[2][0], "Hi").status_code == 200


def test_malformed_requests(assets, http):
    video = f"file://{assets[2][0]}"
    both = http.post(
        "/v1/qtsplus/selection", json={"video": video, "messages": video_turn(assets[2][0], "Hi")}
    )
    assert both.status_code == 400 and "either" in both.json()["error"]["message"]
    unknown_model = http.post("/v1/qtsplus/selection", json={"video": video, "model": "nope"})
    assert unknown_model.status_code == 404 and "nope" in unknown_model.json()["error"]["message"]
    no_video = http.post("/v1/qtsplus/selection", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert no_video.status_code == 400 and "video" in no_video.json()["error"]["message"]
    assert http.get("/health").status_code == 200


def test_page_is_served(http):
    page = http.get("/qtsplus")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/qtsplus/selection" in page.text and "<script src" not in page.text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_page_in_headless_chromium(assets, server, http, tmp_path):
    video, question = assets[2][1], QUESTIONS[0]
    n = select(http, video, question).json()["n"]
    query = urllib.parse.urlencode({"video": f"file://{video}", "question": question})
    url = f"{server.url_for('qtsplus')}?{query}"
    browser = [
        _chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
        "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip

    shot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=180)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (900, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
    kept = int(np.all(pixels == KEPT_COLOUR, axis=-1).sum())
    assert kept > 2000, f"only {kept} pixels of the kept-token colour"

    dom = subprocess.run(
        [*browser, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180
    )
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stdout[:2000]
    assert 'data-state="done"' in body.group(0), dom.stdout[-3000:]
    assert f'data-n="{n}"' in body.group(0)
    assert f"QTSplus selection: n={n} of M=" in dom.stdout
