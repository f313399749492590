"""qtsplus-eval against a real ``vllm serve`` of a tiny random checkpoint, one mini-benchmark per layout.

The checkpoint has random weights and the questions are made up, so accuracy is chance and is not
checked: this test checks the mechanics end to end. Every layout loads, its missing videos are
reported, every item is answered in every mode (no failure), the same items in each, the records
and summary counts agree, prompt tokens come from the server's usage and order as selection
predicts (off > on >= rho_max=0.1), TTFT and latency are measured, and the Markdown table and the
plot are written. One layout fetches its videos from the client's HTTP server, the others by
``file://`` under ``--allowed-local-media-path``.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from qtsplus_vllm.eval import report
from qtsplus_vllm.eval.cli import main
from qtsplus_vllm.eval.client import read_records
from qtsplus_vllm.eval.mini import write_mini_benchmark
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

LAYOUTS = ["videomme", "mlvu", "longvideobench", "choice"]
MODES = ["on", "off", "rho_max=0.1"]
ITEMS = 4  # 3 videos x 2 questions, one video missing


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = write_tiny_checkpoint(root / "model", seed=23)
    parquet = importlib.util.find_spec("pyarrow") is not None  # else Video-MME's JSON form
    data = {
        layout: write_mini_benchmark(
            root / layout, layout if layout != "videomme" or parquet else "videomme-json", videos=3, questions=2,
            missing=1, seed=k,
        )
        for k, layout in enumerate(LAYOUTS)
    }  # fmt: skip
    return root, model, data


@pytest.fixture(scope="module")
def server(bench, vllm_cache_root):
    root, model, _ = bench
    args = cpu_serve_args(max_model_len=4096) + [
        "--allowed-local-media-path",
        str(root),
        "--trust-request-mm-kwargs",
    ]
    with RemoteServer(model, args, cache_root=vllm_cache_root) as srv:
        yield srv


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_layout_against_vllm(bench, server, layout, tmp_path):
    _, _, data = bench
    out = tmp_path / "out"
    access = "http" if layout == "mlvu" else "file"
    argv = ["run", "--data", str(data[layout]), "--base-url", server.url_for("v1"), "--out", str(out),
            "--modes", *MODES, "--max-tokens", "4", "--concurrency", "2", "--timeout", "120",
            "--video-access", access, "--no-progress"]  # fmt: skip
    assert main(argv) == 0

    records = read_records(out / report.RESULTS)
    assert len(records) == ITEMS * len(MODES)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    ids = {m: sorted(r["id"] for r in records if r["mode"] == m) for m in MODES}
    assert ids["on"] == ids["off"] == ids["rho_max=0.1"] and len(ids["on"]) == ITEMS
    for r in records:
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] >= 1
        assert 0 < r["ttft_s"] <= r["latency_s"]
        assert r["pred"] is None or r["pred"] in "ABCDEF"

    summary = json.loads((out / report.SUMMARY).read_text())
    assert summary["dataset"]["layout"] == layout and len(summary["dataset"]["missing"]) == 2
    modes = {m["mode"]: m for m in summary["modes"]}
    assert list(modes) == MODES
    for m in modes.values():
        assert (m["items"], m["answered"], m["failed"]) == (ITEMS, ITEMS, 0)
        assert 0 <= m["accuracy"] <= 1 and m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
        assert m["unparsed"] == round(m["unparsed_rate"] * ITEMS)
        assert m["ttft_s"]["p50"] > 0 and m["latency_s"]["p90"] >= m["latency_s"]["p50"]
    # all M ViT tokens without selection; the selector keeps fewer, fewer still at rho_max=0.1
    tokens = {name: m["prompt_tokens"]["mean"] for name, m in modes.items()}
    assert tokens["off"] > tokens["on"] >= tokens["rho_max=0.1"], tokens
    paired = {p["mode"]: p for p in summary["paired"]}
    assert set(paired) == {"on", "rho_max=0.1"} and all(p["baseline"] == "off" for p in paired.values())
    assert all(p["n"] == ITEMS and 0 <= p["mcnemar_p"] <= 1 for p in paired.values())
    assert "| on vs off | 4 |" in (out / report.TABLE).read_text()
    assert (out / report.PLOT).is_file()
