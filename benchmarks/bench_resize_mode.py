"""QTSPLUS_RESIZE: the exact resize against the fast one, same run (issue 20 item 3).

exact  each sampled frame decoded, converted to full-size RGB (swscale), then the reference's float
       bicubic+antialias to the target size (:func:`qtsplus_vllm.video.resize_frames_uint8`, in the
       plugin's batches);
fast   each sampled frame decoded and scaled straight to the target size by swscale while it is
       converted to RGB (:data:`qtsplus_vllm.video.FAST_INTERPOLATION`).

Three measurements, on H.264 clips of the three content kinds of ``bench_media.synthetic_frames``
(texture, smooth, screen) at 720p and 1080p, x264 veryfast:

1. ``frames``: per-frame time of the whole per-frame work (decode + convert + resize vs decode +
   scaled convert; a decode-only pass for scale), interleaved rounds, medians; and the pixel
   difference of the fast frames from the exact ones (uint8 levels: max, mean, share of values
   differing by > 0, > 2, > 8).
2. ``candidates``: the same pixel difference for a few other swscale filters, to show why
   FAST_INTERPOLATION is the one used.
3. ``selection``: ``SelectionRuntime.select`` (the tiny random-weight checkpoint,
   ``write_tiny_checkpoint`` with the released nmax 2560; ViT + selector on the CPU) on ``--seconds``-long clips in both modes,
   two questions each: the kept-index Jaccard between the modes, whether n is equal, and the
   first question's decode + preprocess time. The tiny checkpoint's weights are random, so its
   Jaccard is a proxy for how much the pixel difference moves a selection, not the released models'.

    python benchmarks/bench_resize_mode.py     # writes benchmarks/results/resize-mode/resize-mode-<date>.json

On a shared machine compare the ratios of one run, not the milliseconds.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_media import CONTENTS, git_sha, machine, synthetic_frames, versions  # noqa: E402

from qtsplus_vllm import exact_resize  # noqa: E402
from qtsplus_vllm.options import SelectionOptions  # noqa: E402
from qtsplus_vllm.streaming import EncodedVideo, LazyVideo, resize_batch_for  # noqa: E402
from qtsplus_vllm.testing.videos import encode_h264  # noqa: E402
from qtsplus_vllm.video import (  # noqa: E402
    FAST_INTERPOLATION,
    PreprocessConfig,
    SamplingConfig,
    probe_video,
    resize_frames_uint8,
    target_size,
)

RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080)}
NMAX = 2560  # the released checkpoints' default: n follows rho instead of the tiny default cap of 256
QUESTIONS = {"q1": [5, 6, 7, 8, 9, 10], "q2": [11, 12, 13, 14]}
Interp = av.video.reformatter.Interpolation
_CHROMA = Interp.FULL_CHR_H_INT | Interp.FULL_CHR_H_INP
CANDIDATES = {
    "BILINEAR": Interp.BILINEAR,
    "BICUBIC": Interp.BICUBIC,
    "AREA": Interp.AREA,
    "LANCZOS": Interp.LANCZOS,
    "BICUBIC|FULL_CHR_H_INT|FULL_CHR_H_INP (used)": Interp.BICUBIC | _CHROMA,
    "AREA|FULL_CHR_H_INT|FULL_CHR_H_INP": Interp.AREA | _CHROMA,
    "LANCZOS|FULL_CHR_H_INT|FULL_CHR_H_INP": Interp.LANCZOS | _CHROMA,
}


def encode(frames, size: tuple[int, int], fps: float) -> bytes:
    """H.264 (x264 veryfast, crf 23, a keyframe every 2 s) of uint8 RGB frames, as mp4 bytes."""
    buffer = io.BytesIO()
    options = {"crf": "23", "preset": "veryfast", "g": str(int(2 * fps))}
    encode_h264(buffer, frames, size, fps, options, container_format="mp4")
    return buffer.getvalue()


def difference(fast: np.ndarray, exact: np.ndarray) -> dict:
    """Pixel difference in uint8 levels over every value of two [T, h, w, 3] arrays."""
    diff = np.abs(fast.astype(np.int16) - exact.astype(np.int16))
    return {
        "max_abs": int(diff.max()),
        "mean_abs": round(float(diff.mean()), 3),
        "percent_gt_0": round(100 * float((diff > 0).mean()), 2),
        "percent_gt_2": round(100 * float((diff > 2).mean()), 2),
        "percent_gt_8": round(100 * float((diff > 8).mean()), 3),
    }


def decode_pass(data: bytes, convert) -> tuple[float, list]:
    """Decode every frame of ``data`` and ``convert`` each; (seconds, converted frames)."""
    out = []
    start = time.perf_counter()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as the plugin decodes
        for frame in container.decode(stream):
            out.append(convert(frame))
    return time.perf_counter() - start, out


def exact_frames(data: bytes, size: tuple[int, int]) -> tuple[float, np.ndarray]:
    """Decode + full-size RGB + the exact resize in the plugin's batches: (seconds, [T, h, w, 3])."""
    start = time.perf_counter()
    _, rgb = decode_pass(data, lambda frame: frame.to_ndarray(format="rgb24"))
    x = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2)  # channels-last view, as streamed
    batch = resize_batch_for(x.shape[2], x.shape[3])
    parts = [resize_frames_uint8(x[i : i + batch], size) for i in range(0, x.shape[0], batch)]
    out = torch.cat(parts).permute(0, 2, 3, 1).contiguous().numpy()
    return time.perf_counter() - start, out


def fast_frames(
    data: bytes, size: tuple[int, int], interpolation=FAST_INTERPOLATION
) -> tuple[float, np.ndarray]:
    h, w = size
    seconds, out = decode_pass(
        data, lambda frame: frame.to_ndarray(format="rgb24", width=w, height=h, interpolation=interpolation)
    )
    return seconds, np.stack(out)


def measure_frames(resolution: str, content: str, count: int, rounds: int) -> tuple[dict, dict]:
    width, height = RESOLUTIONS[resolution]
    data = encode(synthetic_frames(count, (width, height), seed=1, content=content), (width, height), 30.0)
    # the target of a 10-minute video at the reference's 1 fps (600 frames, max_pixels 360x420)
    size = target_size(height, width, 600, PreprocessConfig())
    exact_frames(data, size)  # warm-up (numba, swscale contexts)
    times = {"decode_only": [], "exact": [], "fast": []}
    for _ in range(rounds):  # interleaved: the machine's load hits all three alike
        times["decode_only"].append(decode_pass(data, lambda frame: None)[0])
        seconds, exact = exact_frames(data, size)
        times["exact"].append(seconds)
        seconds, fast = fast_frames(data, size)
        times["fast"].append(seconds)
    per_frame = {k: round(1e3 * statistics.median(v) / count, 3) for k, v in times.items()}
    row = {
        "resolution": resolution,
        "content": content,
        "source": [height, width],
        "target": list(size),
        "frames": count,
        "ms_per_frame": per_frame,
        "fast_speedup": round(per_frame["exact"] / per_frame["fast"], 2),
        "convert_resize_speedup": round(
            (per_frame["exact"] - per_frame["decode_only"])
            / max(1e-9, per_frame["fast"] - per_frame["decode_only"]),
            2,
        ),
        "pixel_difference": difference(fast, exact),
    }
    candidates = {
        name: difference(fast_frames(data, size, flag)[1], exact) for name, flag in CANDIDATES.items()
    }
    return row, {"resolution": resolution, "content": content, "by_filter": candidates}


def measure_selection(runtime, resolution: str, content: str, seconds: float, fps: float) -> dict:
    width, height = RESOLUTIONS[resolution]
    count = round(seconds * fps)
    data = encode(synthetic_frames(count, (width, height), seed=2, content=content), (width, height), fps)
    row = {"resolution": resolution, "content": content, "seconds": seconds, "source_fps": fps}
    results = {}
    for mode in ("exact", "fast"):
        for name, question in QUESTIONS.items():
            plan = probe_video(data, SamplingConfig())
            video = LazyVideo(EncodedVideo(data, plan))
            start = time.perf_counter()
            result = runtime.select(video, question, SelectionOptions(resize=mode))
            wall = (time.perf_counter() - start) * 1e3
            results[mode, name] = result
            if name == "q1":  # the ViT-feature cache serves q2
                timings = result.timings_ms
                row[f"{mode}_first_question_ms"] = {
                    "wall": round(wall, 1),
                    "decode": round(timings.get("decode_ms", 0.0), 1),
                    "preprocess": round(timings.get("preprocess_ms", 0.0), 1),
                    "vit": round(timings.get("vit_ms", 0.0), 1),
                }
    exact, fast = results["exact", "q1"], results["fast", "q1"]
    row.update(
        frames=exact.num_frames,
        M=exact.num_visual_tokens,
        same_M=exact.num_visual_tokens == fast.num_visual_tokens,
    )
    row["questions"] = {}
    for name in QUESTIONS:
        exact, fast = results["exact", name], results["fast", name]
        a, b = set(exact.indices.tolist()), set(fast.indices.tolist())
        row["questions"][name] = {
            "n_exact": exact.n,
            "n_fast": fast.n,
            "n_equal": exact.n == fast.n,
            "jaccard": round(len(a & b) / len(a | b), 4),
            "rho_exact": None if exact.rho is None else round(float(exact.rho), 5),
            "rho_fast": None if fast.rho is None else round(float(fast.rho), 5),
        }
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16, help="frames per clip of the per-frame timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the selection clips")
    parser.add_argument("--fps", type=float, default=10.0, help="source fps of the selection clips")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "resize-mode"))
    args = parser.parse_args(argv)
    from qtsplus_vllm.runtime import SelectionRuntime
    from qtsplus_vllm.testing import write_tiny_checkpoint

    frames, candidates, selection = [], [], []
    for resolution in RESOLUTIONS:
        for content in CONTENTS:
            row, by_filter = measure_frames(resolution, content, args.frames, args.rounds)
            frames.append(row)
            candidates.append(by_filter)
            print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runtime = SelectionRuntime(
            write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, nmax=NMAX), torch.float32, "cpu"
        )
        warm = encode(synthetic_frames(8, (640, 360), seed=3), (640, 360), 4.0)
        for mode in ("exact", "fast"):  # warm-up: first calls (numba, torch) are not either mode's cost
            plan = probe_video(warm, SamplingConfig())
            runtime.select(
                LazyVideo(EncodedVideo(warm, plan)), QUESTIONS["q1"], SelectionOptions(resize=mode)
            )
        for resolution in RESOLUTIONS:
            for content in CONTENTS:
                row = measure_selection(runtime, resolution, content, args.seconds, args.fps)
                selection.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "command": "python benchmarks/bench_resize_mode.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_sha": git_sha(),
        "machine": {
            **machine("cpu"),
            "torch_threads": torch.get_num_threads(),
            "note": "shared machine: compare ratios (same run, interleaved rounds), not milliseconds",
        },
        "versions": versions(),
        "exact_variant": exact_resize.variant(),
        "fast_interpolation": str(FAST_INTERPOLATION),
        "notes": [
            "pixel differences are uint8 levels of the resized RGB frames, fast minus exact, over every value",
            "selection: the tiny checkpoint has random weights: its kept-index Jaccard is a proxy for how "
            "much the pixel difference moves a selection, not the released models' overlap",
        ],
        "frames": frames,
        "candidates": candidates,
        "selection": selection,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"resize-mode-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return report


if __name__ == "__main__":
    main()
