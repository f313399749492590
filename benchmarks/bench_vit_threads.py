"""The CPU ViT of a video decoded ahead while the loader decodes another one (issue 19 item 5).

A server under load encodes a prepared video (``SelectionRuntime.select`` on frames the media loader
decoded and resized) while its media threads decode the next videos (``prepare_video``). This runs
exactly that in one process — the ViT of video A (prepared) while a background thread keeps
preparing video B — with the torch threads of the ViT chosen

``all``   on every core (``QTSPLUS_CPU_THREADS``, the rule before issue 19), or
``rule``  by :func:`qtsplus_vllm.runtime.vit_threads`: one core fewer while a video is being
          prepared (the streamed path's rule),

interleaved round by round, and ``alone`` (nothing decoding) for reference. Reported: the medians
of ``vit_ms`` and of the background decoder's throughput (frames prepared per second while the ViT
runs). The tiny random-weight checkpoint stands for the model.

    python benchmarks/bench_vit_threads.py --rounds 5 --out benchmarks/results/vit-threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# vLLM's API server runs multimodal processing under OMP_NUM_THREADS (1 when unset): the media
# threads' resize gets one torch thread, the selection runtime sets its own count (runtime.py)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import qtsplus_vllm.runtime as runtime_module  # noqa: E402
from qtsplus_vllm.limits import Limits  # noqa: E402
from qtsplus_vllm.options import SelectionOptions  # noqa: E402
from qtsplus_vllm.streaming import EncodedVideo, LazyVideo, prepare_frames  # noqa: E402
from qtsplus_vllm.testing import write_tiny_checkpoint  # noqa: E402
from qtsplus_vllm.testing.videos import make_video_bytes  # noqa: E402
from qtsplus_vllm.video import PreprocessConfig, SamplingConfig, probe_video  # noqa: E402


def lazy(data: bytes, sampling: SamplingConfig) -> LazyVideo:
    return LazyVideo(EncodedVideo(data, probe_video(data, sampling, Limits())))


def prepared(data: bytes, sampling: SamplingConfig) -> LazyVideo:
    encoded = EncodedVideo(data, probe_video(data, sampling, Limits()))
    video = LazyVideo(encoded)
    encoded.prepared = prepare_frames(video, PreprocessConfig())
    encoded.plan = video.plan
    return LazyVideo(encoded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    os.environ["QTSPLUS_FEATURE_CACHE_BYTES"] = "0"  # every round runs the ViT
    tmp = Path(tempfile.mkdtemp(prefix="bench-vit-threads-"))
    model = write_tiny_checkpoint(tmp / "m", seed=1)
    sampling = SamplingConfig(fps=4.0, max_frames=768)
    video_a = make_video_bytes(160, (640, 360), fps=8.0, seed=1)  # 20 s, 80 frames kept
    video_b = make_video_bytes(240, (640, 360), fps=8.0, seed=2)  # the one the loader decodes
    runtime = runtime_module.SelectionRuntime(model, torch.float32, "cpu")
    item = prepared(video_a, sampling)
    runtime.select(item, [5, 6], SelectionOptions())  # warm-up

    rule = runtime_module.vit_threads
    results: dict[str, list[dict[str, float]]] = {"alone": [], "all": [], "rule": []}

    def one(mode: str) -> dict[str, float]:
        runtime_module.vit_threads = rule if mode != "all" else runtime_module.cpu_threads
        stop, frames_done = threading.Event(), []

        def decode_ahead() -> None:
            while not stop.is_set():
                video = lazy(video_b, sampling)
                out = runtime_module.prepare_video(video, PreprocessConfig())
                frames_done.append(out.frames.shape[0])

        background = threading.Thread(target=decode_ahead, daemon=True) if mode != "alone" else None
        if background is not None:
            background.start()
            while runtime_module.videos_preparing() == 0:
                time.sleep(0.001)
        start = time.perf_counter()
        result = runtime.select(item, [5, 6], SelectionOptions())
        wall = time.perf_counter() - start
        prepared_frames = sum(frames_done)
        stop.set()
        if background is not None:
            background.join()
        return {
            "vit_ms": result.timings_ms["vit_ms"],
            "wall_ms": wall * 1e3,
            "decoded_frames_per_s": prepared_frames / wall,
        }

    for _ in range(args.rounds):
        for mode in ("all", "rule", "alone"):
            results[mode].append(one(mode))
    runtime_module.vit_threads = rule

    summary = {
        mode: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for mode, rows in results.items()
    }
    report = {
        "what": "vit_ms of a prepared 640x360 video (80 frames kept) while another is prepared in a thread",
        "cpu_threads": runtime_module.cpu_threads(),
        "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "rounds": args.rounds,
        "median": summary,
        "runs": results,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(report["median"], indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
