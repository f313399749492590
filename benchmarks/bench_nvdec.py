"""NVDEC (FFmpeg's CUDA hwaccel through PyAV) against the software H.264 decoder: speed and equality.

Every source frame of a video is decoded on the API server's host CPU, and on a GPU server that is
the largest part of a long video's time to first token (the H200 suite: 9.9 of 11.7 s for 10 minutes
of 720p30 at 7B). PyAV 18's wheels carry FFmpeg's CUDA hwaccel. For generated 720p30 H.264 videos
this measures, decoding every frame as the server does:

- frames per second of the software decoder (FFmpeg's threads, as the server) and of NVDEC, one
  video at a time and ``--concurrency`` videos at once (one Python thread each: a host feeds several
  requests);
- whether the sampled frames (every ``--every``-th, the 1-fps sampling of 30 fps) are equal: the
  decoded YUV planes, the RGB the server makes from them (``to_ndarray(format="rgb24")``), and the RGB
  made after converting NVDEC's NV12 to yuv420p first — with counts and sizes of any difference.

Nothing here is used by the server yet: the numbers decide whether a decoder setting is
worth building, and whether it can stay exact.

    python benchmarks/bench_nvdec.py --out DIR                 # GPU machine (gpu_suite's nvdec step)
    python benchmarks/bench_nvdec.py --device cpu --seconds 2  # CPU: software rows only, NVDEC skipped
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np
from av.codec.hwaccel import hwdevices_available

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from qtsplus_vllm.testing.videos import make_long_video  # noqa: E402


def hwaccel_for(device: str | None):
    """PyAV's CUDA hwaccel (no silent software fallback), or None for the software decoder."""
    if device is None:
        return None
    from av.codec.hwaccel import HWAccel

    return HWAccel(device_type="cuda", device=device, allow_software_fallback=False)


def decode(path: Path, cuda_device: str | None, every: int, keep: bool = True) -> dict:
    """Decode every frame of ``path``; the sampled frames' YUV and RGB arrays when ``keep``."""
    options = {"hwaccel": hwaccel_for(cuda_device)} if cuda_device is not None else {}
    clock = time.perf_counter()
    sampled, count, pix_fmt = {}, 0, None
    with av.open(str(path), **options) as container:
        stream = container.streams.video[0]
        if cuda_device is None:
            stream.thread_type = "AUTO"  # as the server's decoder
        for index, frame in enumerate(container.decode(stream)):
            count, pix_fmt = index + 1, frame.format.name
            if keep and index % every == 0:
                entry = {"rgb": frame.to_ndarray(format="rgb24")}
                yuv = frame if pix_fmt == "yuv420p" else frame.reformat(format="yuv420p")
                entry["yuv"] = yuv.to_ndarray()
                entry["rgb_via_yuv420p"] = yuv.to_ndarray(format="rgb24")
                sampled[index] = entry
    return {"seconds": time.perf_counter() - clock, "frames": count, "pix_fmt": pix_fmt, "sampled": sampled}


def compare(ours: dict, theirs: dict) -> dict:
    """Equality of the sampled frames, per representation: frames equal, values differing, largest difference."""
    out = {"sampled_frames": len(ours), "same_indices": sorted(ours) == sorted(theirs)}
    for key in ("yuv", "rgb", "rgb_via_yuv420p"):
        equal, differing, largest, values = 0, 0, 0, 0
        for index, entry in ours.items():
            a, b = entry[key], theirs[index][key]
            if a.shape != b.shape:
                differing, largest = -1, -1  # shapes differ: not comparable
                break
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
            equal += int(not diff.any())
            differing += int(np.count_nonzero(diff))
            largest = max(largest, int(diff.max()))
            values += diff.size
        out[key] = {
            "frames_equal": equal,
            "values_differing": differing,
            "values": values,
            "max_abs_diff": largest,
        }
    return out


def concurrent_fps(paths: list[Path], cuda_device: str | None, every: int) -> dict:
    """All frames of all ``paths`` decoded at once, one thread per video: aggregate frames per second."""
    results, errors = [None] * len(paths), []

    def work(i):
        try:
            results[i] = decode(paths[i], cuda_device, every, keep=False)
        except Exception as err:  # noqa: BLE001 - recorded
            errors.append(repr(err)[:300])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    clock = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - clock
    if errors:
        return {"status": "failed", "errors": errors}
    frames = sum(r["frames"] for r in results)
    return {"status": "ok", "videos": len(paths), "frames": frames, "wall_s": wall, "fps": frames / wall}


def measure(
    out: Path, contents: list[str], seconds: float, concurrency: int, every: int, device: str
) -> dict:
    import torch

    record = {
        "benchmark": "nvdec",
        "av": av.__version__,
        "hwdevices_available": list(hwdevices_available()),
        "settings": {
            "contents": contents,
            "seconds": seconds,
            "size": [1280, 720],
            "fps": 30,
            "every": every,
            "concurrency": concurrency,
        },  # fmt: skip
        "cases": [],
    }
    cuda = device != "cpu" and torch.cuda.is_available() and "cuda" in record["hwdevices_available"]
    cuda_device = str(torch.cuda.current_device()) if cuda else None
    if not cuda:
        record["nvdec_skipped"] = "no CUDA device, or this FFmpeg has no cuda hwaccel"
    with tempfile.TemporaryDirectory(prefix="qtsplus-nvdec-") as tmp:
        for content in contents:
            paths = [make_long_video(Path(tmp) / f"{content}{i}.mp4", seconds, content=content, seed=i)
                     for i in range(max(1, concurrency))]  # fmt: skip
            case = {"content": content, "bytes": paths[0].stat().st_size}
            soft = decode(paths[0], None, every)
            case["software"] = {k: soft[k] for k in ("seconds", "frames", "pix_fmt")}
            case["software"]["fps"] = soft["frames"] / soft["seconds"]
            case["software_concurrent"] = concurrent_fps(paths, None, every)
            if cuda:
                try:
                    decode(paths[0], cuda_device, every, keep=False)  # warm-up: device context, decoder
                    hard = decode(paths[0], cuda_device, every)
                    case["nvdec"] = {k: hard[k] for k in ("seconds", "frames", "pix_fmt")}
                    case["nvdec"]["fps"] = hard["frames"] / hard["seconds"]
                    case["equality"] = compare(hard["sampled"], soft["sampled"])
                    case["nvdec_concurrent"] = concurrent_fps(paths, cuda_device, every)
                except Exception as err:  # noqa: BLE001 - a driver without NVDEC: recorded, not fatal
                    case["nvdec"] = {"status": "failed", "error": repr(err)[:500]}
            record["cases"].append(case)
            print(json.dumps(case, default=str)[:800], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (NVDEC rows too) or cpu (software rows only)")
    parser.add_argument("--contents", default="texture,smooth")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--every", type=int, default=30, help="sample every N-th frame (1 fps of 30)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "nvdec" / "nvdec.json")
    args = parser.parse_args(argv)
    out = args.out if args.out.suffix == ".json" else args.out / "nvdec.json"
    measure(out, args.contents.split(","), args.seconds, args.concurrency, args.every, args.device)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
