"""Tables and a gain plot from compare_serving.py runs at several video lengths.

    python benchmarks/compare_report.py benchmarks/results/cpu-7b-proportional-720p-{1,5}min-chunked \
        --out benchmarks/results/cpu-7b-proportional-gain.png

Each argument is one ``compare_serving.py`` result folder (``<tag>/sweep/serving-<system>.json``, one
concurrency level). Prints a Markdown table (one row per folder and system: answered requests,
prompt tokens, TTFT p50/p90, time per output token, requests/s, CPU seconds per request of each
server process, peak RSS) and the ratios of qtsplus against every other system that answered; with
``--out`` draws requests/s and median TTFT against the video length, one line per system.

CPU seconds per request divide each process's CPU seconds (``server_processes``: start-up, warm-up
and timed requests) by the requests the server answered, warm-up included.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SYSTEMS = ("qtsplus", "all-tokens", "stock", "stock-one-step", "evs")
PROCESS_NAMES = {"vllm": "API server", "VLLM::EngineCore": "engine core", "VLLM::Worker": "worker"}


def load_run(folder: Path) -> dict[str, dict]:
    """system -> bench_serving result, for one compare_serving result folder."""
    runs = {}
    for path in sorted(folder.glob("**/serving-*.json")):
        result = json.loads(path.read_text())
        if result.get("benchmark") == "serving":
            runs[result["system"]] = result
    return runs


def summary(result: dict) -> dict:
    """The figures of one system's single row, with CPU seconds per answered request per process."""
    row = result["rows"][0]
    answered = row["requests"] - row["failed"]
    warmup = 1
    processes = (result.get("server_processes") or {}).get("processes", [])
    cpu = {}
    for proc in processes:
        name = PROCESS_NAMES.get(proc["name"])
        if name and answered:
            cpu[name] = cpu.get(name, 0.0) + proc.get("cpu_s", 0.0) / (answered + warmup)
    rss = {PROCESS_NAMES[p["name"]]: p["peak_rss_gib"] for p in processes if p["name"] in PROCESS_NAMES}
    return {
        "video": row["video"],
        "requests": row["requests"],
        "answered": answered,
        "errors": row.get("errors", []),
        "prompt_tokens": row["prompt_tokens"]["p50"],
        "ttft_p50": row["ttft_s"]["p50"],
        "ttft_p90": row["ttft_s"]["p90"],
        "tpot_p50": row["itl_s"]["p50"],
        "requests_per_s": row["requests_per_s"],
        "cpu_s_per_request": cpu,
        "peak_rss_gib": rss,
        "tree_peak_rss_gib": (result.get("server_processes") or {}).get("peak_tree_rss_gib"),
        "killed_for_memory": (result.get("server_processes") or {}).get("killed_for_memory", False),
    }


def _fmt(value: float, digits: int = 1) -> str:
    return (
        "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"
    )


def table(runs: dict[str, dict[str, dict]]) -> str:
    head = (
        "| video | system | answered | prompt tokens p50 | TTFT p50 / p90 (s) | time per output token p50 (ms) "
        "| req/s | CPU-s per request: API server / engine core / worker | peak RSS API server / worker (GiB) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for label, systems in runs.items():
        for system in SYSTEMS:
            if system not in systems:
                continue
            s = summary(systems[system])
            cpu = s["cpu_s_per_request"]
            rss = s["peak_rss_gib"]
            ok = f"{s['answered']}/{s['requests']}" + (
                " (killed for memory)" if s["killed_for_memory"] else ""
            )
            if not s["answered"]:
                lines.append(f"| {label} | {system} | {ok} | — | — | — | 0 | — | "
                             f"{_fmt(rss.get('API server'))} / {_fmt(rss.get('worker'))} |")  # fmt: skip
                continue
            lines.append(
                f"| {label} | {system} | {ok} | {s['prompt_tokens']:,.0f} | {_fmt(s['ttft_p50'])} / "
                f"{_fmt(s['ttft_p90'])} | {_fmt(s['tpot_p50'] * 1e3, 0)} | {s['requests_per_s']:.4f} | "
                f"{_fmt(cpu.get('API server'))} / {_fmt(cpu.get('engine core'))} / {_fmt(cpu.get('worker'))} | "
                f"{_fmt(rss.get('API server'))} / {_fmt(rss.get('worker'))} |"
            )
    return head + "\n".join(lines)


def ratios(runs: dict[str, dict[str, dict]]) -> list[dict]:
    """qtsplus against every other system that answered every request, per video length."""
    out = []
    for label, systems in runs.items():
        if "qtsplus" not in systems:
            continue
        q = summary(systems["qtsplus"])
        for other in SYSTEMS[1:]:
            if other not in systems:
                continue
            o = summary(systems[other])
            entry = {"video": label, "against": other}
            if o["answered"] and o["answered"] == o["requests"]:
                entry.update(
                    requests_per_s_ratio=q["requests_per_s"] / o["requests_per_s"],
                    ttft_p50_ratio=q["ttft_p50"] / o["ttft_p50"],
                )
            else:
                entry["not_comparable"] = (
                    f"{other} answered {o['answered']}/{o['requests']}: " + "; ".join(o["errors"])[:300]
                )
            out.append(entry)
    return out


def plot(runs: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in SYSTEMS:
        points = []
        for systems in runs.values():
            if system in systems:
                s = summary(systems[system])
                if s["answered"] == s["requests"]:
                    points.append((float(s["video"].rstrip("s")) / 60, s["requests_per_s"], s["ttft_p50"]))
        if not points:
            continue
        points.sort()
        minutes = [p[0] for p in points]
        left.plot(minutes, [p[1] for p in points], marker="o", label=system)
        right.plot(minutes, [p[2] for p in points], marker="o", label=system)
    missing = [f"{system} at {float(label.rstrip('s')) / 60:g} min ({summary(r)['answered']}/{summary(r)['requests']} answered)"
               for label, systems in runs.items() for system, r in systems.items()
               if summary(r)["answered"] != summary(r)["requests"]]  # fmt: skip
    if missing:
        fig.text(0.01, 0.01, "not plotted: " + "; ".join(missing), fontsize=8, color="0.35")
    left.set(xlabel="video minutes (720p30)", ylabel="requests / s", title="throughput, 8 concurrent")
    right.set(xlabel="video minutes (720p30)", ylabel="seconds", title="median TTFT, 8 concurrent")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_yscale("log")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kv_summary(result: dict) -> dict:
    """The engine's side of one system's run (``engine_metrics`` of bench_serving), or {} without it."""
    metrics = result.get("engine_metrics") or {}
    row = result["rows"][0]
    keys = ("max_running", "max_waiting", "max_kv_cache_usage", "preemptions", "generation_tokens_per_s")
    return {
        **{k: metrics[k] for k in keys if k in metrics},
        "time_to_answer_all_s": row.get("wall_s"),
        "answered": row["requests"] - row["failed"],
        "requests": row["requests"],
    }


def plot_running(folder: Path, path: Path) -> Path | None:
    """Left: requests running at once (and waiting, dashed) over the timed phase, one colour per
    system. Right: each system's time to answer every timed request and its output tokens/s."""
    runs = load_run(folder)
    traced = {s: r for s, r in runs.items() if (r.get("engine_metrics") or {}).get("trace")}
    if not traced:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.6, 1]})
    names, walls, rates, colours = [], [], [], []
    for i, system in enumerate(s for s in SYSTEMS if s in traced):
        metrics, k = traced[system]["engine_metrics"], kv_summary(traced[system])
        start = metrics.get("marks", {}).get("timed", 0.0)
        points = [p for p in metrics["trace"] if p["t"] >= start]
        times = [(p["t"] - start) / 60 for p in points]
        colour = f"C{i}"
        label = (f"{system}: {k['answered']}/{k['requests']} answered, at most {k.get('max_running', 0):.0f} "
                 f"running, {k.get('preemptions', 0):.0f} preemptions")  # fmt: skip
        ax.step(times, [p.get("running", 0) for p in points], where="post", color=colour, label=label)
        ax.step(times, [p.get("waiting", 0) for p in points], where="post", color=colour, ls="--", alpha=0.5)
        names.append(system)
        walls.append((k["time_to_answer_all_s"] or math.nan) / 60)
        rates.append(k.get("generation_tokens_per_s", math.nan))
        colours.append(colour)
    ax.set(xlabel="minutes since the timed requests were sent", ylabel="requests",
           title="requests running at once (solid) and waiting (dashed) in vLLM's scheduler")  # fmt: skip
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ys = range(len(names))
    bars.barh(ys, walls, color=colours)
    for y, wall, rate in zip(ys, walls, rates, strict=True):
        shown = f"{wall:.1f} min" if wall >= 2 else f"{wall * 60:.1f} s"
        bars.text(
            wall if wall == wall else 0, y, f" {shown}\n {rate:.2f} output tok/s", va="center", fontsize=8
        )
    bars.set_yticks(list(ys), names)
    bars.invert_yaxis()
    bars.set_xlim(0, max([w for w in walls if w == w] or [1]) * 2.2)
    bars.set(xlabel="minutes", title="time to answer all timed requests")
    bars.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="compare_serving.py result folders")
    p.add_argument("--out", type=Path, help="PNG: requests/s and median TTFT against video length")
    p.add_argument("--json", type=Path, help="write the table's figures and the ratios as JSON")
    args = p.parse_args(argv)
    runs = {}
    for folder in args.folders:
        systems = load_run(folder)
        if not systems:
            raise SystemExit(f"{folder}: no serving-*.json")
        label = summary(next(iter(systems.values())))["video"]
        runs.setdefault(label, {}).update(systems)
    runs = dict(sorted(runs.items(), key=lambda kv: float(kv[0].rstrip("s"))))
    print(table(runs))
    print()
    for r in ratios(runs):
        if "not_comparable" in r:
            print(f"{r['video']}: qtsplus vs {r['against']}: not comparable ({r['not_comparable']})")
        else:
            print(f"{r['video']}: qtsplus vs {r['against']}: {r['requests_per_s_ratio']:.2f}x req/s, "
                  f"{r['ttft_p50_ratio']:.2f}x median TTFT")  # fmt: skip
    if args.json:
        figures = {label: {s: summary(r) for s, r in systems.items()} for label, systems in runs.items()}
        args.json.write_text(json.dumps({"runs": figures, "ratios": ratios(runs)}, indent=1) + "\n")
    if args.out:
        plot(runs, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
