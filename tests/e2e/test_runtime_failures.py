"""Selection-runtime failures as a real client sees them: 503 with the reason, and an honest /health.

One server whose selection runtime fails to load — first for lack of memory, then with a sticky
CUDA error (fault injection, tests/e2e/faults: ``QTSPLUS_TEST_LOAD_FAILURES``), retried at once
(``QTSPLUS_RUNTIME_RETRY_SECONDS=0``). Each video request, in the chat path (the ``openai`` client)
and the introspection endpoint, must get HTTP 503 with the failure in its message — never a bare
500 — and after the sticky error ``/health`` must answer 503 and the runtime must never be loaded
again in that process, while text-only requests, which need no runtime, are still served.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import openai
import pytest

from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

FAULTS = Path(__file__).parent / "faults"
LOAD_ATTEMPT = "QTSPLUS-TEST: runtime load attempt"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-failures")
    model = write_tiny_checkpoint(root / "model", seed=3)
    video = make_video(root / "v.mp4", frames=8, size=(64, 48), fps=4.0, seed=2)
    return root, model, video


@pytest.fixture(scope="module")
def server(assets, vllm_cache_root):
    root, model, _ = assets
    args = cpu_serve_args(max_model_len=1024) + ["--allowed-local-media-path", str(root)]
    # the faults directory first; the rest of PYTHONPATH (the checkout under test) after it
    pythonpath = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {
        "PYTHONPATH": pythonpath,
        "QTSPLUS_TEST_LOAD_FAILURES": "oom,sticky",
        "QTSPLUS_RUNTIME_RETRY_SECONDS": "0",
        "VLLM_PLUGINS": "qtsplus",  # the introspection endpoint too
    }
    with RemoteServer(model, args, env=env, cache_root=vllm_cache_root) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server):
    return server.get_client(timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url_root, timeout=120) as h:
        yield h


def ask_video(client, server, video: Path, question: str):
    return client.chat.completions.create(
        model=server.served_model_name,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        max_tokens=4,
        temperature=0.0,
    )


def load_attempts(server) -> int:
    return sum(LOAD_ATTEMPT in line for line in server.log_tail(5000).splitlines())


def test_runtime_failures_answer_503_with_the_reason(server, client, http, assets):
    video = assets[2]
    # 1. the load runs out of memory: 503 naming it (was 500 Internal Server Error), /health still 200
    with pytest.raises(openai.APIStatusError) as err:
        ask_video(client, server, video, "What moves? (first)")
    assert err.value.status_code == 503, (err.value.status_code, err.value.message)
    assert re.search(r"selection runtime could not be loaded: OutOfMemoryError", err.value.message), err.value
    assert load_attempts(server) == 1
    assert http.get("/health").status_code == 200  # out of memory is not the device's death

    # 2. the retry meets a sticky CUDA error: 503 naming it, and the server reports itself dead
    with pytest.raises(openai.APIStatusError) as err:
        ask_video(client, server, video, "What moves? (second)")
    assert err.value.status_code == 503, (err.value.status_code, err.value.message)
    assert re.search(r"device failed while loading.*illegal memory access.*restarted", err.value.message), (
        err.value.message
    )
    assert load_attempts(server) == 2
    assert http.get("/health").status_code == 503  # was 200: the load was retried on a poisoned context

    # 3. later video requests: 503 at once, with no further load (QTSPLUS_RUNTIME_RETRY_SECONDS is 0)
    for i in range(2):
        with pytest.raises(openai.APIStatusError) as err:
            ask_video(client, server, video, f"What moves? (later {i})")
        assert err.value.status_code == 503, (err.value.status_code, err.value.message)
        assert re.search(
            r"selection device failed earlier.*illegal memory access.*restarted", err.value.message
        )
    response = http.post(
        "/v1/qtsplus/selection", json={"video": f"file://{video}", "question": "What moves?"}
    )
    assert response.status_code == 503, response.text[:500]  # was 500
    assert "restarted" in response.json()["error"]["message"], response.text[:500]
    assert load_attempts(server) == 2
    assert http.get("/health").status_code == 503

    # text-only requests never touch the runtime: still served
    answer = client.chat.completions.create(
        model=server.served_model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert answer.usage.prompt_tokens > 0
