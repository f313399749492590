"""vLLM's scale-out layouts on the CPU backend, each answering token for token like the oracle.

One server per layout, a few requests each (docs/deploying.md, "Scaling out"):

- ``-tp 2``: the LM split over two worker processes. vLLM's CPU backend needs
  ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (one core per rank) on a one-NUMA-node CPU, or the engine
  refuses to start.
- ``--api-server-count 2`` (with ``--mm-tensor-ipc torch_shm`` and ``--mm-ipc-gpu-memory-gb``, the two
  multimodal IPC options that QTSplus supports): each API server has its own selection runtime and
  ViT-feature cache, so a follow-up question hits the cache only on the server that saw the video;
  ``/metrics`` sums every API server's QTSplus metrics (multiprocess mode), whichever one answers.
- ``--data-parallel-size 2``: two engines, and (vLLM's default) two API servers.
- ``--mm-processor-device cpu``: refused at start-up, naming ``QTSPLUS_DEVICE``.

``-pp 2`` is not tested: vLLM 0.32's CPU model runner fails on the first request even for stock
Qwen2.5-VL on a text-only prompt (docs/deploying.md, "Scaling out").

Which API server handled a request is read from the server log: vLLM prefixes each API server's
lines with ``(ApiServer_<rank> pid=...)`` and the processor logs one ``QTSplus video:`` line per
selection, with ``vit_cache=hit|miss``. vLLM 0.32 accepts a new connection on the API server with the
fewest open connections, so a second connection held open next to a first lands on the other server
(checked from the log, not assumed).
"""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from qtsplus_vllm.reference import ReferencePipeline
from qtsplus_vllm.testing import make_video, write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, ServerStartupError, cpu_serve_args

QUESTIONS = ["What is moving in the video?", "Which colour is the background?"]
MAX_TOKENS = 6
# keep idle keep-alive connections (each pinned to one API server) open while the test works
SERVER_ENV = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "600"}
VIDEO_LINE = re.compile(r"^\((?P<proc>\w+) pid=\d+\).*QTSplus video: .* vit_cache=(?P<cache>hit|miss)")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-out")
    model = write_tiny_checkpoint(root / "model", seed=7)
    videos = {
        "v": make_video(root / "v.mp4", frames=24, size=(96, 64), fps=4.0, seed=1),
        "w": make_video(root / "w.mp4", frames=16, size=(64, 96), fps=4.0, seed=2),
    }
    return root, model, videos


@pytest.fixture(scope="module")
def oracle(assets):
    pipeline = ReferencePipeline(assets[1])
    answers = {}

    def expected(video: str, question: str):
        if (video, question) not in answers:
            answers[video, question] = pipeline.answer(assets[2][video], question, max_new_tokens=MAX_TOKENS)
        return answers[video, question]

    # computed before any server starts, so no request waits on the oracle
    for video in assets[2]:
        for question in QUESTIONS:
            expected(video, question)
    return expected


def serve_args(root, *extra: str) -> list[str]:
    # the real process layout (API server(s), engine core(s), workers)
    return cpu_serve_args(max_model_len=1024, in_process_worker=False) + [
        "--allowed-local-media-path", str(root), *extra,
    ]  # fmt: skip


class Connection:
    """An OpenAI client on one kept-alive HTTP connection, hence one API server."""

    def __init__(self, server: RemoteServer):
        self.server = server
        self.http = httpx.Client(
            timeout=600, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)
        )
        self.client = openai.OpenAI(
            base_url=server.base_url, api_key="EMPTY", max_retries=0, http_client=self.http
        )

    def metrics(self) -> dict[str, float]:
        text = self.http.get(self.server.url_for("metrics")).text
        names = (
            "qtsplus_feature_cache_hits_total",
            "qtsplus_feature_cache_misses_total",
            "qtsplus_feature_cache_entries",
            "qtsplus_selected_tokens_count",
        )
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in names:
                values[name] = float(value)
        return values

    def close(self) -> None:
        self.http.close()


class Session:
    """Requests on one server, each checked against the oracle and tied to its ``QTSplus video:`` line."""

    def __init__(self, server: RemoteServer, assets, oracle):
        self.server, self.assets, self.oracle = server, assets, oracle
        self.records: list[tuple[str, str, str]] = []  # (API server, video, hit|miss) per request

    def _video_lines(self) -> list[re.Match]:
        text = self.server.log_path.read_text(errors="replace")
        return [m for m in map(VIDEO_LINE.match, text.splitlines()) if m]

    def ask(self, conn: Connection, video: str, question: str) -> tuple[str, str]:
        """(the API server that selected, hit|miss) for ``question`` about ``video``."""
        before = len(self._video_lines())
        response = conn.client.chat.completions.create(
            model=self.server.served_model_name,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"file://{self.assets[2][video]}"}},
                {"type": "text", "text": question},
            ]}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        expected = self.oracle(video, question)
        assert response.prompt_token_ids == expected.prompt_ids, (video, question)
        assert response.choices[0].token_ids == expected.token_ids, (video, question)
        deadline = time.monotonic() + 10  # the line is written before the answer; allow for buffering
        while len(lines := self._video_lines()) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        new = lines[before:]
        assert len(new) == 1, f"expected one QTSplus video line for this request, got {len(new)}"
        record = (new[0]["proc"], video, new[0]["cache"])
        self.records.append(record)
        return record[0], record[2]

    def expected_metrics(self) -> dict[str, float]:
        return {
            "qtsplus_feature_cache_hits_total": sum(r[2] == "hit" for r in self.records),
            "qtsplus_feature_cache_misses_total": sum(r[2] == "miss" for r in self.records),
            # one entry per (API server, video): every server keeps its own cache
            "qtsplus_feature_cache_entries": len({(r[0], r[1]) for r in self.records}),
            "qtsplus_selected_tokens_count": len(self.records),
        }


def second_api_server(session: Session, first: Connection, first_server: str) -> tuple[Connection, list]:
    """A connection on the other API server, found by asking about video "w" (never asked before)."""
    held = []
    # a new question each time: a repeated request would be answered by vLLM's processor cache
    for question in (QUESTIONS[0], "Describe the video.", "What happens first?", "Is it day or night?"):
        conn = Connection(session.server)
        held.append(conn)
        where, cache = session.ask(conn, "w", question)
        if where != first_server:
            assert cache == "miss"
            return conn, held
    pytest.fail(f"four connections opened next to a held one all landed on {first_server}: {session.records}")


def test_tensor_parallel_2(assets, oracle, vllm_cache_root):
    root, model, _ = assets
    env = {**SERVER_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with RemoteServer(model, serve_args(root, "-tp", "2"), env=env, cache_root=vllm_cache_root) as server:
        session, conn = Session(server, assets, oracle), Connection(server)
        assert session.ask(conn, "v", QUESTIONS[0])[1] == "miss"
        assert session.ask(conn, "v", QUESTIONS[1])[1] == "hit"  # a follow-up question: the ViT is skipped
        assert session.ask(conn, "w", QUESTIONS[1])[1] == "miss"
        assert conn.metrics() == session.expected_metrics()
        conn.close()


def test_two_api_servers_keep_their_own_feature_cache(assets, oracle, vllm_cache_root):
    """--api-server-count 2, with the supported IPC options torch_shm and mm-ipc-gpu-memory-gb."""
    root, model, _ = assets
    args = serve_args(
        root, "--api-server-count", "2", "--mm-tensor-ipc", "torch_shm", "--mm-ipc-gpu-memory-gb", "1"
    )
    env = {**SERVER_ENV, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}  # vLLM's requirement for torch_shm
    with RemoteServer(model, args, env=env, cache_root=vllm_cache_root) as server:
        session, a = Session(server, assets, oracle), Connection(server)
        first, cache = session.ask(a, "v", QUESTIONS[0])
        assert first.startswith("ApiServer_") and cache == "miss"
        assert session.ask(a, "v", QUESTIONS[1]) == (first, "hit")
        b, held = second_api_server(session, a, first)
        other = session.records[-1][0]
        # the other server never saw "v": its own cache misses, then serves its follow-up
        assert session.ask(b, "v", QUESTIONS[0]) == (other, "miss")
        assert session.ask(b, "v", QUESTIONS[1]) == (other, "hit")
        assert session.ask(a, "w", QUESTIONS[1])[0] == first
        # /metrics is multiprocess: every API server's counts, whichever server answers
        expected = session.expected_metrics()
        assert a.metrics() == expected
        assert b.metrics() == expected
        for conn in [a, *held]:
            conn.close()


def test_data_parallel_2(assets, oracle, vllm_cache_root):
    """Two engines behind two API servers (vLLM's default for --data-parallel-size 2)."""
    root, model, _ = assets
    env = {**SERVER_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    args = serve_args(root, "--data-parallel-size", "2")
    with RemoteServer(model, args, env=env, cache_root=vllm_cache_root) as server:
        session, a = Session(server, assets, oracle), Connection(server)
        first, _ = session.ask(a, "v", QUESTIONS[0])
        b, held = second_api_server(session, a, first)
        assert session.ask(b, "v", QUESTIONS[1]) == (session.records[-1][0], "miss")
        assert session.ask(a, "v", QUESTIONS[1]) == (first, "hit")
        assert a.metrics() == session.expected_metrics()
        for conn in [a, *held]:
            conn.close()


def test_mm_processor_device_is_refused_at_start_up(assets, vllm_cache_root):
    root, model, _ = assets
    args = serve_args(root, "--mm-processor-device", "cpu")
    with pytest.raises(ServerStartupError) as err:
        with RemoteServer(model, args, cache_root=vllm_cache_root, startup_timeout=300):
            pass
    message = str(err.value)
    assert "exited with code" in message
    assert "DeploymentError: --mm-processor-device" in message and "QTSPLUS_DEVICE" in message


def test_a_bad_setting_is_refused_at_start_up(assets, vllm_cache_root):
    """Any bad QTSPLUS_* value stops `vllm serve`, each named in the settings' one format (issue 21)."""
    root, model, _ = assets
    env = {"QTSPLUS_MAX_FRAMES": "1", "QTSPLUS_DEVICE": "gpu:0"}
    with pytest.raises(ServerStartupError) as err:
        with RemoteServer(model, serve_args(root), env=env, cache_root=vllm_cache_root, startup_timeout=300):
            pass
    message = str(err.value)
    assert "exited with code" in message
    assert "QTSPLUS_MAX_FRAMES='1': must be an integer >= 2 (frames kept per video" in message
    assert "QTSPLUS_DEVICE='gpu:0': must be cpu or cuda[:N]" in message
