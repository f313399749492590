"""Per-frame resize time: the reference's exact bicubic resize, old path vs new, same run.

old:   torchvision's ``resize(BICUBIC, antialias=True)`` on a contiguous uint8 batch (float32
       interpolation, clamped, rounded; what qwen-vl-utils runs and what the plugin ran before);
new:   :func:`qtsplus_vllm.exact_resize.resize_uint8` on the channels-last batch as decoded (the same
       values, checked here on every pixel);
uint8: ATen's uint8 bicubic kernel (torchvision's uint8 fast path), for context only: not the
       reference's values (the differences are reported);
and, for scale, the decoder thread's conversion of one frame to full-size RGB (swscale, yuv420p),
and the streamed preprocessing end to end (``iter_vision_inputs``: resize, normalise, patchify — the
server's ``preprocess_ms``) per frame, old vs new.

Real decoded frames (H.264, :func:`qtsplus_vllm.testing.make_video`) at 720p and 1080p, resized in
batches as the plugin does (``resize_batch_for``) to the reference demo's target size; rounds
interleaved, medians of wall time and of CPU time (all threads) per frame, at 1 thread and at torch's
default thread count. On a shared machine compare the ratios, not the milliseconds.

    python benchmarks/bench_resize.py            # writes benchmarks/results/resize/resize-<date>.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qtsplus_vllm import exact_resize  # noqa: E402
from qtsplus_vllm.streaming import iter_vision_inputs, resize_batch_for  # noqa: E402
from qtsplus_vllm.testing.videos import make_video  # noqa: E402
from qtsplus_vllm.video import PreprocessConfig, SamplingConfig, decode_video, target_size  # noqa: E402

RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080)}


def old(x: torch.Tensor, size) -> torch.Tensor:
    return tvf.resize(x.contiguous(), list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def new(x: torch.Tensor, size) -> torch.Tensor:
    out = exact_resize.resize_uint8(x, size)
    assert out is not None, "the exact fast path did not run"
    return out


def uint8_kernel(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x.contiguous(), size=size, mode="bicubic", antialias=True, align_corners=False)


def frames_of(resolution: str, count: int, tmp: Path) -> tuple[torch.Tensor, float]:
    """Decoded frames, channels-last [T, 3, H, W] as the plugin holds them, and the median time of
    converting one decoded (yuv420p) frame to full-size RGB (what the decoder thread does per frame)."""
    path = make_video(tmp / f"{resolution}.mp4", frames=count, size=RESOLUTIONS[resolution], fps=4.0)
    video = decode_video(path, SamplingConfig(fps=4.0, min_frames=2, max_frames=count))
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    convert = []
    for _ in range(3):
        for frame in decoded:
            start = time.perf_counter()
            frame.to_ndarray(format="rgb24")
            convert.append((time.perf_counter() - start) * 1e3)
    return torch.from_numpy(video.frames).permute(0, 3, 1, 2), statistics.median(convert)


def measure(x: torch.Tensor, size, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    batch = resize_batch_for(x.shape[2], x.shape[3])
    x = x[:batch]
    methods = {"old": old, "new": new, "uint8": uint8_kernel}
    for fn in methods.values():  # warm up (tables, compiled kernels)
        fn(x, size)
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(x, size)
            times[name].append((time.perf_counter() - start) * 1e3 / x.shape[0])
            cpu[name].append((time.process_time() - start_cpu) * 1e3 / x.shape[0])
    # the streamed path end to end (resize + normalise + patchify, ``preprocess_ms``), old vs new
    chunk = x.permute(0, 2, 3, 1).numpy()
    pipeline: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(rounds):
        for name in pipeline:
            timings: dict[str, float] = {}
            with exact_resize.disabled() if name == "old" else contextlib.nullcontext():
                for _ in iter_vision_inputs(iter([chunk]), chunk.shape, PreprocessConfig(), timings=timings):
                    pass
            pipeline[name].append(timings["preprocess_ms"] / chunk.shape[0])
    reference, fast, approx = old(x, size), new(x, size), uint8_kernel(x, size)
    diff = (approx.int() - reference.int()).abs()
    ms = {name: statistics.median(values) for name, values in times.items()}
    return {
        "threads": threads,
        "batch": int(x.shape[0]),
        "ms_per_frame": {k: round(v, 3) for k, v in ms.items()},
        "old_over_new": round(ms["old"] / ms["new"], 2),
        "cpu_ms_per_frame": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "cpu_old_over_new": round(statistics.median(cpu["old"]) / statistics.median(cpu["new"]), 2),
        "preprocess_ms_per_frame": {k: round(statistics.median(v), 3) for k, v in pipeline.items()},
        "new_bit_identical": bool(torch.equal(fast, reference)),
        "uint8_kernel_differs": {
            "fraction_of_values": round(float((diff > 0).float().mean()), 4),
            "max_levels": int(diff.max()),
        },
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "resize"))
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in RESOLUTIONS:
            x, convert_ms = frames_of(resolution, args.frames, Path(tmp))
            size = target_size(x.shape[2], x.shape[3], 300, PreprocessConfig())
            for threads in sorted({1, default_threads}):
                row = {"resolution": resolution, "source": list(x.shape[2:]), "target": list(size)}
                row["yuv420p_to_rgb24_ms_per_frame"] = round(convert_ms, 3)
                row.update(measure(x, size, threads, args.rounds))
                results.append(row)
                print(json.dumps(row), flush=True)
    torch.set_num_threads(default_threads)
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    report = {
        "command": "python benchmarks/bench_resize.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_sha": sha.stdout.strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": list(os.getloadavg()),
            "note": "shared machine: compare ratios (same run, interleaved rounds), not milliseconds",
        },
        "versions": {
            "torch": torch.__version__,
            "numba": _version("numba"),
            "python": platform.python_version(),
        },
        "exact_variant": exact_resize.variant(),
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"resize-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return report


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
