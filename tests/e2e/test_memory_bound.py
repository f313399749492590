"""Memory of long videos in flight on a real server, against the model in ``qtsplus_vllm.memory``.

One ``vllm serve`` (tiny checkpoint, fp32). Four distinct 1280×720 30 fps H.264 videos of
``QTSPLUS_MEMORY_BOUND_MINUTES`` minutes (default 2; the issue's target is 10) are generated here: each
is a 10-second clip of its own content (its own seed) encoded once with x264 and then repeated, by
remuxing its packets, to the full length — every frame of the full length is decoded by the server, at
a bitrate of about 1.7 Mbit/s, in a few seconds of generation instead of minutes. A warm-up request
(another clip) loads the selection runtime first, so the idle RSS includes it.

The four videos are then sent at once (``file://`` URLs) while the RSS of all the server's processes
is sampled every 0.2 s. Asserted: four 200s with n = nmax video tokens in the prompt (ρ_min·M > nmax
for these videos, so the budget rule gives nmax) and the log's M the model's M; ``/health`` 200 after;
the peak RSS over idle at most :func:`qtsplus_vllm.memory.peak_bytes` of the four videos plus
``MARGIN`` (allocator fragmentation and per-thread arenas, vLLM's per-request state, the processes'
transient buffers), and at most 1.5 GiB per video in flight (the issue's target).

    flock /tmp/qtsplus-e2e.lock .venv/bin/python -m pytest tests/e2e/test_memory_bound.py -s
    QTSPLUS_MEMORY_BOUND_MINUTES=10 flock /tmp/qtsplus-e2e.lock .venv/bin/python -m pytest tests/e2e/test_memory_bound.py -s
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from qtsplus_vllm.memory import TINY, GiB, MiB, kept_frames_for, peak_bytes, request_memory
from qtsplus_vllm.testing import write_tiny_checkpoint
from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args
from qtsplus_vllm.testing.videos import repeat_clip, write_texture_clip

MINUTES = float(os.environ.get("QTSPLUS_MEMORY_BOUND_MINUTES", "2"))
VIDEOS = 4
WIDTH, HEIGHT, FPS = 1280, 720, 30
CLIP_SECONDS = 10
QUESTION = "What is moving in the video?"
MARGIN_FRACTION = 0.25  # over the model's peak ...
MARGIN_BYTES = 128 * MiB  # ... and a fixed allowance (see the module docstring)
TARGET_PER_VIDEO = 1.5 * GiB
SAMPLE_SECONDS = 0.2


def write_clip(path: Path, seed: int, seconds: int = CLIP_SECONDS) -> Path:
    """A ``seconds``-long 720p30 H.264 clip (:func:`qtsplus_vllm.testing.videos.write_texture_clip`)."""
    return write_texture_clip(path, seconds, (WIDTH, HEIGHT), FPS, seed)


def server_rss(pid: int) -> int:
    """RSS of the server process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler:
    """The largest :func:`server_rss` seen every ``SAMPLE_SECONDS`` while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.samples = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss(self.pid))
            self.samples += 1
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, server_rss(self.pid))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory-bound")
    model = write_tiny_checkpoint(root / "model", seed=5)
    clock = time.perf_counter()
    clips = [write_clip(root / f"clip{i}.mp4", seed=100 + i) for i in range(VIDEOS + 1)]
    videos = [repeat_clip(clip, root / f"long{i}.mp4", MINUTES * 60) for i, clip in enumerate(clips[:VIDEOS])]
    print(f"\ngenerated {VIDEOS} {MINUTES:g}-minute 720p30 videos in {time.perf_counter() - clock:.1f} s")
    return root, model, clips[VIDEOS], videos


@pytest.fixture(scope="module")
def server(assets, vllm_cache_root):
    root, model, _, _ = assets
    args = cpu_serve_args(max_model_len=2048, max_num_seqs=VIDEOS) + ["--allowed-local-media-path", str(root)]
    with RemoteServer(model, args, cache_root=vllm_cache_root) as remote:
        yield remote


def body(model: str, video: Path) -> dict:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": 4,
        "temperature": 0.0,
        "return_token_ids": True,
    }


LOG_LINE = re.compile(r"QTSplus video: frames=(\d+) M=(\d+) n=(\d+)")


def test_four_long_videos_in_flight_stay_within_the_memory_model(assets, server):
    root, model_dir, warm_up, videos = assets
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|video_pad|>")
    with httpx.Client(base_url=server.base_url, timeout=900) as http:
        name = http.get("/models").json()["data"][0]["id"]
        # load the selection runtime (and FFmpeg, the decoder's threads) before measuring idle
        assert http.post("/chat/completions", json=body(name, warm_up)).status_code == 200
        time.sleep(2)
        idle = min(server_rss(server.pid) for _ in range(5))

        clock = time.perf_counter()
        with RssSampler(server.pid) as sampler, concurrent.futures.ThreadPoolExecutor(VIDEOS) as pool:
            responses = list(pool.map(lambda v: http.post("/chat/completions", json=body(name, v)), videos))
        seconds = time.perf_counter() - clock
        assert http.get(server.url_for("health")).status_code == 200

    for response in responses:
        assert response.status_code == 200, response.text[:500]
    lines = [LOG_LINE.search(line) for line in server.log_tail(4000).splitlines()]
    found = [tuple(int(g) for g in match.groups()) for match in lines if match][-VIDEOS:]
    assert len(found) == VIDEOS, server.log_tail(200)

    estimates = [
        request_memory(
            encoded_bytes=video.stat().st_size,
            width=WIDTH,
            height=HEIGHT,
            kept_frames=kept_frames_for(MINUTES * 60, FPS),
            model=TINY,
            question_tokens=len(QUESTION),
            decoder_threads=min(16, (os.cpu_count() or 1) + 1),
            encode=True,  # the server's default, QTSPLUS_PREPARE_IN_LOADER=vit: each loader streams into the ViT
        )
        for video in videos
    ]
    for (frames, m, n), estimate, response in zip(found, estimates, responses, strict=True):
        assert (frames, m) == (estimate.kept_frames, estimate.visual_tokens)
        assert TINY.nmax < 0.05 * m  # rho_min · M > nmax: the budget rule keeps nmax tokens
        assert n == TINY.nmax
        assert response.json()["prompt_token_ids"].count(pad) == n

    peak = sampler.peak - idle
    model_peak = peak_bytes(estimates)
    bound = model_peak * (1 + MARGIN_FRACTION) + MARGIN_BYTES
    print(
        f"\nmemory bound: {VIDEOS} x {MINUTES:g}-min 720p30 ({sum(v.stat().st_size for v in videos) / MiB:.0f} MiB "
        f"encoded) in {seconds:.1f} s; idle {idle / MiB:.0f} MiB, peak {sampler.peak / MiB:.0f} MiB "
        f"({sampler.samples} samples), over idle {peak / MiB:.0f} MiB = {peak / VIDEOS / MiB:.0f} MiB per video; "
        f"model {model_peak / MiB:.0f} MiB (one video alone {estimates[0].total / MiB:.0f} MiB), "
        f"bound {bound / MiB:.0f} MiB"
    )
    assert peak <= bound
    assert peak / VIDEOS <= TARGET_PER_VIDEO
