"""Summary of a results JSONL: accuracy with intervals, paired tests, tokens and latency per mode.

Definitions (``docs/evaluation.md`` explains them):

- *answered*: requests that returned a reply; *failed*: requests that did not after retries. Failed
  items are left out of every accuracy (they are no answer, not a wrong one) and counted apart.
- *accuracy*: right / answered; a reply with no extractable letter (*unparsed*) is wrong.
- 95 % intervals: percentile bootstrap over items (:mod:`.stats`).
- paired comparison of each mode against the baseline (the first ``off`` mode, else the first mode) on
  the items answered in both: the accuracy difference with a paired bootstrap interval, the
  discordant counts, McNemar's exact p-value, and the fraction of items whose chosen letter changed.
- prompt tokens: mean and p90 of ``usage.prompt_tokens``; TTFT and end-to-end latency: p50 / p90.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .client import latest_records, read_records
from .stats import bootstrap_accuracy, bootstrap_paired_difference, mcnemar_exact, mean, percentile


def _accuracy(records: list[dict[str, Any]]) -> dict[str, Any]:
    correct = [bool(r["correct"]) for r in records]
    lo, hi = bootstrap_accuracy(correct)
    return {
        "n": len(correct),
        "accuracy": sum(correct) / len(correct) if correct else None,
        "ci95": [lo, hi] if correct else None,
    }


def summarize(
    records: list[dict[str, Any]], run_info: dict[str, Any] | None = None, baseline: str | None = None
) -> dict[str, Any]:
    """The summary of the latest record per (mode, item); ``baseline``: the mode the others are paired
    against (default: the first ``off`` mode, e.g. ``off`` or ``off,fps=2``, else the first mode)."""
    run_info = run_info or {}
    latest = latest_records(records)
    order = [m["name"] for m in run_info.get("modes", [])]
    order += [m for m in dict.fromkeys(mode for mode, _ in latest) if m not in order]
    by_mode = {m: [r for (mode, _), r in latest.items() if mode == m] for m in order}
    by_mode = {m: rs for m, rs in by_mode.items() if rs}
    settings = {m["name"]: m.get("settings", {}) for m in run_info.get("modes", [])}

    modes = []
    for name, rs in by_mode.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        failed = [r for r in rs if r.get("status") != "ok"]
        entry: dict[str, Any] = {
            "mode": name,
            "settings": settings.get(name, {}),
            "items": len(rs),
            "answered": len(ok),
            "failed": len(failed),
            "unparsed": sum(r.get("pred") is None for r in ok),
            "unparsed_rate": sum(r.get("pred") is None for r in ok) / len(ok) if ok else None,
            **_accuracy(ok),
            "prompt_tokens": {
                "mean": mean([r.get("prompt_tokens") for r in ok]),
                "p90": percentile([r.get("prompt_tokens") for r in ok], 90),
            },
            "ttft_s": {
                "p50": percentile([r.get("ttft_s") for r in ok], 50),
                "p90": percentile([r.get("ttft_s") for r in ok], 90),
            },
            "latency_s": {
                "p50": percentile([r.get("latency_s") for r in ok], 50),
                "p90": percentile([r.get("latency_s") for r in ok], 90),
            },
            "failures": sorted({str(r.get("error", ""))[:200] for r in failed})[:5],
            "groups": {},
        }
        for key in sorted({k for r in ok for k in (r.get("groups") or {})}):
            values = sorted({(r.get("groups") or {}).get(key, "unknown") for r in ok})
            entry["groups"][key] = {
                value: _accuracy([r for r in ok if (r.get("groups") or {}).get(key, "unknown") == value])
                for value in values
            }
        modes.append(entry)

    paired = []
    names = list(by_mode)
    if names:
        if baseline is None:  # the first selection-off mode ("off", "off,fps=2"), else the first mode
            baseline = next((n for n in names if n == "off" or n.startswith("off,")), names[0])
        elif baseline not in by_mode:
            raise ValueError(f"baseline {baseline!r} is not one of the modes: {', '.join(names)}")
        base = {r["id"]: r for r in by_mode[baseline] if r.get("status") == "ok"}
        for name in names:
            if name == baseline:
                continue
            other = {r["id"]: r for r in by_mode[name] if r.get("status") == "ok"}
            common = [i for i in base if i in other]
            a = [bool(base[i]["correct"]) for i in common]
            b = [bool(other[i]["correct"]) for i in common]
            only_a = sum(x and not y for x, y in zip(a, b, strict=True))
            only_b = sum(y and not x for x, y in zip(a, b, strict=True))
            lo, hi = bootstrap_paired_difference(a, b)
            paired.append(
                {
                    "baseline": baseline,
                    "mode": name,
                    "n": len(common),
                    "baseline_accuracy": sum(a) / len(a) if a else None,
                    "mode_accuracy": sum(b) / len(b) if b else None,
                    "difference": (sum(b) - sum(a)) / len(a) if a else None,
                    "ci95": [lo, hi] if a else None,
                    "only_baseline_right": only_a,
                    "only_mode_right": only_b,
                    "mcnemar_p": mcnemar_exact(only_a, only_b),
                    "changed": sum(base[i].get("pred") != other[i].get("pred") for i in common) / len(common)
                    if common
                    else None,
                }
            )
    dataset = run_info.get("dataset", {})
    return {
        "endpoint": run_info.get("endpoint"),
        "model": run_info.get("model"),
        "dataset": dataset,
        "modes": modes,
        "paired": paired,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "–" if x is None else format(x, fmt)


def to_markdown(summary: dict[str, Any], title: str = "Evaluation report") -> str:
    lines = [f"## {title}", ""]
    dataset = summary.get("dataset") or {}
    if dataset:
        lines.append(
            f"Dataset `{dataset.get('layout')}` ({dataset.get('source')}): {dataset.get('items')} items evaluated, "
            f"{len(dataset.get('missing', []))} with a missing video, {len(dataset.get('skipped', []))} skipped. "
            f"Model `{summary.get('model')}` at {summary.get('endpoint')}."
        )
        lines.append("")
    lines += [
        "| mode | answered | failed | unparsed | accuracy % [95% CI] | prompt tokens mean / p90 "
        "| TTFT s p50 / p90 | latency s p50 / p90 |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for m in summary["modes"]:
        lines.append(
            f"| {m['mode']} | {m['answered']} | {m['failed']} | {m['unparsed']} | {_pct(m['accuracy'])}{_ci(m['ci95'])} "
            f"| {_num(m['prompt_tokens']['mean'])} / {_num(m['prompt_tokens']['p90'])} "
            f"| {_num(m['ttft_s']['p50'], '.2f')} / {_num(m['ttft_s']['p90'], '.2f')} "
            f"| {_num(m['latency_s']['p50'], '.2f')} / {_num(m['latency_s']['p90'], '.2f')} |"
        )
    if len(summary["modes"]) > 1:
        lines += [
            "",
            "Modes ran one after another in this order. With the server's ViT-feature or processor cache on, "
            "later modes reuse the first one's decoding and ViT: compare latencies from a server with caches off.",
        ]
    if summary["paired"]:
        lines += [
            "",
            "| paired (same items) | n | Δ accuracy pts [95% CI] | only baseline right | only mode right "
            "| McNemar p | answers changed |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for p in summary["paired"]:
            diff = "–" if p["difference"] is None else f"{100 * p['difference']:+.1f}"
            lines.append(
                f"| {p['mode']} vs {p['baseline']} | {p['n']} | {diff}{_ci(p['ci95'])} | {p['only_baseline_right']} "
                f"| {p['only_mode_right']} | {p['mcnemar_p']:.3g} | {_pct(p['changed'])} % |"
            )
    keys = sorted({k for m in summary["modes"] for k in m["groups"]})
    for key in keys:
        values = sorted({v for m in summary["modes"] for v in m["groups"].get(key, {})})
        lines += ["", f"| {key} | " + " | ".join(m["mode"] for m in summary["modes"]) + " |"]
        lines.append("|---|" + "---|" * len(summary["modes"]))
        for value in values:
            cells = []
            for m in summary["modes"]:
                g = m["groups"].get(key, {}).get(value)
                cells.append("–" if g is None else f"{_pct(g['accuracy'])}{_ci(g['ci95'])} (n={g['n']})")
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
    failures = [(m["mode"], f) for m in summary["modes"] for f in m["failures"]]
    if failures:
        lines += ["", "Failed requests (first errors per mode):", ""]
        lines += [f"- `{mode}`: {error}" for mode, error in failures]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Accuracy (with its 95 % interval) against mean prompt tokens, one point per mode; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = [
        m for m in summary["modes"] if m["accuracy"] is not None and m["prompt_tokens"]["mean"] is not None
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ys = []
    for m in points:
        x, y = m["prompt_tokens"]["mean"], 100 * m["accuracy"]
        lo, hi = (100 * m["ci95"][0], 100 * m["ci95"][1]) if m["ci95"] else (y, y)
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=4, label=m["mode"])
        ys += [lo, hi]
    if ys:  # some room around the intervals, inside 0-100
        pad = max(2.0, (10 - (max(ys) - min(ys))) / 2)
        ax.set_ylim(max(0.0, min(ys) - pad), min(100.0, max(ys) + pad))
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("mean prompt tokens per request")
    ax.set_ylabel("accuracy % (95% bootstrap interval)")
    model = str(summary.get("model") or "model")
    model = model if ";" in model else Path(model).name  # a local path or Hub id: its last part
    ax.set_title(f"Accuracy vs prompt tokens: {model}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


RESULTS = "results.jsonl"
RUN_INFO = "run.json"
SUMMARY = "summary.json"
TABLE = "report.md"
PLOT = "accuracy_vs_tokens.png"


def write_report(
    out_dir: Path, title: str = "Evaluation report", baseline: str | None = None
) -> dict[str, Any]:
    """Summarize ``out_dir/results.jsonl`` into ``summary.json``, ``report.md`` and the plot; returns the summary."""
    out_dir = Path(out_dir)
    info_path = out_dir / RUN_INFO
    run_info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    summary = summarize(read_records(out_dir / RESULTS), run_info, baseline)
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / TABLE).write_text(to_markdown(summary, title), encoding="utf-8")
    plot(summary, out_dir / PLOT)
    return summary


def combine(out_dir: Path, runs: list[tuple[str, Path]]) -> None:
    """Merge the results of several runs (e.g. our server and a stock vLLM one, on the same items) into
    ``out_dir``: each mode is renamed ``label:mode``; then :func:`write_report` pairs them like modes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged: list[dict[str, Any]] = []
    info: dict[str, Any] = {"endpoint": [], "model": [], "modes": [], "runs": {}}
    for label, run_dir in runs:
        run_dir = Path(run_dir)
        info_path = run_dir / RUN_INFO
        run_info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        records = list(latest_records(read_records(run_dir / RESULTS)).values())
        if not records:
            raise ValueError(f"{run_dir}: no results")
        info["runs"][label] = {
            "dir": str(run_dir),
            "endpoint": run_info.get("endpoint"),
            "model": run_info.get("model"),
        }
        info["dataset"] = info.get("dataset") or run_info.get("dataset", {})
        info["endpoint"].append(f"{label}: {run_info.get('endpoint')}")
        info["model"].append(f"{label}: {run_info.get('model')}")
        names = [m["name"] for m in run_info.get("modes", [])] or list(
            dict.fromkeys(r["mode"] for r in records)
        )
        settings = {m["name"]: m.get("settings", {}) for m in run_info.get("modes", [])}
        info["modes"] += [{"name": f"{label}:{name}", "settings": settings.get(name, {})} for name in names]
        merged += [{**r, "mode": f"{label}:{r['mode']}"} for r in records]
    info["endpoint"] = "; ".join(info["endpoint"])
    info["model"] = "; ".join(info["model"])
    (out_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    with (out_dir / RESULTS).open("w", encoding="utf-8") as sink:
        sink.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in merged)
