"""The long-video media path, stage by stage, against the decode floor (issue 12).

For one generated H.264 video (real size: ``--resolution`` 720p or 1080p at 30 fps, ``--minutes``
long; synthetic content of a ``--content`` kind — ``texture`` (camera-like, every pixel moving: the
costliest to decode), ``smooth`` (gradients and one moving block: lectures, dashcams, surveillance) or
``screen`` (a screen recording: text, scrolling, a cursor) —, x264 ``veryfast``, a keyframe every
2 s; generated once and cached
under ``benchmarks/media/``, which git ignores) it measures, each path in its own fresh process so
that peak RSS is that path's alone:

``floor``      a linear PyAV decode of every frame (``thread_type="AUTO"``, no conversion): the least
               any decoder-based path can take;
``streaming``  the serving path: the loader's work (``probe_video``: header checks, demux count,
               sampling plan; no decoding) in ``probe_ms``, then ``SelectionRuntime.select`` on the
               lazy item (decoder thread -> chunks -> resize/normalise/patchify -> ViT, overlapped;
               then the selector), with its own per-stage timings (``decode_ms`` is the decoder
               thread's busy time, which overlaps ``preprocess_ms`` and ``vit_ms``; ``wall_ms`` is
               what a request waits), and then a follow-up question on the same video as a new
               request makes it (probe again + select, served from the ViT-feature cache);
``legacy``     (``--legacy``) the path before issue 12: ``decode_video`` (all sampled frames at
               full resolution) + ``preprocess_frames`` (the whole clip as float32) + one ViT call
               + the selector. It needs ~12 GiB for a 10-minute 720p video: run it on short ones.

Reported per path: wall time per stage, peak RSS over the process's RSS just before the path
(``peak_rss_delta_mib``; sampled every 5 ms from /proc/self/statm), and on CUDA
``torch.cuda.max_memory_allocated``. The tiny random-weight checkpoint (``write_tiny_checkpoint``)
stands for the model: the ViT's share of the time is a real 7B/3B ViT's only on a GPU.

    python benchmarks/bench_media.py --device cpu --minutes 10 --resolution 720p --out benchmarks/results/media
    python benchmarks/bench_media.py --device cpu --minutes 1 --legacy --out benchmarks/results/media
    python benchmarks/bench_media.py --device cuda --minutes 10 --out DIR [--quick]

``--out`` is a directory (a ``media-<res>-<min>min-<device>-<time>.json`` and a ``.png`` of the same
name go there) or a ``.json`` path. ``--quick``: a 640x360 video unless ``--resolution`` is given,
generated in a temporary directory (a smoke run). ``main(argv)`` returns 0 when every path ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from qtsplus_vllm.testing.videos import screen_frames, smooth_frames, texture_frames  # noqa: E402

RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}
MEDIA_DIR = Path(__file__).resolve().parent / "media"
FPS = 30.0
QUESTION_IDS = [5, 6, 7, 8, 9, 10]
FOLLOW_UP_IDS = [11, 12, 13]


# ----------------------------------------------------------------------------- the video


def synthetic_frames(count: int, size: tuple[int, int], seed: int = 0, content: str = "texture"):
    """Yield ``count`` uint8 RGB frames [H, W, 3] of one content kind (``CONTENTS``)."""
    return CONTENTS[content](count, size, seed)


# the generators live in qtsplus_vllm.testing.videos (bench_serving repeats clips of the same content)
CONTENTS = {"texture": texture_frames, "smooth": smooth_frames, "screen": screen_frames}


def video_path(media_dir: Path, minutes: float, resolution: str, content: str = "texture") -> Path:
    kind = "synthetic" if content == "texture" else content  # texture keeps its earlier cache name
    return media_dir / f"{kind}-{resolution}-{minutes:g}min-{FPS:g}fps.mp4"


def ensure_video(
    media_dir: Path, minutes: float, resolution: str, preset: str = "veryfast", content: str = "texture"
) -> Path:
    """The cached video, written first if missing (x264 ``preset``, crf 23, keyframe every 2 s)."""
    path = video_path(media_dir, minutes, resolution, content)
    if path.is_file():
        return path
    width, height = RESOLUTIONS[resolution]
    count = max(2, round(minutes * 60 * FPS))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    print(f"generating {path.name} ({count} frames, {width}x{height}) ...", flush=True)
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"crf": "23", "preset": preset, "g": str(int(2 * FPS))}
        for array in synthetic_frames(count, (width, height), content=content):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)
    return path


# ----------------------------------------------------------------------------- measuring


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every ``interval`` s while the block runs; ``peak`` - ``start``."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def cuda_peak(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_cuda_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def worker_floor(args) -> dict:
    """Decode every frame once, no conversion."""
    with PeakRSS() as rss:
        clock = time.perf_counter()
        with av.open(args.video) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = sum(1 for _ in container.decode(stream))
        seconds = time.perf_counter() - clock
    return {"decode_all_ms": seconds * 1e3, "frames": frames, "peak_rss_delta_mib": rss.delta_mib}


def _runtime(args):
    import torch

    from qtsplus_vllm.runtime import SelectionRuntime

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    runtime = SelectionRuntime(args.model, dtype, device)
    # one tiny call first: lazy initialisation (kernels, thread pools) is not the video's cost
    from qtsplus_vllm.options import SelectionOptions

    runtime.select(np.zeros((2, 56, 56, 3), np.uint8), QUESTION_IDS, SelectionOptions())
    runtime.feature_cache.clear()
    return runtime, device


def worker_streaming(args) -> dict:
    from qtsplus_vllm.limits import Limits
    from qtsplus_vllm.options import SelectionOptions
    from qtsplus_vllm.streaming import EncodedVideo, LazyVideo, stream_chunk_frames
    from qtsplus_vllm.video import SamplingConfig, probe_video

    runtime, device = _runtime(args)
    limits, sampling, options = Limits.from_env(), SamplingConfig(), SelectionOptions()
    out = {"chunk_frames_setting": stream_chunk_frames()}
    reset_cuda_peak(device)
    with PeakRSS() as rss:
        clock = time.perf_counter()
        data = Path(args.video).read_bytes()  # vLLM holds the fetched bytes the same way
        out["read_ms"] = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        plan = probe_video(data, sampling, limits)  # QTSplusVideoLoader.load_bytes' work
        out["probe_ms"] = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        result = runtime.select(LazyVideo(EncodedVideo(data, plan)), QUESTION_IDS, options)
        out["select_wall_ms"] = (time.perf_counter() - clock) * 1e3
    out.update(
        peak_rss_delta_mib=rss.delta_mib,
        cuda_max_allocated_mib=cuda_peak(device),
        timings_ms=result.timings_ms,
        frames=result.num_frames,
        grid_thw=list(result.grid_thw),
        M=result.num_visual_tokens,
        n=result.n,
        encoded_mib=len(data) / 2**20,
        decode_size=[plan.decode_width, plan.decode_height],
        features_mib=runtime.feature_cache.stats()["bytes"] / 2**20,
    )
    out["wall_ms"] = out["probe_ms"] + out["select_wall_ms"]
    # a follow-up question: a new request fetches and probes the bytes again, then hits the cache
    reset_cuda_peak(device)
    with PeakRSS() as rss:
        clock = time.perf_counter()
        plan = probe_video(data, sampling, limits)
        probe_ms = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        again = runtime.select(LazyVideo(EncodedVideo(data, plan)), FOLLOW_UP_IDS, options)
        select_ms = (time.perf_counter() - clock) * 1e3
    out["follow_up"] = {
        "probe_ms": probe_ms,
        "select_wall_ms": select_ms,
        "wall_ms": probe_ms + select_ms,
        "cache_hit": again.cache_hit,
        "timings_ms": again.timings_ms,
        "peak_rss_delta_mib": rss.delta_mib,
    }
    return out


def worker_loader(args) -> dict:
    """The default served path: the loader probes, decodes and resizes (``prepare_video``, in a
    media thread when served), then the processor runs the ViT and the selector on those frames."""
    import torch

    from qtsplus_vllm.limits import Limits
    from qtsplus_vllm.options import SelectionOptions
    from qtsplus_vllm.runtime import get_runtime, prepare_video
    from qtsplus_vllm.streaming import EncodedVideo, LazyVideo
    from qtsplus_vllm.video import SamplingConfig, probe_video

    runtime, device = _runtime(args)
    # the loader asks the process's runtime whether a video's features are cached
    registered = get_runtime(args.model, getattr(torch, args.dtype), device)
    limits, sampling, options = Limits.from_env(), SamplingConfig(), SelectionOptions()

    def request(question: list[int]) -> tuple[dict, object]:
        out = {}
        clock = time.perf_counter()
        data = Path(args.video).read_bytes()
        out["read_ms"] = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        encoded = EncodedVideo(data, probe_video(data, sampling, limits))
        out["probe_ms"] = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        video = LazyVideo(encoded)
        prepared = prepare_video(video, options.preprocess_config())
        if prepared is not None:
            encoded.plan, encoded.prepared = video.plan, prepared
        out["prepare_ms"] = (time.perf_counter() - clock) * 1e3
        out["prepared_mib"] = prepared.nbytes / 2**20 if prepared is not None else 0.0
        clock = time.perf_counter()
        result = registered.select(LazyVideo(encoded), question, options)
        out["select_wall_ms"] = (time.perf_counter() - clock) * 1e3
        out["wall_ms"] = out["probe_ms"] + out["prepare_ms"] + out["select_wall_ms"]
        out["timings_ms"] = result.timings_ms
        out["cache_hit"] = result.cache_hit
        return out, result

    del runtime
    reset_cuda_peak(device)
    with PeakRSS() as rss:
        out, result = request(QUESTION_IDS)
    out.update(
        peak_rss_delta_mib=rss.delta_mib,
        cuda_max_allocated_mib=cuda_peak(device),
        frames=result.num_frames,
        M=result.num_visual_tokens,
        n=result.n,
    )
    reset_cuda_peak(device)
    with PeakRSS() as rss:
        follow_up, _ = request(FOLLOW_UP_IDS)
    out["follow_up"] = {**follow_up, "peak_rss_delta_mib": rss.delta_mib}
    return out


def worker_legacy(args) -> dict:
    import torch

    from qtsplus_vllm.limits import Limits
    from qtsplus_vllm.options import SelectionOptions
    from qtsplus_vllm.video import SamplingConfig, decode_video, preprocess_frames

    runtime, device = _runtime(args)
    out = {}
    reset_cuda_peak(device)
    with PeakRSS() as rss, torch.inference_mode():
        data = Path(args.video).read_bytes()
        clock = time.perf_counter()
        video = decode_video(data, SamplingConfig(), Limits.from_env())
        out["decode_ms"] = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        inputs = preprocess_frames(
            video.frames, SelectionOptions().preprocess_config(), device, runtime.dtype
        )
        out["preprocess_ms"] = (time.perf_counter() - clock) * 1e3
        del video
        clock = time.perf_counter()
        visual = runtime.vision(inputs.pixel_values, inputs.grid_thw)
        runtime._sync()
        out["vit_ms"] = (time.perf_counter() - clock) * 1e3
        clock = time.perf_counter()
        selection = runtime.selector.select(visual, runtime.embed_question(QUESTION_IDS))
        runtime._sync()
        out["selector_ms"] = (time.perf_counter() - clock) * 1e3
    out.update(
        peak_rss_delta_mib=rss.delta_mib,
        cuda_max_allocated_mib=cuda_peak(device),
        M=int(visual.shape[0]),
        n=int(selection.indices.numel()),
        wall_ms=sum(out[k] for k in ("decode_ms", "preprocess_ms", "vit_ms", "selector_ms")),
    )
    return out


WORKERS = {
    "floor": worker_floor,
    "streaming": worker_streaming,
    "loader": worker_loader,
    "legacy": worker_legacy,
}


def served(args, model: Path, video: Path, tmp: Path) -> dict:
    """``vllm serve`` of the tiny checkpoint: TTFT of a cold question on the video (a ``file://``
    URL), then of a follow-up question on it, and the server's peak RSS over idle meanwhile."""
    import openai

    from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

    flags = cpu_serve_args(max_model_len=4096) + ["--allowed-local-media-path", str(video.parent)]
    url = f"file://{video}"

    def ask(client, question: str) -> dict:
        clock = time.perf_counter()
        first = None
        stream = client.chat.completions.create(
            model=str(model),
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "video_url": {"url": url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],  # fmt: skip
            max_tokens=4,
            temperature=0.0,
            stream=True,
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - clock
        return {"ttft_s": first, "total_s": time.perf_counter() - clock}

    def tree_rss(pid: int) -> int:
        total, stack = 0, [pid]
        while stack:
            p = stack.pop()
            with contextlib.suppress(OSError):
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                with open(f"/proc/{p}/task/{p}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        return total

    with RemoteServer(model, flags, cache_root=tmp / "vllm-cache") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=1800)
        idle = tree_rss(server.pid)
        peak = [idle]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss(server.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cold = ask(client, "What is moving in the video?")
        follow_up = ask(client, "Which colours do the squares have?")
        stop.set()
        sampler.join()
        lines = [line for line in server.log_tail(200).splitlines() if "QTSplus video:" in line]
    return {
        "status": "ok",
        "command_flags": flags,
        "cold": cold,
        "follow_up": follow_up,
        "follow_up_over_cold_ttft": follow_up["ttft_s"] / cold["ttft_s"],
        "server_idle_rss_mib": idle / 2**20,
        "server_peak_rss_over_idle_mib": (peak[0] - idle) / 2**20,
        "log_lines": lines[-2:],
    }


def run_worker(name: str, args, model: Path, video: Path) -> dict:
    """One path in a fresh process (its peak RSS is its own); its JSON result."""
    cmd = [sys.executable, __file__, "--_worker", name, "--_video", str(video), "--_model", str(model)]
    cmd += ["--device", args.device, "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.worker_timeout)
    if proc.returncode != 0:
        return {"status": "failed", "error": (proc.stdout + proc.stderr)[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", **result}


# ----------------------------------------------------------------------------- memory model


def memory_model(
    width: int,
    height: int,
    kept_frames: int,
    encoded_bytes: int,
    feature_dim: int = 128,
    feature_bytes: int = 4,
    chunk: int | None = None,
) -> dict:
    """Host bytes one in-flight video takes on the streamed CPU path, stage by stage (README:
    "Long videos: memory and time"). ViT activations are left out (small for the tiny checkpoint;
    on a GPU they are GPU memory), and so are FFmpeg's reference frames (tens of MB)."""
    from qtsplus_vllm.limits import Limits
    from qtsplus_vllm.streaming import QUEUE_CHUNKS, chunk_frames_for, resize_batch_for
    from qtsplus_vllm.video import PreprocessConfig, decode_size, target_size

    wd, hd = decode_size(width, height, Limits.from_env().decode_max_pixels)
    chunk = chunk_frames_for(hd, wd, chunk)
    batch = resize_batch_for(hd, wd)
    t = kept_frames + kept_frames % 2
    h, w = target_size(hd, wd, t, PreprocessConfig())
    px, out = wd * hd, w * h
    parts = {
        "encoded": encoded_bytes,
        "decoded_chunks": (QUEUE_CHUNKS + 2) * chunk * px * 3,
        # a contiguous uint8 batch, torchvision's float copy of it, the horizontal pass, the output
        "resize": batch * (px * 3 + px * 3 * 4 + hd * w * 3 * 4 + out * 3 * 4),
        # resized float frames, two normalisation temporaries, the patchified copy
        "chunk_pixels": 4 * chunk * out * 3 * 4,
        "features": t // 2 * (h // 28) * (w // 28) * feature_dim * feature_bytes,
    }
    parts["total"] = sum(parts.values())
    return {
        "decode_size": [wd, hd],
        "resized": [w, h],
        "chunk_frames": chunk,
        "resize_batch": batch,
        "mib": {k: v / 2**20 for k, v in parts.items()},
    }


# ----------------------------------------------------------------------------- record


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "transformers", "av", "numpy", "qwen-vl-utils", "blake3"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def video_info(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            "file": path.name,
            "bytes": path.stat().st_size,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate),
            "frames": stream.frames,
            "seconds": float(stream.duration * stream.time_base) if stream.duration else None,
            "codec": stream.codec_context.name,
        }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = result["paths"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = []
    floor = paths.get("floor", {})
    if floor.get("status") == "ok":
        rows.append(("decode floor", {"decode all frames": floor["decode_all_ms"]}))
    stream = paths.get("streaming", {})
    if stream.get("status") == "ok":
        t = stream["timings_ms"]
        rows.append(
            (
                "streaming (wall)",
                {"probe": stream["probe_ms"], "select (overlapped)": stream["select_wall_ms"]},
            )
        )
        rows.append(
            (
                "streaming (stage busy)",
                {
                    "decode": t["decode_ms"],
                    "resize/patchify": t["preprocess_ms"],
                    "ViT": t["vit_ms"],
                    "selector": t["selector_ms"],
                },
            )
        )
        rows.append(
            (
                "follow-up",
                {"probe": stream["follow_up"]["probe_ms"], "select": stream["follow_up"]["select_wall_ms"]},
            )
        )
    loader = paths.get("loader", {})
    if loader.get("status") == "ok":
        t = loader["timings_ms"]
        rows.append(
            (
                "loader + processor (wall)",
                {
                    "probe": loader["probe_ms"],
                    "decode+resize (loader)": loader["prepare_ms"],
                    "ViT+selector (processor)": loader["select_wall_ms"],
                },
            )
        )
    legacy = paths.get("legacy", {})
    if legacy.get("status") == "ok":
        rows.append(
            (
                "before (legacy)",
                {
                    k.removesuffix("_ms"): legacy[k]
                    for k in ("decode_ms", "preprocess_ms", "vit_ms", "selector_ms")
                },
            )
        )
    if not rows:  # a --served-only run: nothing to draw
        plt.close(fig)
        return
    colours = {}
    palette = plt.get_cmap("tab10")
    for y, (_label, parts) in enumerate(rows):
        left = 0.0
        for name, ms in parts.items():
            colour = colours.setdefault(name, palette(len(colours) % 10))
            ax_t.barh(
                y,
                ms / 1e3,
                left=left,
                color=colour,
                label=name if name not in ax_t.get_legend_handles_labels()[1] else None,
            )
            left += ms / 1e3
        ax_t.text(left, y, f" {left:.1f} s", va="center", fontsize=8)
    ax_t.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax_t.invert_yaxis()
    ax_t.set_xlabel("seconds")
    ax_t.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    v = result["video"]
    ax_t.set_title(f"{v['width']}x{v['height']} {v['seconds'] or 0:.0f} s, {result['settings']['device']}")
    names = [n for n in ("floor", "streaming", "loader", "legacy") if paths.get(n, {}).get("status") == "ok"]
    values = [paths[n]["peak_rss_delta_mib"] for n in names]
    ax_m.bar(names, values, color=[palette(i) for i in range(len(names))])
    for i, value in enumerate(values):
        ax_m.text(i, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=8)
    ax_m.set_ylabel("peak RSS over the process before it (MiB)")
    ax_m.set_title("host memory per path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    paths, lines = result["paths"], []
    floor = paths.get("floor", {})
    if floor.get("status") == "ok":
        lines.append(f"floor      decode all {floor['frames']} frames: {floor['decode_all_ms'] / 1e3:7.2f} s, "
                     f"peak RSS +{floor['peak_rss_delta_mib']:,.0f} MiB")  # fmt: skip
    s = paths.get("streaming", {})
    if s.get("status") == "ok":
        t = s["timings_ms"]
        lines.append(
            f"streaming  probe {s['probe_ms'] / 1e3:.2f} s + select {s['select_wall_ms'] / 1e3:.2f} s = "
            f"{s['wall_ms'] / 1e3:.2f} s (decode {t['decode_ms'] / 1e3:.2f}, resize/patchify "
            f"{t['preprocess_ms'] / 1e3:.2f}, ViT {t['vit_ms'] / 1e3:.2f}, selector {t['selector_ms'] / 1e3:.3f} s "
            f"busy), peak RSS +{s['peak_rss_delta_mib']:,.0f} MiB, M={s['M']}, frames={s['frames']}"
        )
        f = s["follow_up"]
        lines.append(f"follow-up  {f['wall_ms'] / 1e3:.3f} s (probe {f['probe_ms'] / 1e3:.3f} s), cache hit "
                     f"{f['cache_hit']}, = {f['wall_ms'] / s['wall_ms']:.3f} x cold")  # fmt: skip
    ld = paths.get("loader", {})
    if ld.get("status") == "ok":
        f = ld["follow_up"]
        lines.append(
            f"loader     probe {ld['probe_ms'] / 1e3:.2f} s + decode/resize {ld['prepare_ms'] / 1e3:.2f} s "
            f"(loader) + ViT/selector {ld['select_wall_ms'] / 1e3:.2f} s (processor) = {ld['wall_ms'] / 1e3:.2f} s, "
            f"prepared {ld['prepared_mib']:,.0f} MiB, peak RSS +{ld['peak_rss_delta_mib']:,.0f} MiB; "
            f"follow-up {f['wall_ms'] / 1e3:.3f} s (decoded ahead: {f['prepare_ms'] / 1e3:.3f} s), "
            f"= {f['wall_ms'] / ld['wall_ms']:.3f} x cold"
        )
    legacy = paths.get("legacy", {})
    if legacy.get("status") == "ok":
        lines.append(
            f"legacy     {legacy['wall_ms'] / 1e3:.2f} s (decode {legacy['decode_ms'] / 1e3:.2f}, preprocess "
            f"{legacy['preprocess_ms'] / 1e3:.2f}, ViT {legacy['vit_ms'] / 1e3:.2f} s), peak RSS "
            f"+{legacy['peak_rss_delta_mib']:,.0f} MiB"
        )
    sv = paths.get("served", {})
    if sv.get("status") == "ok":
        lines.append(
            f"served     TTFT cold {sv['cold']['ttft_s']:.2f} s, follow-up {sv['follow_up']['ttft_s']:.3f} s "
            f"({sv['follow_up_over_cold_ttft']:.3f} x), server peak RSS +{sv['server_peak_rss_over_idle_mib']:,.0f} MiB"
        )
    for name, row in paths.items():
        if row.get("status") != "ok":
            lines.append(f"{name}: {row.get('status')}: {row.get('error', '')[-500:]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--resolution", choices=sorted(RESOLUTIONS), default=None, help="default 720p")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "media"))
    parser.add_argument(
        "--content",
        choices=sorted(CONTENTS),
        default="texture",
        help="what the generated video shows: texture (camera-like, costly to decode), smooth (low motion, "
        "cheap to decode), screen (a screen recording)",
    )
    parser.add_argument("--quick", action="store_true", help="a 640x360 video in a temporary directory")
    parser.add_argument(
        "--legacy", action="store_true", help="also run the pre-streaming path (~12 GiB at 10 min 720p)"
    )
    parser.add_argument(
        "--paths",
        default="floor,streaming,loader",
        help="in-process paths to run (floor,streaming,loader)",
    )
    parser.add_argument(
        "--served", action="store_true", help="also vllm serve the tiny checkpoint: cold and follow-up TTFT"
    )
    parser.add_argument("--media-dir", default=None, help=f"where generated videos are cached ({MEDIA_DIR})")
    parser.add_argument("--worker-timeout", type=float, default=1800)
    parser.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--_video", help=argparse.SUPPRESS)
    parser.add_argument("--_model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.resolution = args.resolution or ("360p" if args.quick else "720p")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        args.video, args.model = args._video, args._model
        print(json.dumps(WORKERS[args._worker](args)))
        return 0

    from qtsplus_vllm.testing import write_tiny_checkpoint

    command = shlex.join(
        [sys.executable, "benchmarks/bench_media.py", *(argv if argv is not None else sys.argv[1:])]
    )
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        media_dir = Path(args.media_dir) if args.media_dir else (Path(tmp) if args.quick else MEDIA_DIR)
        clock = time.perf_counter()
        video = ensure_video(media_dir, args.minutes, args.resolution, content=args.content)
        generate_s = time.perf_counter() - clock
        model = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        names = [n for n in args.paths.split(",") if n] + (["legacy"] if args.legacy else [])
        paths = {}
        for name in names:
            print(f"running {name} ...", flush=True)
            paths[name] = run_worker(name, args, model, video)
        if args.served:
            print("running served ...", flush=True)
            try:
                paths["served"] = served(args, model, video, Path(tmp))
            except Exception as err:  # recorded, not fatal for the other paths
                paths["served"] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[-3000:]}
        info = {**video_info(video), "generate_s_if_new": generate_s}
    result = {
        "benchmark": "bench_media",
        "command": command,
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(args.device),
        "versions": versions(),
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "minutes": args.minutes,
            "resolution": args.resolution,
            "content": args.content,
            "model": "tiny (write_tiny_checkpoint, seed 0)",
            "sampling": "fps 1, min 4, max 768 frames; max_pixels 360*420 (defaults)",
            "env": {k: v for k, v in os.environ.items() if k.startswith("QTSPLUS_")},
        },
        "video": info,
        "paths": paths,
    }
    s, f = paths.get("streaming", {}), paths.get("floor", {})
    if s.get("status") == "ok" and args.device == "cpu":
        model = memory_model(info["width"], info["height"], s["frames"], info["bytes"])
        result["memory_model"] = {**model, "measured_peak_rss_delta_mib": s["peak_rss_delta_mib"]}
    if s.get("status") == "ok" and f.get("status") == "ok":
        result["derived"] = {
            "streaming_wall_over_floor": s["wall_ms"] / f["decode_all_ms"],
            "streaming_wall_over_floor_plus_vit": s["wall_ms"]
            / (f["decode_all_ms"] + s["timings_ms"]["vit_ms"]),
            "follow_up_over_cold": s["follow_up"]["wall_ms"] / s["wall_ms"],
        }
    ld = paths.get("loader", {})
    if ld.get("status") == "ok" and f.get("status") == "ok":
        result.setdefault("derived", {}).update(
            loader_wall_over_floor_plus_vit=ld["wall_ms"] / (f["decode_all_ms"] + ld["timings_ms"]["vit_ms"]),
            loader_follow_up_over_cold=ld["follow_up"]["wall_ms"] / ld["wall_ms"],
        )
    out = Path(args.out)
    if out.suffix != ".json":
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kind = "" if args.content == "texture" else f"{args.content}-"
        out = (
            out
            / f"media-{kind}{args.resolution}-{args.minutes:g}min-{args.device.replace(':', '')}-{stamp}.json"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    with contextlib.suppress(ImportError):
        plot(result, out.with_suffix(".png"))
    print(summary(result))
    print(f"wrote {out}")
    return 0 if all(p.get("status") == "ok" for p in paths.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
