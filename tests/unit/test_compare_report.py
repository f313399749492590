"""compare_serving tooling: compare_report (table, ratios, plots), the /metrics sampler, KV sizing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import compare_report  # noqa: E402


def _result(system: str, video: str, rps: float, ttft: float, failed: int = 0, cpu=(90.0, 9.0, 45.0)) -> dict:
    pct = lambda v: {"p50": v, "p90": v * 1.5, "p99": v * 2, "mean": v}  # noqa: E731
    return {
        "benchmark": "serving",
        "system": system,
        "server_processes": {
            "processes": [
                {"name": "vllm", "cpu_s": cpu[0], "peak_rss_gib": 3.0},
                {"name": "VLLM::EngineCore", "cpu_s": cpu[1], "peak_rss_gib": 0.5},
                {"name": "VLLM::Worker", "cpu_s": cpu[2], "peak_rss_gib": 2.0},
            ],
            "peak_tree_rss_gib": 5.5,
            "killed_for_memory": False,
        },
        "rows": [{
            "video": video, "concurrency": 8, "requests": 8, "failed": failed,
            "errors": ["APIError: too big"] if failed else [], "requests_per_s": rps,
            "ttft_s": pct(ttft), "itl_s": pct(0.03), "prompt_tokens": pct(580.0),
        }],
    }  # fmt: skip


def _write(folder: Path, *results: dict) -> Path:
    (folder / "sweep").mkdir(parents=True)
    for r in results:
        (folder / "sweep" / f"serving-{r['system']}.json").write_text(json.dumps(r))
    return folder


def test_table_ratios_and_plot(tmp_path):
    one = _write(
        tmp_path / "one", _result("qtsplus", "60s", 0.2, 40.0), _result("all-tokens", "60s", 0.1, 80.0)
    )
    five = _write(
        tmp_path / "five",
        _result("qtsplus", "300s", 0.04, 200.0),
        _result("all-tokens", "300s", 0.01, 500.0),
        _result("stock", "300s", 0.0, float("nan"), failed=8),
    )
    out, js = tmp_path / "gain.png", tmp_path / "gain.json"
    assert compare_report.main([str(five), str(one), "--out", str(out), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert list(data["runs"]) == ["60s", "300s"]  # sorted by length
    ratios = {(r["video"], r["against"]): r for r in data["ratios"]}
    assert ratios[("60s", "all-tokens")]["requests_per_s_ratio"] == 2.0
    assert ratios[("300s", "all-tokens")]["ttft_p50_ratio"] == 0.4
    assert "stock answered 0/8" in ratios[("300s", "stock")]["not_comparable"]
    # 9 requests per server (8 + one warm-up): CPU seconds per request
    assert data["runs"]["60s"]["qtsplus"]["cpu_s_per_request"]["API server"] == 10.0
    assert out.stat().st_size > 10_000
    text = compare_report.table({"300s": compare_report.load_run(five)})
    assert "| 300s | stock | 0/8 |" in text and "| 300s | qtsplus | 8/8 | 580 |" in text


PROMETHEUS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 6.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.75
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
vllm:generation_tokens_total{engine="0",model_name="m"} 120.0
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
vllm:num_requests_running{engine="1",model_name="m"} 1.0
qtsplus_videos_in_flight 4.0
"""


def test_engine_metrics_parse_and_summarise():
    import bench_serving

    values = bench_serving.parse_engine_metrics(PROMETHEUS)
    assert values == {"running": 3.0, "waiting": 6.0, "kv_cache_usage": 0.75, "preemptions": 3.0,
                      "generation_tokens": 120.0}  # fmt: skip
    monitor = bench_serving.MetricsMonitor("http://127.0.0.1:9/v1")
    monitor.marks = {"timed": 10.0, "done": 20.0}
    monitor.trace = [
        {"t": 5.0, "running": 8, "waiting": 0, "preemptions": 1, "generation_tokens": 50},  # warm-up: outside
        {"t": 10.0, "running": 1, "waiting": 7, "preemptions": 1, "generation_tokens": 60},
        {"t": 15.0, "running": 2, "waiting": 6, "preemptions": 2, "generation_tokens": 80},
        {"t": 20.5, "running": 0, "waiting": 0, "preemptions": 4, "generation_tokens": 100},
    ]
    s = monitor.summary()
    assert (s["max_running"], s["max_waiting"], s["preemptions"], s["generation_tokens"]) == (2, 7, 3, 40)
    assert s["generation_tokens_per_s"] == 40 / 10.5


def test_kv_cache_blocks_hold_exactly_the_requests(monkeypatch):
    import compare_serving

    asked = []

    def text_tokens(model, question=None):
        asked.append(question)
        return 60 + len(question) // 10  # the longest question counts

    monkeypatch.setattr(compare_serving, "text_tokens", text_tokens)
    kv = compare_serving.kv_cache_flags(Path("unused"), 2, 600.0, 128, 128, requests_per_level=8)
    # a 10-minute 720p30 video at 1 fps: 300 temporal slices of 20 x 36 patches -> 54,000 merged tokens
    longest = max(60 + len(q) // 10 for q in asked)
    assert all(q.endswith("(request 7)") for q in asked) and len(asked) == 4
    assert kv["m"] == 54_000 and kv["text_tokens"] == longest
    assert kv["tokens_per_request"] == 54_000 + longest + 128
    assert kv["blocks"] == 2 * -(-(54_128 + longest) // 128) + 1
    assert kv["usable_tokens"] == (kv["blocks"] - 1) * 128 >= 2 * kv["tokens_per_request"]
    assert kv["flags"] == ["--block-size", "128", "--num-gpu-blocks-override", str(kv["blocks"])]
    # the generated videos' size and frame rate decide M: 8 s of 320x240 at 4 fps keeps 8 frames
    from qtsplus_vllm.sizing import video_tokens

    small = compare_serving.kv_cache_flags(Path("unused"), 3, 8.0, 8, 32, size=(320, 240), fps=4.0)
    assert small["m"] == video_tokens(8.0, 320, 240, source_fps=4.0) == 4 * (small["m"] // 4)
    assert small["blocks"] == 3 * -(-(small["m"] + small["text_tokens"] + 8) // 32) + 1


def test_kv_cache_lines_are_read_from_the_server_log(tmp_path):
    import bench_serving

    log = tmp_path / "server.log"
    log.write_text(
        "INFO starting\n"
        "INFO [kv_cache_utils.py:2620] Overriding num_gpu_blocks=16383 with num_gpu_blocks_override=19\n"
        "INFO [kv_cache_utils.py:2328] CPU KV cache size: 2,304 tokens, Maximum concurrency for 1,024 "
        "tokens per request: 2.25x\n"
        "INFO GET /metrics 200\n"
    )
    lines = bench_serving.kv_cache_log_lines(log)
    assert len(lines) == 2 and "num_gpu_blocks_override=19" in lines[0] and "2,304 tokens" in lines[1]
    assert bench_serving.kv_cache_log_lines(None) == [] == bench_serving.kv_cache_log_lines(tmp_path / "x")


def test_running_over_time_plot(tmp_path):
    with_trace = _result("qtsplus", "600s", 0.01, 100.0)
    with_trace["rows"][0]["wall_s"] = 600.0
    with_trace["engine_metrics"] = {
        "marks": {"timed": 1.0},
        "preemptions": 0,
        "generation_tokens_per_s": 1.5,
        "trace": [{"t": 1.0 + i, "running": min(i, 8), "waiting": max(8 - i, 0)} for i in range(20)],
    }
    folder = _write(tmp_path / "kv", with_trace, _result("all-tokens", "600s", 0.002, 400.0))
    out = compare_report.plot_running(folder, tmp_path / "running.png")
    assert out is not None and out.stat().st_size > 10_000
    assert compare_report.kv_summary(with_trace)["generation_tokens_per_s"] == 1.5
    assert (
        compare_report.plot_running(
            _write(tmp_path / "none", _result("stock", "60s", 1, 1)), tmp_path / "x.png"
        )
        is None
    )
