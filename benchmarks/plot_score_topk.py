"""Plot a bench_score_topk.py result file: gate time vs M per model and L, log scale.

python benchmarks/plot_score_topk.py benchmarks/results/score_topk-....json [--out FILE.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [  # (row key, label, style)
    ("eager_ms", "eager gate (reference)", "o-"),
    ("torch_ms", "our gate, torch path", "s-"),
    ("triton_ms", "our gate, Triton kernel", "^-"),
    ("floor", "floor (bytes / BW, FLOP / rate)", "k--"),
    ("prefill_ms", "LM prefill of the same M tokens", "x:"),
]


def value(row: dict, key: str) -> float | None:
    v = row.get(key)
    return v["ms"] if isinstance(v, dict) else v


def plot(result: dict, out: Path) -> None:
    panels = sorted({(r["model"], r["L"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (model, ell) in zip(axes[0], panels, strict=True):
        rows = sorted(
            (r for r in result["rows"] if r["model"] == model and r["L"] == ell), key=lambda r: r["M"]
        )
        for key, label, style in SERIES:
            pts = [(r["M"], value(r, key)) for r in rows if value(r, key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="M (visual tokens)", ylabel="ms", title=f"{model}, L={ell}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"QTS+ gate on {result['device']} ({result['dtype']}, median of {result['iters']})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or args.result.with_suffix(".png")
    plot(json.loads(args.result.read_text()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
