"""Hostile media and bad requests against a real server: a clear error each, nobody else affected.

One server (fp32, greedy) with some limits lowered so that the over-the-limit cases are cheap to
build, fault injection (tests/e2e/faults) that makes the selection runtime run out of memory on
videos of a marker width, and a local HTTP server for the fetch cases (upstream error statuses,
a redirect loop, a truncated body, an oversize download). Every case runs while a valid request is
in flight on another thread; that request must still get exactly the oracle's answer, and the server
must stay healthy. Each of those requests asks a question of its own, so that vLLM's processor
cache cannot answer it: the selection runtime really runs while the hostile input is processed.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import hostile, make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args
from qtsplus_vllm.testing.videos import make_video_bytes

FAULTS = Path(__file__).parent / "faults"
OOM_WIDTH = 34  # frames this wide make the runtime raise torch.OutOfMemoryError
LIMITS = {
    "QTSPLUS_MAX_VIDEO_BYTES": 1_000_000,
    "QTSPLUS_MAX_VIDEO_SECONDS": 600,
    "QTSPLUS_MAX_SOURCE_FRAMES": 3000,
    "QTSPLUS_MAX_QUESTION_TOKENS": 256,
    "QTSPLUS_MAX_VIT_PATCHES": 8_000,  # the good video at the default settings: 1,120
    # source frames × pixels (at least 128² a frame): over the 3,000 frames of 16×16 that the frame
    # limit stops first (49.2M), under the valid cases (1,200 32×32 frames: 19.7M; two 3 MP JPEGs)
    "QTSPLUS_MAX_DECODE_WORK": 50_000_000,
}
MAX_MODEL_LEN = 1024
FETCH_DEADLINE = 15  # QTSPLUS_FETCH_DEADLINE_SECONDS of this server
QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    media = root / "media"
    media.mkdir()
    model = write_tiny_checkpoint(root / "model", seed=11)
    good = make_video(media / "good.mp4", frames=16, size=(64, 48), fps=4.0, seed=5)
    (root / "secret.mp4").write_bytes(good.read_bytes())  # outside the allowed path
    return root, model, good


@pytest.fixture(scope="module")
def server(assets, vllm_cache_root):
    root, model, _ = assets
    args = cpu_serve_args(max_model_len=MAX_MODEL_LEN, in_process_worker=False) + [
        "--dtype", "float32",
        "--allowed-local-media-path", str(root / "media"),
        "--trust-request-mm-kwargs",
        "--limit-mm-per-prompt", json.dumps({"video": 1}),
    ]  # fmt: skip
    env = {k: str(v) for k, v in LIMITS.items()}
    # the faults directory first, then the caller's PYTHONPATH (the checkout under test, if set)
    pythonpath = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    env.update(QTSPLUS_TEST_OOM_WIDTH=str(OOM_WIDTH), PYTHONPATH=pythonpath, VLLM_VIDEO_FETCH_TIMEOUT="5")
    # one retry: exercised; a silent server would cost vLLM 5 + 1 + 20 s, the deadline stops it at 15
    env.update(VLLM_MEDIA_FETCH_MAX_RETRIES="2", QTSPLUS_FETCH_DEADLINE_SECONDS=str(FETCH_DEADLINE))
    with RemoteServer(model, args, env=env, cache_root=vllm_cache_root) as remote:
        yield remote


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def body(url: str | list[str], text: str = QUESTION, **extra) -> dict:
    urls = [url] if isinstance(url, str) else url
    content = [{"type": "video_url", "video_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": text})
    return {
        "model": "qtsplus",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0.0,
        **extra,
    }


def post(http: httpx.Client, payload: dict | bytes) -> httpx.Response:
    if isinstance(payload, bytes):
        return http.post("/chat/completions", content=payload, headers={"content-type": "application/json"})
    return http.post("/chat/completions", json=payload)


@pytest.fixture(scope="module")
def model_name(http):
    return http.get("/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def good_request(assets, model_name):
    return {**body(f"file://{assets[2]}"), "model": model_name}


@pytest.fixture(scope="module")
def oracle(assets):
    return ReferencePipeline(assets[1])


@pytest.fixture(scope="module")
def good_answer(http, good_request, oracle, assets):
    """The valid request alone: exactly the oracle's tokens."""
    response = post(http, {**good_request, "return_token_ids": True})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["token_ids"] == oracle.answer(assets[2], QUESTION, max_new_tokens=6).token_ids
    return choice["message"]["content"]


_BYSTANDER_IDS = itertools.count()


def bystander(good_request: dict, oracle: ReferencePipeline, good: Path) -> tuple[dict, list[int]]:
    """A valid request with a question never asked before (so the processor cache cannot answer it
    and the selection runtime runs), and the oracle's tokens for it."""
    question = f"{QUESTION} Look closely, case {next(_BYSTANDER_IDS)}."
    payload = {**good_request, **body(f"file://{good}", text=question), "model": good_request["model"]}
    payload["return_token_ids"] = True
    return payload, oracle.answer(good, question, max_new_tokens=6).token_ids


@pytest.fixture(scope="module")
def media_server(assets):
    files = {"understated.avi": hostile.understated_avi(3200), "good.mp4": assets[2].read_bytes()}
    with hostile.http_media_server(files) as url:
        yield url


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _long_low_fps() -> bytes:
    # 3 frames, one every 400 s: a 20-minute video that costs nothing to build
    return hostile.flat_video(3, (32, 32), fps=1 / 400)


def _jpeg_frames(count: int) -> str:
    """A ``data:video/jpeg`` URL: vLLM's comma-separated list of base64 JPEG frames."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 30, 200)).save(buffer, format="JPEG")
    frame = base64.b64encode(buffer.getvalue()).decode()
    return "data:video/jpeg;base64," + ",".join([frame] * count)


def _big_jpeg_frames() -> str:
    # 4200x4200 (17.6 MP, over the default 4096²): about 280 kB each, a header read to refuse
    return hostile.jpeg_frames_url([hostile.jpeg_frame((4200, 4200))] * 2)


def _question_100k() -> str:
    return ("why " * 25_000)[:100_000]


# (id, payload builder(root, good_path, media_server_url) -> dict | bytes, expected status, message pattern)
CASES = [
    ("corrupt-bytes", lambda r, g, m: body(data_url(hostile.corrupt_bytes())), 400, r"not a readable video"),
    ("truncated-mp4", lambda r, g, m: body(data_url(hostile.truncated_mp4())), 400, r"not a readable video"),
    ("audio-only", lambda r, g, m: body(data_url(hostile.audio_only(), "audio/wav")), 400, r"no video stream"),
    ("image-as-video", lambda r, g, m: body(data_url(hostile.png_image(), "image/png")), 400, r"still image"),
    ("zero-frames", lambda r, g, m: body(data_url(hostile.zero_frame_video())), 400, r"readable video|no frames"),
    ("huge-frame-8000x8000", lambda r, g, m: body(data_url(hostile.flat_video(1, (8000, 8000)))), 413,
     r"frame size 8000x8000.*QTSPLUS_MAX_FRAME_PIXELS"),
    ("longer-than-limit", lambda r, g, m: body(data_url(_long_low_fps())), 413, r"duration.*QTSPLUS_MAX_VIDEO_SECONDS"),
    ("60fps-over-frame-limit", lambda r, g, m: body(data_url(make_video_bytes(3200, (32, 32), fps=60.0))), 413,
     r"frame count.*QTSPLUS_MAX_SOURCE_FRAMES"),
    ("jpeg-frames-over-limit", lambda r, g, m: body(_jpeg_frames(769)), 413,
     r"video/jpeg frame count is 769.*QTSPLUS_MAX_FRAMES"),
    ("aspect-over-200", lambda r, g, m: body(data_url(hostile.flat_video(2, (402, 2)))), 400, r"aspect ratio over 200"),
    ("data-url-over-size-limit", lambda r, g, m: body(data_url(hostile.corrupt_bytes(1_100_000))), 413,
     r"size in bytes.*QTSPLUS_MAX_VIDEO_BYTES"),
    ("file-outside-allowed-path", lambda r, g, m: body(f"file://{r / 'secret.mp4'}"), 400, r"allowed-local-media-path"),
    ("http-closed-port", lambda r, g, m: body(f"http://127.0.0.1:{closed_port()}/v.mp4"), 400,
     r"cannot fetch the video_url"),
    ("http-upstream-503", lambda r, g, m: body(f"{m}/status/503"), 502,
     r"cannot fetch the video_url http://127\.0\.0\.1:\d+/status/503: the media server answered HTTP 503 "
     r"Service Unavailable"),
    ("http-upstream-404", lambda r, g, m: body(f"{m}/status/404"), 400,
     r"video_url http://\S+/status/404: the media server answered HTTP 404 Not Found"),
    ("http-upstream-429", lambda r, g, m: body(f"{m}/status/429"), 502, r"answered HTTP 429 Too Many Requests"),
    ("http-redirect-loop", lambda r, g, m: body(f"{m}/loop"), 400, r"video_url http://\S+/loop: it redirects in a loop"),
    # vLLM's error handler shows a URL path ending in a file name as "<path>"
    ("http-truncated-body", lambda r, g, m: body(f"{m}/truncated/good.mp4"), 502,
     r"video_url http://\S+: the media server's answer broke off"),
    ("http-download-over-size-limit", lambda r, g, m: body(f"{m}/big/1100000"), 413,
     r"size in bytes of the video at http://\S+/big/1100000 is at least [\d,]+, over the limit of 1,000,000 "
     r"\(server setting QTSPLUS_MAX_VIDEO_BYTES\)"),
    ("jpeg-frames-over-pixel-limit", lambda r, g, m: body(_big_jpeg_frames()), 413,
     r"video/jpeg frame's size 4200x4200 in pixels is 17,640,000, over the limit of 16,777,216 "
     r"\(server setting QTSPLUS_MAX_FRAME_PIXELS\)"),
    ("understated-frame-count", lambda r, g, m: body(f"{m}/files/understated.avi"), 413,
     r"frame count, counted while reading it \(its header claims 2\), is at least 3,001, over the limit of "
     r"3,000 \(server setting QTSPLUS_MAX_SOURCE_FRAMES\)"),
    ("min-frames-over-small-max-frames", lambda r, g, m: body(f"file://{g}", media_io_kwargs={"video": {
     "max_frames": 3, "min_frames": 4}}), 400, r"\['min_frames'\]=4 is invalid.*may not exceed max_frames=3"),
    ("question-100k-chars", lambda r, g, m: body(f"file://{g}", text=_question_100k()), 400,
     r"maximum context length is 1024 tokens"),
    ("question-over-token-limit", lambda r, g, m: body(f"file://{g}", text="why " * 300), 413,
     r"question's length in tokens.*QTSPLUS_MAX_QUESTION_TOKENS"),
    ("non-utf8-body", lambda r, g, m: json.dumps(body(f"file://{g}", text="QQQ")).encode().replace(b"QQQ", b"\xff\xfe"),
     400, r"error parsing the body"),
    ("lone-surrogate-question", lambda r, g, m: json.dumps(body(f"file://{g}", text="a\ud800b")).encode(), 400,
     r"TextEncodeInput"),  # vLLM tokenizes the rendered chat before our processor sees it
    ("vit-patches-over-limit", lambda r, g, m: body(f"file://{g}", mm_processor_kwargs={"max_pixels": 1280 * 28 * 28,
     "min_pixels": 1280 * 28 * 28}), 413, r"ViT patch count.*QTSPLUS_MAX_VIT_PATCHES"),
    ("mm-kwargs-unknown", lambda r, g, m: body(f"file://{g}", mm_processor_kwargs={"qtsplus_rho": 0.5}), 400,
     r"qtsplus_rho.*unknown key"),
    ("mm-kwargs-mistyped", lambda r, g, m: body(f"file://{g}", mm_processor_kwargs={"qtsplus_select": "no"}), 400,
     r"qtsplus_select.*true or false"),
    ("mm-kwargs-out-of-range", lambda r, g, m: body(f"file://{g}", mm_processor_kwargs={"qtsplus_rho_max": 1.5}), 400,
     r"qtsplus_rho_max.*outside the allowed range"),
    ("media-io-unknown", lambda r, g, m: body(f"file://{g}", media_io_kwargs={"video": {"fsp": 2}}), 400,
     r"unknown key.*fsp"),
    ("media-io-mistyped", lambda r, g, m: body(f"file://{g}", media_io_kwargs={"video": {"fps": "fast"}}), 400,
     r"'fps'.*finite number"),
    ("media-io-out-of-range", lambda r, g, m: body(f"file://{g}", media_io_kwargs={"video": {"max_frames": 100_000}}),
     400, r"'max_frames'.*allowed an integer in \[2, 768\]"),
    ("more-videos-than-limit", lambda r, g, m: body([f"file://{g}", f"file://{g}"]), 400, r"(?i)at most 1 video"),
    ("prompt-over-max-model-len", lambda r, g, m: body(f"file://{g}", mm_processor_kwargs={"qtsplus_select": False,
     "max_pixels": 900 * 28 * 28, "min_pixels": 900 * 28 * 28}), 400, r"(?i)maximum context length|too long|max_model_len"),
    # decode work, not bytes: 2,900 static 160×120 frames (~80 kB) and six static 4096² ones (~7 kB)
    ("many-tiny-static-frames", lambda r, g, m: body(data_url(hostile.many_tiny_static_frames(2900, (160, 120)))),
     413, r"decode work \(2,900 source frames of 160x120, in pixels\) is 55,680,000, over the limit of "
     r"50,000,000 \(server setting QTSPLUS_MAX_DECODE_WORK\)"),
    ("huge-static-frames", lambda r, g, m: body(data_url(hostile.huge_static_frames())), 413,
     r"decode work \(6 source frames of 4096x4096, in pixels\) is 100,663,296, over the limit of 50,000,000 "
     r"\(server setting QTSPLUS_MAX_DECODE_WORK\)"),
    ("selection-out-of-memory", lambda r, g, m: body(data_url(hostile.flat_video(4, (OOM_WIDTH, 32)))), 503,
     r"ran out of memory"),
]  # fmt: skip


@pytest.mark.parametrize("build,status,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_refused_and_nobody_else_is_affected(
    http, server, assets, good_request, good_answer, oracle, media_server, build, status, pattern
):
    root, _, good = assets
    payload = build(root, good, media_server)
    if isinstance(payload, dict):
        payload["model"] = good_request["model"]
    else:
        payload = payload.replace(
            b'"model": "qtsplus"', json.dumps({"model": good_request["model"]})[1:-1].encode()
        )
    valid, expected = bystander(good_request, oracle, good)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(post, http, valid)
        response = post(http, payload)
        other = in_flight.result()
    assert response.status_code == status, response.text[:500]
    answer = response.json()
    message = answer["error"]["message"] if "error" in answer else answer["detail"]  # FastAPI's own 400
    assert re.search(pattern, message), message[:500]
    assert other.status_code == 200, other.text[:500]
    assert other.json()["choices"][0]["token_ids"] == expected
    assert http.get(server.url_for("health")).status_code == 200


@pytest.mark.parametrize(
    "video",
    [lambda: hostile.many_tiny_static_frames(2900, (160, 120)), hostile.huge_static_frames],
    ids=["many-tiny-static-frames", "huge-static-frames"],
)
def test_decode_work_over_the_budget_is_refused_at_once(http, server, good_request, video):
    """Kilobytes that would cost seconds to minutes of decoding: refused from the demux count, before
    any frame is decoded (the whole request, HTTP included, well within a second or two)."""
    payload = {**body(data_url(video())), "model": good_request["model"]}
    start = time.monotonic()
    response = post(http, payload)
    elapsed = time.monotonic() - start
    assert response.status_code == 413, response.text[:500]
    assert "QTSPLUS_MAX_DECODE_WORK" in response.json()["error"]["message"]
    assert elapsed < 2.0, elapsed
    assert http.get(server.url_for("health")).status_code == 200


@pytest.mark.parametrize(
    "name,video",
    [
        ("one-frame", lambda: hostile.flat_video(1, (48, 32))),
        ("1x1-pixel", lambda: hostile.flat_video(4, (1, 1))),
        ("control-characters", lambda: make_video_bytes(8, (32, 32))),
    ],
)
def test_edge_cases_that_are_valid_videos_are_served(http, good_request, name, video):
    text = "colour?\x00\x07\x1b[31m\u202e\ufeff" if name == "control-characters" else QUESTION
    response = post(http, {**body(data_url(video()), text=text), "model": good_request["model"]})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["usage"]["prompt_tokens"] > 0


def _video_lines(server) -> list[str]:
    return [line for line in server.log_tail(2000).splitlines() if "QTSplus video:" in line]


@pytest.mark.parametrize(
    "name, url, io_kwargs, frames",
    [
        ("max_frames-2", "good", {"max_frames": 2}, 2),  # was a 400 blaming min_frames
        ("max_frames-3", "good", {"max_frames": 3}, 2),
        # frames over QTSPLUS_DECODE_MAX_PIXELS: decoded scaled down, like a video's
        ("jpeg-frames-over-decode-limit", "jpeg-3mp", {}, 2),
        # vLLM keeps the first num_frames (default 32) frames of a data:video/jpeg list
        ("jpeg-list-of-40-keeps-32", "jpeg-40", {}, 32),
    ],
)
def test_valid_frame_settings_are_served(http, server, assets, good_request, name, url, io_kwargs, frames):
    # small frames, so that 32 of them stay under this server's QTSPLUS_MAX_VIT_PATCHES
    mm_kwargs = {"max_pixels": 64 * 28 * 28}
    urls = {
        "good": lambda: f"file://{assets[2]}",
        "jpeg-3mp": lambda: hostile.jpeg_frames_url([hostile.jpeg_frame((2000, 1500))] * 2),
        "jpeg-40": lambda: hostile.jpeg_frames_url(
            [hostile.jpeg_frame((32, 32), (6 * i, 9, 9)) for i in range(40)]
        ),
    }
    before = _video_lines(server)[-1:]
    payload = body(
        urls[url](),
        text=f"{QUESTION} Setting {name}.",
        media_io_kwargs={"video": io_kwargs},
        mm_processor_kwargs=mm_kwargs,
    )
    if not io_kwargs:
        del payload["media_io_kwargs"]
    response = post(http, {**payload, "model": good_request["model"]})
    assert response.status_code == 200, response.text[:500]
    for _ in range(50):  # the server's log line for this request (it is written before the answer)
        lines = _video_lines(server)
        if lines[-1:] != before:
            break
        time.sleep(0.1)
    assert lines[-1:] != before and f" frames={frames} " in lines[-1], lines[-3:]


def test_long_60fps_video_keeps_one_frame_per_second(http, server, good_request):
    """1200 frames at 60 fps (20 s): sampling keeps 20 frames, so the ViT sees 20, not 1200."""
    data = make_video_bytes(1200, (32, 32), fps=60.0, seed=9)
    marker = "how many squares are there right now?"
    response = post(http, {**body(data_url(data), text=marker), "model": good_request["model"]})
    assert response.status_code == 200, response.text[:500]
    lines = [line for line in server.log_tail(400).splitlines() if "QTSplus video:" in line]
    assert any(" frames=20 " in line for line in lines), lines[-3:]


def test_fetch_of_a_silent_server_times_out(http, good_request):
    """An http URL whose server accepts and never answers: a 504 at QTSPLUS_FETCH_DEADLINE_SECONDS (15 s;
    vLLM alone: VLLM_VIDEO_FETCH_TIMEOUT 5 s, 1 s back-off, a retry with 20 s = 26 s; 112 s with vLLM's
    default 3 attempts)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def hold() -> None:
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        start = time.monotonic()
        response = post(http, {**body(f"http://127.0.0.1:{port}/v.mp4"), "model": good_request["model"]})
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    # the upstream did not answer in time: 504 Gateway Timeout (was 400 before the statuses said whose fault)
    assert response.status_code == 504, response.text[:500]
    assert re.search(
        rf"cannot fetch the video_url http://\S+/v.mp4: the download did not finish within "
        rf"QTSPLUS_FETCH_DEADLINE_SECONDS={FETCH_DEADLINE} s \(stopped after 1\d\.\d s; "
        r"VLLM_VIDEO_FETCH_TIMEOUT=5 s per attempt, 2 attempts\)",
        response.json()["error"]["message"],
    ), response.json()["error"]["message"]
    assert FETCH_DEADLINE <= elapsed < FETCH_DEADLINE + 5, elapsed  # was 26 s


def test_silent_urls_in_flight_do_not_delay_a_valid_request(
    http, server, good_request, oracle, assets, media_server
):
    """More silent URLs in flight than vLLM has media threads (8): valid requests — a file:// video and
    an http:// one — are answered at once, exactly as the oracle says, while the silent ones are still
    held; those end at the deadline with a 504."""
    silent = 10
    good = assets[2]
    with (
        httpx.Client(base_url=server.base_url, timeout=120) as other,
        concurrent.futures.ThreadPoolExecutor(silent) as pool,
    ):
        start = time.monotonic()
        held = [
            pool.submit(
                post,
                other,
                {**body(f"{media_server}/silent", text=f"silent {i}"), "model": good_request["model"]},
            )
            for i in range(silent)
        ]
        while httpx.get(f"{media_server}/held").json() < silent:  # every silent fetch is connected
            assert time.monotonic() - start < FETCH_DEADLINE / 3, "the silent fetches did not all start"
            time.sleep(0.05)
        for url in (f"file://{good}", f"{media_server}/files/good.mp4"):
            valid, expected = bystander(good_request, oracle, good)
            valid = {
                **valid,
                **body(url, text=valid["messages"][0]["content"][-1]["text"]),
                "model": valid["model"],
            }
            valid["return_token_ids"] = True
            clock = time.monotonic()
            response = post(http, valid)
            latency = time.monotonic() - clock
            print(f"valid request ({url.split(':')[0]}) with {silent} silent URLs in flight: {latency:.2f} s")
            assert response.status_code == 200, response.text[:500]
            assert response.json()["choices"][0]["token_ids"] == expected
            assert latency < FETCH_DEADLINE / 3, (url, latency)
            assert not any(future.done() for future in held)  # the silent ones are still in flight
        answers = [future.result() for future in held]
        waited = time.monotonic() - start
    assert all(answer.status_code == 504 for answer in answers), [a.text[:200] for a in answers]
    assert all("QTSPLUS_FETCH_DEADLINE_SECONDS" in answer.json()["error"]["message"] for answer in answers)
    assert FETCH_DEADLINE <= waited < FETCH_DEADLINE + 10, waited
    assert http.get(server.url_for("health")).status_code == 200


def test_refusals_are_counted_in_metrics(server, http):
    """After the tests above: limit (413), fetch (400, 502, 504) and out-of-memory (503) refusals are counted."""
    text = http.get(server.url_for("metrics")).text
    counts = {
        status: float(line.rsplit(" ", 1)[1])
        for status in ("400", "413", "502", "503", "504")
        for line in text.splitlines()
        if line.startswith(f'qtsplus_rejected_requests_total{{status="{status}"}}')
    }
    assert counts.get("413", 0) >= 8 and counts.get("503", 0) >= 1 and counts.get("400", 0) >= 3, counts
    assert counts.get("502", 0) >= 3 and counts.get("504", 0) >= 11, counts  # 1 + 10 silent URLs
