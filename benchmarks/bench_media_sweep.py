"""The media path across kinds of content, sizes and lengths, each against its own decode floor (issue 20).

Runs ``bench_media.py`` (floor, in-process streaming path and, with ``--served``, a real ``vllm serve``
of the tiny checkpoint) once per case of ``--contents`` × ``--resolutions`` × ``--minutes``, each in its
own process, then writes one summary JSON and a plot: per case the decode floor, the streamed path's
stages (decode, preprocess, ViT) and wall time, the served TTFT, and the targets of issue 20 —

- TTFT ≤ 1.25 × (decode floor + ViT) + 1 s (served TTFT where measured, else the in-process wall time);
- ``preprocess_ms`` ≤ the decode floor.

    python benchmarks/bench_media_sweep.py --contents smooth,texture,screen --resolutions 720p,1080p \\
        --minutes 1,10 --served --out benchmarks/results/media-sweep

Each case's full JSON (and plot) is kept beside the summary. Generated videos are cached in
``benchmarks/media/`` (git-ignored): the first sweep spends most of its time encoding them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_media  # noqa: E402  (a sibling script)


def case_summary(result: dict) -> dict:
    """The numbers the targets need, from one ``bench_media`` result."""
    paths, settings = result["paths"], result["settings"]
    floor = paths.get("floor", {})
    stream = paths.get("streaming", {})
    served = paths.get("served", {})
    row = {
        "content": settings.get("content", "texture"),
        "resolution": settings["resolution"],
        "minutes": settings["minutes"],
        "video_bytes": result["video"].get("bytes"),
        "status": {name: p.get("status") for name, p in paths.items()},
    }
    if floor.get("status") != "ok" or stream.get("status") != "ok":
        return row
    timings = stream["timings_ms"]
    floor_ms, vit_ms = floor["decode_all_ms"], timings["vit_ms"]
    target_ms = 1.25 * (floor_ms + vit_ms) + 1000.0
    ttft_ms = None
    if served.get("status") == "ok" and served["cold"]["ttft_s"] is not None:
        ttft_ms = served["cold"]["ttft_s"] * 1e3
    row.update(
        floor_ms=floor_ms,
        decode_ms=timings.get("decode_ms"),
        preprocess_ms=timings.get("preprocess_ms"),
        vit_ms=vit_ms,
        wall_ms=stream["wall_ms"],
        served_ttft_ms=ttft_ms,
        target_ms=target_ms,
        ttft_target_met=(ttft_ms if ttft_ms is not None else stream["wall_ms"]) <= target_ms,
        ttft_target_measured_on="served TTFT" if ttft_ms is not None else "in-process wall time",
        preprocess_within_floor=timings.get("preprocess_ms", float("inf")) <= floor_ms,
        peak_rss_delta_mib=stream.get("peak_rss_delta_mib"),
    )
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "floor_ms" in r]
    if not rows:
        return
    labels = [f"{r['content']}\n{r['resolution']} {r['minutes']:g} min" for r in rows]
    xs = range(len(rows))
    width = 0.16
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)) + 2.5, 4.5))
    series = [
        ("decode floor", "floor_ms", "#777777"),
        ("preprocess", "preprocess_ms", "#4c72b0"),
        ("ViT", "vit_ms", "#55a868"),
        ("streamed wall", "wall_ms", "#c44e52"),
        ("served TTFT", "served_ttft_ms", "#8172b2"),
    ]
    for k, (name, key, colour) in enumerate(series):
        values = [(r.get(key) or 0) / 1e3 for r in rows]
        ax.bar([x + (k - 2) * width for x in xs], values, width, label=name, color=colour)
    for x, r in enumerate(rows):
        ax.hlines(r["target_ms"] / 1e3, x - 2.5 * width, x + 2.5 * width, colors="black", linestyles="--")
    ax.plot([], [], "k--", label="target: 1.25 × (floor + ViT) + 1 s")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("seconds (one request alone)")
    ax.set_title("Media path by content kind, tiny checkpoint on CPU")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contents", default="smooth,texture,screen")
    parser.add_argument("--resolutions", default="720p,1080p")
    parser.add_argument("--minutes", default="1,10")
    parser.add_argument("--served", action="store_true", help="also measure TTFT with a real vllm serve")
    parser.add_argument("--out", default=str(HERE / "results" / "media-sweep"))
    parser.add_argument("--media-dir", default=None)
    args = parser.parse_args(argv)
    contents = [c for c in args.contents.split(",") if c]
    unknown = sorted(set(contents) - set(bench_media.CONTENTS))
    if unknown:
        parser.error(f"unknown content kinds {unknown}; known: {sorted(bench_media.CONTENTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows, failures = [], 0
    for content in contents:
        for resolution in [r for r in args.resolutions.split(",") if r]:
            for minutes in [float(m) for m in args.minutes.split(",") if m]:
                case_json = out / f"case-{content}-{resolution}-{minutes:g}min-{stamp}.json"
                command = [
                    sys.executable,
                    str(HERE / "bench_media.py"),
                    "--content", content,
                    "--resolution", resolution,
                    "--minutes", f"{minutes:g}",
                    "--paths", "floor,streaming",
                    "--out", str(case_json),
                    *(["--served"] if args.served else []),
                    *(["--media-dir", args.media_dir] if args.media_dir else []),
                ]  # fmt: skip
                print(f"== {content} {resolution} {minutes:g} min", flush=True)
                code = subprocess.run(command).returncode
                if not case_json.is_file():
                    rows.append(
                        {"content": content, "resolution": resolution, "minutes": minutes, "exit": code}
                    )
                    failures += 1
                    continue
                failures += code != 0
                row = case_summary(json.loads(case_json.read_text()))
                row["case_json"] = case_json.name
                rows.append(row)
    summary = {
        "benchmark": "bench_media_sweep",
        "command": shlex.join([sys.executable, "benchmarks/bench_media_sweep.py", *(argv or sys.argv[1:])]),
        "git_sha": bench_media.git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": bench_media.machine("cpu"),
        "versions": bench_media.versions(),
        "targets": {
            "ttft": "TTFT <= 1.25 * (decode floor + ViT) + 1 s, one request alone, default settings",
            "preprocess": "preprocess_ms <= decode floor",
        },
        "cases": rows,
    }
    path = out / f"sweep-{stamp}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    try:
        plot(rows, path.with_suffix(".png"))
    except ImportError:
        pass
    for r in rows:
        if "floor_ms" in r:
            print(
                f"{r['content']:8} {r['resolution']:5} {r['minutes']:>4g} min  floor {r['floor_ms'] / 1e3:6.1f} s  "
                f"preprocess {r['preprocess_ms'] / 1e3:6.1f} s  ViT {r['vit_ms'] / 1e3:6.1f} s  "
                f"wall {r['wall_ms'] / 1e3:6.1f} s  TTFT {((r['served_ttft_ms'] or 0) / 1e3):6.1f} s  "
                f"target {r['target_ms'] / 1e3:6.1f} s  met {r['ttft_target_met']}"
            )
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
