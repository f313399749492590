"""``qtsplus-eval``: evaluate an OpenAI-compatible endpoint on long-video multiple-choice QA.

    qtsplus-eval run --data ~/Video-MME --base-url http://localhost:8000/v1 --out runs/videomme \\
        --modes on off --rho-sweep 0.1,0.25
    qtsplus-eval report runs/videomme
    qtsplus-eval combine runs/ours-vs-stock ours=runs/videomme stock=runs/videomme-stock
    qtsplus-eval mini --layout videomme /tmp/mini     # a generated mini-benchmark, for smoke runs

Details: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx

from . import report
from .client import ClientConfig, run
from .datasets import LAYOUTS, DatasetError, load_dataset
from .media import VideoServer, file_url
from .modes import build_modes


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtsplus-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="ask every item in every mode, then write the report")
    r.add_argument("--data", required=True, help="benchmark directory or annotation file")
    r.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS))
    r.add_argument("--videos", help="video directory (default: the layout's own, under --data)")
    r.add_argument(
        "--base-url", required=True, help="OpenAI-compatible API root, e.g. http://localhost:8000/v1"
    )
    r.add_argument("--model", help="model name (default: the endpoint's first model)")
    r.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    r.add_argument("--out", required=True, type=Path, help="output directory (re-running resumes)")
    r.add_argument(
        "--modes", nargs="+", default=["on", "off"],
        help="modes: on, off, default, or key=value,... (rho_max, rho_min, rho_scale, fps, max_frames)",
    )  # fmt: skip
    r.add_argument(
        "--rho-sweep", type=_floats, default=[], help="comma-separated qtsplus_rho_max values to add"
    )
    r.add_argument("--fps", type=float, help="frame rate for every mode that sets none")
    r.add_argument("--max-frames", type=int, help="frame cap for every mode that sets none")
    r.add_argument("--limit", type=int, help="evaluate this many items")
    r.add_argument("--sample-seed", type=int, help="with --limit: a random subset (else the first items)")
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per request attempt")
    r.add_argument("--retries", type=int, default=2)
    r.add_argument(
        "--retry-backoff", type=float, default=1.0, help="seconds before the first retry, doubled after"
    )
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--video-access", choices=("file", "http"), default="file",
                   help="file: file:// URLs (server needs --allowed-local-media-path); http: serve them here")  # fmt: skip
    r.add_argument("--http-host", default="127.0.0.1", help="--video-access http: address to bind")
    r.add_argument("--http-port", type=int, default=0)
    r.add_argument("--http-public-host", help="--video-access http: host name the endpoint reaches us by")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--title", default="Evaluation report")

    p = sub.add_parser("report", help="(re)write summary.json, report.md and the plot of an output directory")
    p.add_argument("out", type=Path)
    p.add_argument("--title", default="Evaluation report")
    p.add_argument(
        "--baseline",
        help="the mode the others are paired against (default: the first off mode, else the first)",
    )

    c = sub.add_parser(
        "combine",
        help="merge runs on the same items (e.g. ours and stock vLLM) into one report, modes as LABEL:MODE",
    )
    c.add_argument("out", type=Path)
    c.add_argument("runs", nargs="+", metavar="LABEL=DIR", help="a run's output directory and its label")
    c.add_argument("--title", default="Evaluation report")
    c.add_argument(
        "--baseline", help="LABEL:MODE the others are paired against (default: the first run's first mode)"
    )

    m = sub.add_parser("mini", help="write a generated mini-benchmark (random videos, chance accuracy)")
    m.add_argument("out", type=Path)
    m.add_argument("--layout", default="videomme", choices=LAYOUTS + ("videomme-json",))
    m.add_argument("--videos", type=int, default=3)
    m.add_argument("--questions", type=int, default=2, help="questions per video")
    m.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        dataset = load_dataset(args.layout, args.data, args.videos).subset(args.limit, args.sample_seed)
        modes = build_modes(args.modes, args.rho_sweep, args.fps, args.max_frames)
    except (DatasetError, ValueError, OSError) as err:
        print(f"qtsplus-eval: {err}", file=sys.stderr)
        return 2
    for entry in dataset.missing:
        print(f"qtsplus-eval: missing video for {entry['id']}: {entry['video']}", file=sys.stderr)
    if dataset.skipped:
        print(f"qtsplus-eval: {len(dataset.skipped)} records skipped (see run.json)", file=sys.stderr)
    if not dataset.items:
        print("qtsplus-eval: no item to evaluate", file=sys.stderr)
        return 2
    cfg = ClientConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.retry_backoff,
        max_tokens=args.max_tokens,
    )
    if cfg.model is None:
        try:
            response = httpx.get(
                f"{cfg.api_root}/models", headers={"Authorization": f"Bearer {cfg.api_key}"}, timeout=30
            )
            response.raise_for_status()
            cfg.model = response.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
            print(f"qtsplus-eval: cannot list the endpoint's models ({err}); pass --model", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    info = {
        "endpoint": cfg.api_root,
        "model": cfg.model,
        "dataset": {
            "layout": dataset.layout,
            "source": dataset.source,
            "items": len(dataset.items),
            "missing": dataset.missing,
            "skipped": dataset.skipped,
        },
        "modes": [{"name": m.name, "settings": m.settings, "request": m.extra_body()} for m in modes],
        "max_tokens": cfg.max_tokens,
        "video_access": args.video_access,
    }
    (args.out / report.RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    with ExitStack() as stack:
        if args.video_access == "http":
            server = stack.enter_context(
                VideoServer(
                    (it.video for it in dataset.items), args.http_host, args.http_port, args.http_public_host
                )
            )
            url = server.url
        else:
            url = file_url
        try:
            result = asyncio.run(
                run(dataset.items, modes, cfg, args.out / report.RESULTS, url, progress=not args.no_progress)
            )
        except KeyboardInterrupt:
            print("\nqtsplus-eval: interrupted; finished items are saved, re-run to resume", file=sys.stderr)
            return 130
    summary = report.write_report(args.out, args.title)
    print(report.to_markdown(summary, args.title))
    print(
        f"asked {result.asked} (failed {result.failed}), {result.skipped} done earlier; "
        f"wrote {args.out / report.SUMMARY}, {args.out / report.TABLE}, {args.out / report.PLOT}",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command in ("report", "combine"):
        try:
            if args.command == "combine":
                runs = [tuple(spec.split("=", 1)) for spec in args.runs]
                if any(len(run) != 2 or not run[0] for run in runs):
                    raise ValueError("each run is LABEL=DIR")
                report.combine(args.out, [(label, Path(path)) for label, path in runs])
            if not (args.out / report.RESULTS).is_file():
                raise ValueError(f"no {report.RESULTS} in {args.out}")
            summary = report.write_report(args.out, args.title, args.baseline)
        except (ValueError, OSError) as err:
            print(f"qtsplus-eval: {err}", file=sys.stderr)
            return 2
        print(report.to_markdown(summary, args.title))
        return 0
    from .mini import write_mini_benchmark

    path = write_mini_benchmark(
        args.out, args.layout, videos=args.videos, questions=args.questions, seed=args.seed
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
