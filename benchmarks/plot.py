"""Plots from bench_serving.py result files: one line per system.

    python benchmarks/plot.py benchmarks/results/serving-*.json --out-dir benchmarks/results

Writes ``serving-latency-vs-length.png`` (median TTFT and prompt tokens against video length, at
``--concurrency``, default the lowest level present) and ``serving-throughput-vs-concurrency.png``
(requests/s and median TTFT against concurrency, for ``--video``, default the longest video);
with ``--follow-up`` results (``bench_serving.py --follow-up``) also ``serving-follow-up.png``
(median TTFT of a cold question and of a follow-up on the same video, per video length).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def seconds(label: str) -> float:
    return (
        float(label.rstrip("s"))
        if label.endswith("s") and label[:-1].replace(".", "").isdigit()
        else float("nan")
    )


def load(paths: list[Path], benchmark: str = "serving") -> dict[str, list[dict]]:
    """Rows by system (later files for the same system add rows)."""
    rows: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        result = json.loads(path.read_text())
        if result.get("benchmark") == benchmark:
            rows[result["system"]].extend(result["rows"])
    return rows


def plot_follow_up(rows: dict[str, list[dict]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for system, rs in sorted(rows.items()):
        lengths = sorted({r["video"] for r in rs}, key=seconds)
        xs = range(len(lengths))
        for offset, phase in ((-0.2, "cold"), (0.2, "follow-up")):
            ttft = [
                next(r["ttft_s"]["p50"] for r in rs if r["video"] == v and r["phase"] == phase)
                for v in lengths
            ]
            bars = ax.bar([x + offset for x in xs], ttft, width=0.4, label=f"{system}: {phase}")
            ax.bar_label(bars, fmt="%.2f s", fontsize=8)
        ax.set_xticks(list(xs), lengths)
    ax.set(xlabel="video length", ylabel="median TTFT (s)", title="Follow-up question on the same video")
    ax.legend()
    fig.tight_layout()
    path = out / "serving-follow-up.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency_vs_length(rows: dict[str, list[dict]], concurrency: int | None, out: Path) -> Path:
    levels = sorted({r["concurrency"] for rs in rows.values() for r in rs})
    concurrency = concurrency or levels[0]
    fig, (ax_ttft, ax_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    for system, rs in sorted(rows.items()):
        points = sorted((seconds(r["video"]), r) for r in rs if r["concurrency"] == concurrency)
        points = [(x, r) for x, r in points if x == x]
        if not points:
            continue
        xs = [x for x, _ in points]
        ax_ttft.plot(xs, [r["ttft_s"]["p50"] for _, r in points], marker="o", label=system)
        ax_tokens.plot(xs, [r["prompt_tokens"]["p50"] for _, r in points], marker="o", label=system)
    ax_ttft.set(
        xlabel="video length (s)",
        ylabel="median TTFT (s)",
        title=f"TTFT vs video length (concurrency {concurrency})",
    )
    ax_tokens.set(
        xlabel="video length (s)", ylabel="median prompt tokens", title="prompt tokens vs video length"
    )
    for ax in (ax_ttft, ax_tokens):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "serving-latency-vs-length.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_throughput_vs_concurrency(rows: dict[str, list[dict]], video: str | None, out: Path) -> Path:
    labels = sorted({r["video"] for rs in rows.values() for r in rs}, key=seconds)
    video = video or labels[-1]
    fig, (ax_rps, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for system, rs in sorted(rows.items()):
        points = sorted((r["concurrency"], r) for r in rs if r["video"] == video)
        if not points:
            continue
        xs = [c for c, _ in points]
        ax_rps.plot(xs, [r["requests_per_s"] for _, r in points], marker="o", label=system)
        ax_ttft.plot(xs, [r["ttft_s"]["p50"] for _, r in points], marker="o", label=system)
    ax_rps.set(
        xlabel="concurrent requests", ylabel="requests/s", title=f"throughput vs concurrency ({video} video)"
    )
    ax_ttft.set(
        xlabel="concurrent requests", ylabel="median TTFT (s)", title=f"TTFT vs concurrency ({video} video)"
    )
    for ax in (ax_rps, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "serving-throughput-vs-concurrency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--video", default=None)
    args = parser.parse_args(argv)
    rows = load(args.results)
    follow_up = load(args.results, "serving-follow-up")
    if not rows and not follow_up:
        raise SystemExit("no serving results in the given files")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if rows:
        paths += [
            plot_latency_vs_length(rows, args.concurrency, args.out_dir),
            plot_throughput_vs_concurrency(rows, args.video, args.out_dir),
        ]
    if follow_up:
        paths.append(plot_follow_up(follow_up, args.out_dir))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
