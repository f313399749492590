"""Served-benchmark videos: the content kinds repeated by remuxing (bench_serving --video-style)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import av
import pytest

from qtsplus_vllm.testing import videos

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _probe(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.width, stream.codec_context.height, frames, container.duration / 1e6


@pytest.mark.parametrize("content", ["smooth", "screen"])
def test_long_video_of_a_content_kind_is_distinct_per_seed_with_the_length_and_size_asked(tmp_path, content):
    paths = [
        videos.make_long_video(tmp_path / f"{content}-{seed}.mp4", 3, size=(96, 64), fps=10, seed=seed,
                               clip_seconds=1, content=content)
        for seed in range(3)
    ]  # fmt: skip
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == 3  # no cache answers one video for another
    for path in paths:
        width, height, frames, seconds = _probe(path)
        assert (width, height, frames) == (96, 64, 30)
        assert seconds == pytest.approx(3.0, abs=0.11)
        assert not path.with_name(path.stem + ".clip.mp4").exists()  # the clip is removed


def test_unknown_content_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cartoon"):
        videos.make_long_video(tmp_path / "x.mp4", 2, size=(64, 48), fps=5, content="cartoon")


def test_bench_media_and_bench_serving_share_one_implementation_of_each_kind():
    import bench_media
    import bench_serving

    assert bench_media.CONTENTS == videos.CONTENT_KINDS
    assert set(bench_serving.LONG_STYLES) == set(videos.CONTENT_KINDS)


def test_generate_videos_smooth_names_by_style_and_reuses_files(tmp_path):
    import bench_serving

    paths = bench_serving.generate_videos(tmp_path, 2, 2, 5, (64, 48), style="smooth")
    assert [p.name for p in paths] == ["smooth-2s-5fps-64x48-0.mp4", "smooth-2s-5fps-64x48-1.mp4"]
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert bench_serving.generate_videos(tmp_path, 2, 2, 5, (64, 48), style="smooth") == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    assert _probe(paths[0])[2] == 10
