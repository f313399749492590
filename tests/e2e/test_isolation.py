"""Isolation under concurrency, and a soak of mixed valid and invalid requests.

4 videos × 4 questions, fp32, greedy. Each (video, question) is first served alone; then 32
requests (every pair twice, shuffled) arrive at once, and every answer must equal the lone one
token for token — with prefix caching on and off (one server each). Nothing may leak through
vLLM's encoder cache or prefix cache, or through our runtime.

vLLM's processor cache is off on both servers (``--mm-processor-cache-gb 0``): with it, repeated
requests would be answered from it without running the selection at all. So every request here
runs the selection runtime — the metrics prove it — and on the server without prefix caching the
ViT-feature cache is off too, so every request also runs the ViT.

The soak (prefix caching on) sends ``QTSPLUS_SOAK_REQUESTS`` (default 240) requests, half of them
invalid in assorted ways, 8 at a time: every valid answer must be right, every invalid one a 4xx,
the server healthy at the end, and its memory (RSS of all its processes) must level off: the
second half of the soak may not grow it by more than a small fraction of the first.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import random

import httpx
import psutil
import pytest

from qtsplus_vllm.testing import hostile, make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

QUESTIONS = [
    "What is moving in the video?",
    "Which colour is the background?",
    "How many squares are there?",
    "Does anything change at the end?",
]
MAX_TOKENS = 8
SOAK_REQUESTS = int(os.environ.get("QTSPLUS_SOAK_REQUESTS", "240"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    model = write_tiny_checkpoint(root / "model", seed=23)
    videos = [
        make_video(root / f"v{i}.mp4", frames=frames, size=size, fps=4.0, seed=40 + i)
        for i, (frames, size) in enumerate([(16, (64, 48)), (24, (48, 64)), (20, (96, 64)), (12, (64, 64))])
    ]
    return root, model, videos


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-caching", "no-prefix-caching"])
def server(request, assets, vllm_cache_root):
    root, model, _ = assets
    args = cpu_serve_args(max_model_len=2048, in_process_worker=False, prefix_caching=request.param) + [
        "--dtype", "float32",
        "--allowed-local-media-path", str(root),
        "--trust-request-mm-kwargs",
        "--mm-processor-cache-gb", "0",
    ]  # fmt: skip
    env = {} if request.param else {"QTSPLUS_FEATURE_CACHE_BYTES": "0"}
    with RemoteServer(model, args, env=env, cache_root=vllm_cache_root) as remote:
        remote.prefix_caching = request.param
        yield remote


def runtime_counts(http) -> tuple[float, float]:
    """(selector runs, ViT runs) so far, from the server's /metrics."""
    counts = {"qtsplus_selector_seconds_count": 0.0, "qtsplus_vit_seconds_count": 0.0}
    for line in http.get(http.base_url.join("/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        if name in counts:
            counts[name] = float(value)
    return counts["qtsplus_selector_seconds_count"], counts["qtsplus_vit_seconds_count"]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        client.model_name = client.get("/models").json()["data"][0]["id"]
        yield client


def request_body(model: str, video, question: str) -> dict:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "return_token_ids": True,
    }


def outcome(response: httpx.Response) -> tuple[list[int], list[int]]:
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    return answer["prompt_token_ids"], answer["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def alone(http, assets):
    """Each (video, question) served with nothing else in flight."""
    return {
        (v, q): outcome(http.post("/chat/completions", json=request_body(http.model_name, video, question)))
        for v, video in enumerate(assets[2])
        for q, question in enumerate(QUESTIONS)
    }


def test_32_concurrent_requests_equal_their_lone_answers(http, server, assets, alone):
    pairs = list(alone) * 2
    selector_before, vit_before = runtime_counts(http)
    random.Random(0).shuffle(pairs)

    def send(pair):
        v, q = pair
        return pair, http.post(
            "/chat/completions", json=request_body(http.model_name, assets[2][v], QUESTIONS[q])
        )

    with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
        results = list(pool.map(send, pairs))
    assert len(results) == 32
    for pair, response in results:
        assert outcome(response) == alone[pair], f"video {pair[0]}, question {pair[1]}"
    selector_after, vit_after = runtime_counts(http)
    assert selector_after - selector_before == 32  # no answer came from a cache of vLLM's
    if not server.prefix_caching:  # feature cache off: the ViT ran for every request too
        assert vit_after - vit_before == 32
    # the selection depends on the question: the same video gets different prompts
    assert len({tuple(alone[(0, q)][0]) for q in range(len(QUESTIONS))}) > 1


def _invalid_requests(model: str, video) -> list[dict]:
    def with_url(url: str) -> dict:
        return request_body(model, "", "What happens?") | {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": url}},
                        {"type": "text", "text": "What happens?"},
                    ],
                }
            ]
        }

    def data(blob: bytes) -> str:
        return "data:video/mp4;base64," + base64.b64encode(blob).decode()

    return [
        with_url(data(hostile.corrupt_bytes(2048, seed=1))),
        with_url(data(hostile.truncated_mp4())),
        with_url(data(hostile.audio_only(0.2))),
        with_url(data(hostile.png_image())),
        with_url(data(hostile.flat_video(2, (402, 2)))),
        with_url("file:///etc/hostname"),
        request_body(model, video, "What?") | {"mm_processor_kwargs": {"qtsplus_rho_scale": -1}},
        request_body(model, video, "What?") | {"mm_processor_kwargs": {"no_such_key": 1}},
        request_body(model, video, "What?") | {"media_io_kwargs": {"video": {"fps": 0}}},
    ]


def _rss(pid: int) -> int:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_soak_mixed_valid_and_invalid(http, server, assets, alone):
    if not server.prefix_caching:
        pytest.skip("one soak is enough: it runs on the prefix-caching server")
    rng = random.Random(1)
    invalid = _invalid_requests(http.model_name, assets[2][0])
    plan = []
    for _ in range(SOAK_REQUESTS):
        if rng.random() < 0.5:
            plan.append(("valid", rng.choice(list(alone))))
        else:
            plan.append(("invalid", rng.randrange(len(invalid))))

    def send(item):
        kind, key = item
        if kind == "valid":
            v, q = key
            payload = request_body(http.model_name, assets[2][v], QUESTIONS[q])
        else:
            payload = invalid[key]
        return item, http.post("/chat/completions", json=payload)

    def run(items) -> list:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(send, items))

    half = len(plan) // 2
    selector_before, _ = runtime_counts(http)
    before = _rss(server.pid)
    first = run(plan[:half])
    middle = _rss(server.pid)
    second = run(plan[half:])
    after = _rss(server.pid)

    for (kind, key), response in first + second:
        if kind == "valid":
            assert outcome(response) == alone[key]
        else:
            assert 400 <= response.status_code < 500, (key, response.status_code, response.text[:300])
            assert response.json()["error"]["message"]
    assert http.get(server.url_for("health")).status_code == 200
    valid = sum(kind == "valid" for kind, _ in plan)
    assert runtime_counts(http)[0] - selector_before == valid  # every valid request ran the selection
    growth = after - middle
    print(
        f"soak RSS MiB: before {before / 2**20:.0f}, middle {middle / 2**20:.0f}, after {after / 2**20:.0f}"
    )
    assert growth < max(64 * 2**20, 0.05 * middle), (before, middle, after)
