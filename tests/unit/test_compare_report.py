"""benchmarks/compare_report.py: the table, the ratios and the plot from compare_serving results."""

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
