"""qtsplus-eval against a scripted OpenAI-compatible server that answers from a known table.

The server (http.server in a thread) streams chat completions the way vLLM does (role chunk, text,
finish, usage chunk, [DONE]) and answers each (question, mode) from a table fixed here, so the
accuracies, intervals, the paired test, the failure accounting and the resume are checked exactly.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from qtsplus_vllm.eval import report
from qtsplus_vllm.eval.cli import main
from qtsplus_vllm.eval.client import ClientConfig, read_records, run
from qtsplus_vllm.eval.datasets import load_choice
from qtsplus_vllm.eval.modes import build_modes
from qtsplus_vllm.eval.stats import bootstrap_accuracy, bootstrap_paired_difference

ROOT = Path(__file__).resolve().parents[2]
N = 12
GOLD = "ABCDABCDABCD"
ON_RIGHT = set(range(9))  # on: 0-8 right, 9 and 10 a wrong letter, 11 no letter
OFF_RIGHT = {0, 1, 2, 3, 4, 5, 9}  # off: 10 always HTTP 500, 3 answered on the second attempt


def _wrong(letter: str) -> str:
    return "ABCD"[("ABCD".index(letter) + 1) % 4]


class ScriptedServer:
    """An OpenAI-compatible endpoint whose replies come from ``script(item index, body, attempt)``."""

    def __init__(self, script, delay: float = 0.0) -> None:
        self.script = script
        self.delay = delay
        self.requests: list[dict] = []  # every chat body received
        self.video_checks: list[bool] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
                else:
                    self._json(404, {"error": "no"})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"][1]["text"]
                index = int(text.split("question ", 1)[1].split(":", 1)[0])
                with outer.lock:
                    outer.requests.append(body)
                    attempt = sum(
                        1
                        for b in outer.requests
                        if b["messages"][-1]["content"][1]["text"] == text
                        and b.get("mm_processor_kwargs") == body.get("mm_processor_kwargs")
                    )
                url = body["messages"][-1]["content"][0]["video_url"]["url"]
                if url.startswith("http://"):
                    with urllib.request.urlopen(url, timeout=10) as response:
                        outer.video_checks.append(response.read() == f"video {index}".encode())
                code, reply, prompt_tokens, delay = outer.script(index, body, attempt)
                time.sleep(delay or outer.delay)
                if code != 200:
                    self._json(code, {"error": {"message": f"scripted {code}"}})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                base = {"id": "c", "object": "chat.completion.chunk", "model": "scripted"}
                chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
                chunks += [{**base, "choices": [{"index": 0, "delta": {"content": reply}}]}]
                chunks += [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": 1,
                    "total_tokens": prompt_tokens + 1,
                }
                chunks += [{**base, "choices": [], "usage": usage}]
                for k, chunk in enumerate(chunks):
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if k == 0:
                        time.sleep(0.01)  # TTFT < latency
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def table_script(index: int, body: dict, attempt: int):
    """The known table: (HTTP status, reply, prompt tokens, delay)."""
    select = (body.get("mm_processor_kwargs") or {}).get("qtsplus_select")
    gold = GOLD[index]
    if select is False:
        if index == 10:
            return 500, "", 0, 0
        if index == 3 and attempt == 1:
            return 503, "", 0, 0
        return 200, gold if index in OFF_RIGHT else _wrong(gold), 400 + index, 0
    tokens = 100 + index if "qtsplus_rho_max" not in body["mm_processor_kwargs"] else 50 + index
    if index == 11:
        return 200, "I cannot tell from this video.", tokens, 0
    return 200, f"The answer is {gold if index in ON_RIGHT else _wrong(gold)}.", tokens, 0


def write_choice_set(root: Path, n: int = N) -> Path:
    lines = []
    for k in range(n):
        (root / f"clip{k}.mp4").write_bytes(f"video {k}".encode())
        options = {c: f"option {c} of {k}" for c in "ABCD"}
        task = "even" if k % 2 == 0 else "odd"
        lines.append({"vision_id": f"clip{k}.mp4", "question": f"question {k}: what moves?", "options": options,
                      "answer": GOLD[k], "task": task})  # fmt: skip
    path = root / "choice.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_scripted_run_scores_exactly(tmp_path):
    data = write_choice_set(tmp_path)
    out = tmp_path / "out"
    with ScriptedServer(table_script) as server:
        code = main(
            ["run", "--data", str(data), "--base-url", server.url, "--out", str(out), "--modes", "on", "off",
             "--rho-sweep", "0.5", "--video-access", "http", "--retries", "2", "--retry-backoff", "0.01",
             "--concurrency", "3", "--no-progress"]
        )  # fmt: skip
        assert code == 0
        assert server.video_checks and all(server.video_checks)  # the videos came over our HTTP server
        rho_bodies = [b for b in server.requests if "qtsplus_rho_max" in b["mm_processor_kwargs"]]
        assert len(rho_bodies) == N and all(
            b["mm_processor_kwargs"]["qtsplus_rho_max"] == 0.5 for b in rho_bodies
        )
        assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in server.requests)
        assert len(server.requests) == 3 * N + 2 + 1  # + item 10's two retries off, + item 3's retry
    summary = json.loads((out / report.SUMMARY).read_text())
    on, off, rho = summary["modes"]
    assert [on["mode"], off["mode"], rho["mode"]] == ["on", "off", "rho_max=0.5"]

    on_correct = [k in ON_RIGHT for k in range(N)]
    assert (on["items"], on["answered"], on["failed"], on["unparsed"]) == (12, 12, 0, 1)
    assert on["accuracy"] == 9 / 12 and on["unparsed_rate"] == 1 / 12
    assert on["ci95"] == list(bootstrap_accuracy(on_correct))
    assert on["prompt_tokens"]["mean"] == pytest.approx(100 + 5.5)
    assert rho["prompt_tokens"]["mean"] == pytest.approx(50 + 5.5) and rho["accuracy"] == 9 / 12

    # off: item 10 failed (never a wrong answer), item 3 right after a retry
    assert (off["items"], off["answered"], off["failed"]) == (12, 11, 1)
    assert off["accuracy"] == 7 / 11
    assert "HTTP 500" in off["failures"][0]
    records = {r["id"]: r for r in read_records(out / report.RESULTS) if r["mode"] == "off"}
    assert records["line4"]["attempts"] == 2 and records["line4"]["correct"]  # item 3 is line 4
    assert records["line11"]["status"] == "failed" and records["line11"]["attempts"] == 3
    assert records["line11"]["http_status"] == 500 and "correct" not in records["line11"]

    # the groups: even and odd items
    even = [k for k in range(N) if k % 2 == 0]
    assert on["groups"]["task"]["even"]["accuracy"] == sum(k in ON_RIGHT for k in even) / len(even)
    assert off["groups"]["task"]["even"]["n"] == 5 and off["groups"]["task"]["odd"]["n"] == 6  # 10 failed
    # latencies and TTFT were measured from the stream
    for m in summary["modes"]:
        assert (
            0 < m["ttft_s"]["p50"] <= m["latency_s"]["p50"] and m["latency_s"]["p90"] >= m["latency_s"]["p50"]
        )

    # paired on vs off over the 11 items both answered: only-on right 6, 7, 8; only-off right 9
    paired = {p["mode"]: p for p in summary["paired"]}
    p = paired["on"]
    assert p["baseline"] == "off" and p["n"] == 11
    assert (p["only_baseline_right"], p["only_mode_right"]) == (1, 3)
    assert p["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16)  # 0.625
    assert p["difference"] == pytest.approx((9 - 7) / 11)
    common = [k for k in range(N) if k != 10]
    expected_ci = bootstrap_paired_difference(
        [k in OFF_RIGHT for k in common], [k in ON_RIGHT for k in common]
    )
    assert p["ci95"] == list(expected_ci)
    assert p["changed"] == pytest.approx(5 / 11)  # 6, 7, 8, 9 and 11 (no letter vs a letter)

    table = (out / report.TABLE).read_text()
    assert "| on | 12 | 0 | 1 | 75.0 [" in table and "| off | 11 | 1 | 0 | 63.6 [" in table
    assert "| on vs off | 11 | +18.2 [" in table and "| 0.625 | 45.5 % |" in table
    assert (out / report.PLOT).stat().st_size > 1000
    run_info = json.loads((out / report.RUN_INFO).read_text())
    assert run_info["model"] == "scripted" and run_info["dataset"]["items"] == N

    # a second run finds everything answered but off's failed item, and asks only that again
    with ScriptedServer(table_script) as server:
        assert main(["run", "--data", str(data), "--base-url", server.url, "--out", str(out), "--modes", "on",
                     "off", "--rho-sweep", "0.5", "--retries", "0", "--no-progress"]) == 0  # fmt: skip
        assert len(server.requests) == 1
    # report alone rewrites the same summary
    assert main(["report", str(out)]) == 0
    assert json.loads((out / report.SUMMARY).read_text())["paired"] == summary["paired"]


def _run(items, mode_specs, server, out, **cfg):
    config = ClientConfig(base_url=server.url, **cfg)
    modes = build_modes(mode_specs)
    return asyncio.run(run(items, modes, config, out, lambda p: p.resolve().as_uri(), progress=False))


def test_timeouts_are_retried_and_reported_as_failures(tmp_path):
    items = load_choice(write_choice_set(tmp_path, 2)).items

    def script(index, body, attempt):
        return 200, "A", 10, 2.0 if index == 1 else 0.001

    with ScriptedServer(script) as server:
        result = _run(items, ["on"], server, tmp_path / "r.jsonl", timeout=0.5, retries=1, backoff=0.01)
    assert (result.asked, result.failed) == (2, 1)
    failed = [r for r in read_records(tmp_path / "r.jsonl") if r["status"] == "failed"]
    assert len(failed) == 1 and "timed out" in failed[0]["error"] and failed[0]["attempts"] == 2


def test_client_errors_are_not_retried(tmp_path):
    items = load_choice(write_choice_set(tmp_path, 1)).items
    with ScriptedServer(lambda index, body, attempt: (400, "", 0, 0)) as server:
        _run(items, ["off"], server, tmp_path / "r.jsonl", retries=3, backoff=0.01)
        assert len(server.requests) == 1
    (record,) = read_records(tmp_path / "r.jsonl")
    assert record["status"] == "failed" and record["http_status"] == 400 and record["attempts"] == 1


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"mode": "on", "id": "a", "status": "ok"}\n{"mode": "on", "id": "b", "sta')
    assert [r["id"] for r in read_records(path)] == ["a"]


def test_a_killed_run_resumes_without_repeating_finished_items(tmp_path):
    data = write_choice_set(tmp_path)
    out = tmp_path / "out"
    results = out / report.RESULTS
    args = [
        "run",
        "--data",
        str(data),
        "--out",
        str(out),
        "--modes",
        "on",
        "--concurrency",
        "1",
        "--no-progress",
    ]
    with ScriptedServer(table_script, delay=0.3) as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "qtsplus_vllm.eval", *args, "--base-url", server.url],
            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if results.is_file() and len(results.read_text().splitlines()) >= 4:
                    break
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        first = {r["id"] for r in read_records(results)}
        assert 4 <= len(first) < N
        asked_before = len(server.requests)  # the finished ones, and at most one in flight
        assert len(first) <= asked_before <= len(first) + 1
        assert main([*args, "--base-url", server.url]) == 0
        texts = [b["messages"][-1]["content"][1]["text"] for b in server.requests]
    # every item asked once, except at most the one in flight when the run was killed
    assert len(set(texts)) == N and len(texts) - N == asked_before - len(first)
    records = read_records(results)
    assert len(records) == N and {r["id"] for r in records} == {f"line{k}" for k in range(1, N + 1)}
    assert json.loads((out / report.SUMMARY).read_text())["modes"][0]["accuracy"] == 9 / 12


def test_video_server_serves_only_the_evaluated_files(tmp_path):
    from qtsplus_vllm.eval.media import VideoServer

    video = tmp_path / "a b.mp4"
    video.write_bytes(b"0123456789")
    (tmp_path / "secret.txt").write_text("no")
    with VideoServer([video]) as server:
        url = server.url(video)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == b"0123456789" and response.headers["Content-Length"] == "10"
        root = url.split("/v/")[0]
        for path in ("/secret.txt", "/v/0/secret.txt", "/v/1/a%20b.mp4", "/v/0/../secret.txt", "/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(root + path, timeout=10)
            assert err.value.code == 404


def _write_run(directory: Path, mode: str, right: list[bool], preds: list[str], tokens: int) -> Path:
    directory.mkdir(parents=True)
    lines = [
        {"mode": mode, "id": f"q{k}", "status": "ok", "answer": "A", "pred": pred, "correct": ok,
         "prompt_tokens": tokens, "ttft_s": 0.1, "latency_s": 0.2, "groups": {}}
        for k, (ok, pred) in enumerate(zip(right, preds, strict=True))
    ]  # fmt: skip
    (directory / report.RESULTS).write_text("".join(json.dumps(line) + "\n" for line in lines))
    info = {"endpoint": f"http://{directory.name}", "model": "m", "modes": [{"name": mode, "settings": {}}]}
    (directory / report.RUN_INFO).write_text(json.dumps(info))
    return directory


def test_combine_pairs_runs_of_two_endpoints(tmp_path):
    # stock vLLM ("default" mode) against our server ("on"), the same 10 items
    stock = [True] * 6 + [False] * 4
    ours = [True] * 5 + [False] + [True] * 2 + [False] * 2  # q5 lost, q6 and q7 gained
    _write_run(tmp_path / "stock", "default", stock, ["A" if x else "B" for x in stock], 1000)
    _write_run(tmp_path / "ours", "on", ours, ["A" if x else "C" for x in ours], 300)
    out = tmp_path / "both"
    assert main(["combine", str(out), f"stock={tmp_path / 'stock'}", f"ours={tmp_path / 'ours'}"]) == 0
    summary = json.loads((out / report.SUMMARY).read_text())
    assert [m["mode"] for m in summary["modes"]] == ["stock:default", "ours:on"]
    (p,) = summary["paired"]
    assert (p["baseline"], p["mode"], p["n"]) == ("stock:default", "ours:on", 10)
    assert (p["only_baseline_right"], p["only_mode_right"]) == (1, 2)
    assert p["mcnemar_p"] == 1.0 and p["difference"] == pytest.approx(0.1)
    assert p["changed"] == pytest.approx(5 / 10)  # q5-q9: every item where either is wrong
    assert main(["report", str(out), "--baseline", "ours:on"]) == 0
    assert json.loads((out / report.SUMMARY).read_text())["paired"][0]["baseline"] == "ours:on"
    assert main(["report", str(out), "--baseline", "nope"]) == 2
    assert main(["combine", str(out), "no-equals-sign"]) == 2


def test_run_usage_errors(tmp_path, capsys):
    data = write_choice_set(tmp_path, 1)
    base = ["run", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--data", str(tmp_path / "nothing"), "--base-url", "http://127.0.0.1:9"]) == 2
    assert (
        main([*base, "--data", str(data), "--base-url", "http://127.0.0.1:9", "--modes", "colour=red"]) == 2
    )
    # nothing listens on port 9: the model cannot be listed, said before any item is asked
    assert main([*base, "--data", str(data), "--base-url", "http://127.0.0.1:9"]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_an_unexpected_reply_is_a_failure_not_a_crash(tmp_path):
    items = load_choice(write_choice_set(tmp_path, 2)).items

    class Odd(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": 5}\n\ndata: [DONE]\n\n')

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = ClientConfig(base_url=f"http://127.0.0.1:{server.server_address[1]}", model="m", retries=0)
        result = asyncio.run(
            run(
                items, build_modes(["on"]), config, tmp_path / "r.jsonl", lambda p: p.as_uri(), progress=False
            )
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (result.asked, result.failed) == (2, 2)
    assert all("client error: TypeError" in r["error"] for r in read_records(tmp_path / "r.jsonl"))


def test_the_baseline_is_the_first_off_mode():
    def records(mode, right):
        return [{"mode": mode, "id": f"q{k}", "status": "ok", "pred": "A" if r else "B", "correct": r}
                for k, r in enumerate(right)]  # fmt: skip

    rs = records("on,fps=2", [True, True]) + records("off,fps=2", [True, False])
    summary = report.summarize(rs)
    assert [(p["baseline"], p["mode"]) for p in summary["paired"]] == [("off,fps=2", "on,fps=2")]
    assert report.summarize(rs, baseline="on,fps=2")["paired"][0]["mode"] == "off,fps=2"
    with pytest.raises(ValueError):
        report.summarize(rs, baseline="off")
