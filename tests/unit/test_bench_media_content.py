"""The media benchmark's content kinds and the sweep's target arithmetic (issue 20)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_media  # noqa: E402
import bench_media_sweep  # noqa: E402


@pytest.mark.parametrize("content", sorted(bench_media.CONTENTS))
def test_each_content_kind_yields_rgb_frames_of_the_size_asked(content):
    frames = list(bench_media.synthetic_frames(40, (96, 64), content=content))
    assert len(frames) == 40
    assert all(f.shape == (64, 96, 3) and f.dtype == np.uint8 for f in frames)
    # something moves in every kind
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])


def test_the_kinds_differ_in_how_much_changes_between_frames():
    def mean_change(content):
        frames = [f.astype(np.int16) for f in bench_media.synthetic_frames(60, (160, 90), content=content)]
        return np.mean([np.abs(a - b).mean() for a, b in zip(frames, frames[1:], strict=False)])

    texture, smooth, screen = (mean_change(c) for c in ("texture", "smooth", "screen"))
    assert texture > smooth and texture > screen


def test_texture_keeps_the_cache_name_of_earlier_runs_and_other_kinds_get_their_own(tmp_path):
    assert bench_media.video_path(tmp_path, 10, "720p").name == "synthetic-720p-10min-30fps.mp4"
    assert bench_media.video_path(tmp_path, 10, "720p", "smooth").name == "smooth-720p-10min-30fps.mp4"


def _result(floor_ms, vit_ms, wall_ms, preprocess_ms, ttft_s=None):
    paths = {
        "floor": {"status": "ok", "decode_all_ms": floor_ms},
        "streaming": {
            "status": "ok",
            "wall_ms": wall_ms,
            "timings_ms": {"decode_ms": floor_ms, "preprocess_ms": preprocess_ms, "vit_ms": vit_ms},
        },
    }
    if ttft_s is not None:
        paths["served"] = {"status": "ok", "cold": {"ttft_s": ttft_s}}
    return {
        "paths": paths,
        "settings": {"content": "smooth", "resolution": "720p", "minutes": 5},
        "video": {"bytes": 1},
    }


def test_the_sweep_judges_the_served_ttft_against_1_25_floor_plus_vit_plus_1_s():
    row = bench_media_sweep.case_summary(_result(4000, 2000, 7000, 3000, ttft_s=9.0))
    assert row["target_ms"] == pytest.approx(1.25 * 6000 + 1000)
    assert row["ttft_target_met"] is False and row["ttft_target_measured_on"] == "served TTFT"
    assert row["preprocess_within_floor"] is True
    row = bench_media_sweep.case_summary(_result(4000, 2000, 8400, 4500))
    assert row["ttft_target_met"] is True and row["ttft_target_measured_on"] == "in-process wall time"
    assert row["preprocess_within_floor"] is False


def test_a_case_whose_paths_failed_is_reported_without_numbers():
    result = _result(1, 1, 1, 1)
    result["paths"]["streaming"] = {"status": "failed"}
    row = bench_media_sweep.case_summary(result)
    assert row["status"]["streaming"] == "failed" and "target_ms" not in row


def test_the_sweep_refuses_an_unknown_content_kind(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_media_sweep.main(["--contents", "cartoon"])
    assert exit_.value.code == 2
    assert "cartoon" in capsys.readouterr().err
