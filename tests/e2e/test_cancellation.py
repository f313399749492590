"""Cancellation stops the work (issue 19 item 3), on a real server.

One ``vllm serve`` (tiny checkpoint). Eight requests each ask about a long 1280×720 30 fps H.264 video
(``QTSPLUS_CANCEL_MINUTES``, default 3: every frame must be decoded, tens of seconds of decoding for
the eight on 2 cores) sent as a ``file://`` URL, and their clients give up after ``ABORT_AFTER``
seconds — mid-decode: the first video streams in the processor, the others decode ahead in vLLM's
media threads. The client closing its connection makes vLLM cancel the request's task; asserted:

- the server's CPU (all its processes, user + system time over 1-s windows) is back to idle within
  ``IDLE_WITHIN`` seconds of the abort: no decoder runs on for an aborted request;
- ``qtsplus_cancelled_videos_total`` counts the eight videos and ``qtsplus_videos_in_flight`` is 0;
- the server still answers a video request after;
- the same for ``POST /v1/qtsplus/selection`` (the introspection endpoint, enabled with
  ``VLLM_PLUGINS=qtsplus``): its client giving up stops its video's decoding.

    flock /tmp/qtsplus-e2e.lock .venv/bin/python -m pytest tests/e2e/test_cancellation.py -s
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import time

import httpx
import psutil
import pytest

from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args
from qtsplus_vllm.testing.videos import make_long_video

MINUTES = float(os.environ.get("QTSPLUS_CANCEL_MINUTES", "3"))
REQUESTS = 8
ABORT_AFTER = 3.0  # seconds a client waits before it gives up (mid-decode)
IDLE_WITHIN = 2.0  # seconds after the abort by which the CPU must be idle
WINDOW = 1.0  # CPU is measured over windows of this length
IDLE_MARGIN = 0.25  # cores over the idle server's own use that still count as idle


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process and all its descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def cores_used(pid: int, seconds: float = WINDOW) -> float:
    before, clock = server_cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (server_cpu_seconds(pid) - before) / (time.monotonic() - clock)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cancellation")
    model = write_tiny_checkpoint(root / "model", seed=7)
    clock = time.perf_counter()
    videos = [make_long_video(root / f"long{i}.mp4", MINUTES * 60, seed=200 + i) for i in range(REQUESTS)]
    print(f"\ngenerated {REQUESTS} {MINUTES:g}-minute 720p30 videos in {time.perf_counter() - clock:.1f} s")
    short = make_video(root / "short.mp4", frames=8, size=(64, 48), fps=4.0, seed=1)
    return root, model, videos, short


@pytest.fixture(scope="module")
def server(assets, vllm_cache_root):
    root, model, _, _ = assets
    args = cpu_serve_args(max_model_len=2048, max_num_seqs=REQUESTS) + [
        "--allowed-local-media-path",
        str(root),
    ]
    with RemoteServer(model, args, env={"VLLM_PLUGINS": "qtsplus"}, cache_root=vllm_cache_root) as remote:
        yield remote


def body(model: str, video) -> dict:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                    {"type": "text", "text": "What happens in the video?"},
                ],
            }
        ],
        "max_tokens": 2,
        "temperature": 0.0,
    }


def give_up(base_url: str, payload: dict) -> str:
    """Send ``payload`` and close the connection after ``ABORT_AFTER`` seconds without an answer."""
    try:
        with httpx.Client(base_url=base_url, timeout=ABORT_AFTER) as client:
            response = client.post("/chat/completions", json=payload)
        return f"answered {response.status_code}"  # too early: the test fails on the counts
    except httpx.TimeoutException:
        return "aborted"


def idle_cores(server, http, name, short) -> float:
    """The idle server's CPU use, after a short video loaded the selection runtime and FFmpeg."""
    assert http.post("/chat/completions", json=body(name, short)).status_code == 200
    time.sleep(1.0)
    return min(cores_used(server.pid) for _ in range(3))


def assert_idle_soon(server, idle: float, aborted: float, what: str) -> None:
    """The server's CPU is back to ``idle`` within IDLE_WITHIN s of ``aborted`` and stays there."""
    windows = []
    while time.monotonic() - aborted < IDLE_WITHIN + 3 * WINDOW:
        start = time.monotonic() - aborted
        windows.append((start, cores_used(server.pid)))
    idle_from = next((start for start, used in windows if used <= idle + IDLE_MARGIN), None)
    print(
        f"\nidle server {idle:.2f} cores; after aborting {what} at {ABORT_AFTER:g} s: "
        + ", ".join(f"{start:.1f} s: {used:.2f}" for start, used in windows)
    )
    assert idle_from is not None and idle_from <= IDLE_WITHIN, windows
    # it stays idle: nothing was left running in the background
    assert all(used <= idle + IDLE_MARGIN for start, used in windows if start >= idle_from), windows


def test_aborted_long_videos_stop_decoding(assets, server):
    _, _, videos, short = assets
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        name = http.get("/models").json()["data"][0]["id"]
        idle = idle_cores(server, http, name, short)

        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            outcomes = list(pool.map(lambda v: give_up(server.base_url, body(name, v)), videos))
        aborted = time.monotonic()
        assert outcomes == ["aborted"] * REQUESTS, outcomes
        assert_idle_soon(server, idle, aborted, f"{REQUESTS} x {MINUTES:g}-min 720p30")

        text = http.get(server.url_for("metrics")).text
        assert metric(text, "qtsplus_cancelled_videos_total") == REQUESTS
        assert metric(text, "qtsplus_videos_in_flight") == 0
        assert "video(s) of a cancelled request stopped" in server.log_tail(2000)
        # the server still serves videos
        assert http.post("/chat/completions", json=body(name, short)).status_code == 200


def test_an_abandoned_selection_request_stops_decoding(assets, server):
    """``POST /v1/qtsplus/selection`` whose client gives up mid-decode: its work stops too."""
    _, _, videos, short = assets
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        name = http.get("/models").json()["data"][0]["id"]
        idle = idle_cores(server, http, name, short)
        cancelled = metric(http.get(server.url_for("metrics")).text, "qtsplus_cancelled_videos_total")

        payload = {"video": f"file://{videos[-1]}", "question": "What happens in the video?"}
        try:
            with httpx.Client(timeout=ABORT_AFTER) as client:
                response = client.post(server.url_for("v1", "qtsplus", "selection"), json=payload)
            pytest.fail(f"answered {response.status_code} before the client gave up: {response.text[:300]}")
        except httpx.TimeoutException:
            pass
        assert_idle_soon(
            server, idle, time.monotonic(), f"a selection request on a {MINUTES:g}-min 720p30 video"
        )

        text = http.get(server.url_for("metrics")).text
        assert metric(text, "qtsplus_cancelled_videos_total") == cancelled + 1
        assert metric(text, "qtsplus_videos_in_flight") == 0
        # the endpoint still answers
        answer = http.post("/qtsplus/selection", json={"video": f"file://{short}", "question": "Hi?"})
        assert answer.status_code == 200, answer.text
