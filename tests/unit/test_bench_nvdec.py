"""benchmarks/bench_nvdec.py on the CPU: the software rows and the equality report (NVDEC is GPU-only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_nvdec  # noqa: E402


def test_cpu_run_writes_software_rows_and_skips_nvdec(tmp_path):
    out = tmp_path / "nvdec.json"
    record = bench_nvdec.measure(out, ["smooth"], seconds=2, concurrency=2, every=30, device="cpu")
    assert json.loads(out.read_text()) == json.loads(json.dumps(record, default=str))
    (case,) = record["cases"]
    assert case["software"]["frames"] == 60 and case["software"]["pix_fmt"] == "yuv420p"
    assert case["software_concurrent"]["status"] == "ok" and case["software_concurrent"]["frames"] == 120
    assert "nvdec" not in case and record["nvdec_skipped"]


def test_compare_counts_equal_frames_and_differences(tmp_path):
    video = bench_nvdec.make_long_video(tmp_path / "v.mp4", 2, content="smooth")
    first, second = (bench_nvdec.decode(video, None, every=30) for _ in range(2))
    same = bench_nvdec.compare(first["sampled"], second["sampled"])
    assert same["sampled_frames"] == 2 and same["same_indices"]
    for key in ("yuv", "rgb", "rgb_via_yuv420p"):
        assert same[key]["frames_equal"] == 2 and same[key]["values_differing"] == 0
    # software yuv420p frames convert to the same RGB directly and through the yuv420p step
    for entry in first["sampled"].values():
        assert np.array_equal(entry["rgb"], entry["rgb_via_yuv420p"])
    altered = {i: dict(e) for i, e in second["sampled"].items()}
    index = min(altered)
    altered[index]["rgb"] = altered[index]["rgb"].copy()
    value = int(altered[index]["rgb"][0, 0, 0])
    altered[index]["rgb"][0, 0, 0] = value + 3 if value < 253 else value - 3
    report = bench_nvdec.compare(first["sampled"], altered)
    assert report["rgb"]["frames_equal"] == 1 and report["rgb"]["values_differing"] == 1
    assert report["rgb"]["max_abs_diff"] == 3 and report["yuv"]["frames_equal"] == 2
