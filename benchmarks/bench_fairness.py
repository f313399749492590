"""Fairness of the processing thread (issue 19 item 2): does a long video make other requests wait?

``vllm serve`` of the tiny checkpoint (this checkout's plugin: ``PYTHONPATH`` is set to it). After a
warm-up (the selection runtime loads) and each request kind alone (the baselines), a long video
(``--minutes`` of 1280×720 30 fps H.264, generated once under ``benchmarks/media/``: a 10-second
texture clip repeated by remuxing, every frame decoded by the server) is sent at t = 0; at
``--delay`` seconds a 5-second video and a text-only request are sent, and further text-only requests
every ``--text-every`` seconds while the long video is in flight. Every request streams; its TTFT is
the time from sending to the first token. Reported: per-request send time and TTFT, the long
video's wall time and its log line (``vit_ms``: the target is short-video TTFT ≤ ViT + 2 s, and
text-only TTFT as alone), the ratios to the baselines.

    python benchmarks/bench_fairness.py --minutes 10 --label after
    python benchmarks/bench_fairness.py --minutes 10 --label before --env QTSPLUS_PREPARE_IN_LOADER=auto

Writes ``benchmarks/results/fairness/fairness-<label>-<time>.json`` (machine, git sha, command,
settings, results) and a ``.png`` of the same name: each request a bar from its send time to its
first token on a time axis, the long video's span shaded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's package, also for the client side
MEDIA_DIR = REPO / "benchmarks" / "media"
OUT_DIR = REPO / "benchmarks" / "results" / "fairness"
LOG_LINE = re.compile(
    r"QTSplus video: frames=(\d+) M=(\d+) .*decode_ms=([\d.]+) preprocess_ms=([\d.]+) vit_ms=([\d.]+)"
)


def long_video(minutes: float, seed: int) -> Path:
    from qtsplus_vllm.testing.videos import make_long_video

    path = MEDIA_DIR / f"fairness-720p-{minutes:g}min-{seed}.mp4"
    if not path.is_file():
        print(f"generating {path.name} ...", flush=True)
        make_long_video(path, minutes * 60, (1280, 720), 30, seed=seed)
    return path


def short_video(seconds: float, seed: int) -> Path:
    from qtsplus_vllm.testing.videos import make_long_video

    path = MEDIA_DIR / f"fairness-720p-{seconds:g}s-{seed}.mp4"
    if not path.is_file():
        make_long_video(path, seconds, (1280, 720), 30, seed=seed, clip_seconds=int(seconds))
    return path


def message(video: Path | None, question: str) -> list[dict]:
    if video is None:
        return [{"role": "user", "content": question}]
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": f"file://{video}"}},
                {"type": "text", "text": question},
            ],
        }
    ]


def ask(client, model: str, kind: str, video: Path | None, t0: float, question: str) -> dict:
    """One streamed request; times relative to ``t0``."""
    sent = time.perf_counter()
    first = None
    stream = client.chat.completions.create(
        model=model, messages=message(video, question), max_tokens=4, temperature=0.0, stream=True
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
            first = time.perf_counter()
    done = time.perf_counter()
    first = first if first is not None else done
    return {
        "kind": kind,
        "sent_s": sent - t0,
        "first_token_s": first - t0,
        "ttft_s": first - sent,
        "total_s": done - sent,
    }


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run(args) -> dict:
    import openai

    from qtsplus_vllm.testing import write_tiny_checkpoint
    from qtsplus_vllm.testing.server import RemoteServer, cpu_serve_args

    # distinct videos everywhere: a repeated one would be answered from the ViT-feature cache
    longs = [long_video(args.minutes, seed=11 + r) for r in range(args.repeats)]
    shorts = [short_video(args.short_seconds, seed=30 + i) for i in range(args.repeats + 4)]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env.update(dict(item.split("=", 1) for item in args.env))
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "model", seed=5)
        flags = cpu_serve_args(max_model_len=2048, max_num_seqs=8) + [
            "--allowed-local-media-path",
            str(MEDIA_DIR),
        ]
        with RemoteServer(model, flags, env=env, cache_root=Path(tmp) / "vllm-cache") as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=1800)
            name = client.models.list().data[0].id
            t = time.perf_counter()
            ask(client, name, "warm-up", shorts[-1], t, "What is in the video?")
            alone = {
                "text": [ask(client, name, "text", None, time.perf_counter(), f"Say {i}.") for i in range(3)],
                "short_video": [
                    ask(
                        client,
                        name,
                        "short video",
                        shorts[args.repeats + i],
                        time.perf_counter(),
                        "Question?",
                    )
                    for i in range(3)
                ],
            }
            runs = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    futures = [
                        pool.submit(ask, client, name, "long video", longs[r], t0, f"What happens? {r}")
                    ]
                    time.sleep(args.delay)
                    futures.append(
                        pool.submit(ask, client, name, "short video", shorts[r], t0, f"What is shown? {r}")
                    )
                    futures.append(pool.submit(ask, client, name, "text", None, t0, f"Count to {r}."))
                    while not futures[0].done():
                        time.sleep(args.text_every)
                        if not futures[0].done():
                            futures.append(pool.submit(ask, client, name, "text", None, t0, "Say hello."))
                    requests = [f.result() for f in futures]
                lines = [m.groups() for m in map(LOG_LINE.search, server.log_tail(400).splitlines()) if m]
                long_line = next((g for g in reversed(lines) if int(g[1]) > 10_000), None)
                runs.append({"requests": requests, "long_video_log": long_line})
                time.sleep(2)
    return {"alone": alone, "runs": runs, "server_flags": flags, "server_env": env}


def summarise(result: dict) -> dict:
    alone_text = median([r["ttft_s"] for r in result["alone"]["text"]])
    alone_short = median([r["ttft_s"] for r in result["alone"]["short_video"]])
    rows = []
    for run in result["runs"]:
        reqs = run["requests"]
        long = reqs[0]
        short = next(r for r in reqs if r["kind"] == "short video")
        texts = [r for r in reqs if r["kind"] == "text"]
        vit_s = float(run["long_video_log"][4]) / 1e3 if run["long_video_log"] else None
        rows.append(
            {
                "long_ttft_s": long["ttft_s"],
                "long_vit_s": vit_s,
                "short_ttft_s": short["ttft_s"],
                "short_target_s": vit_s + 2 if vit_s is not None else None,
                "text_ttft_median_s": median([r["ttft_s"] for r in texts]),
                "text_ttft_max_s": max(r["ttft_s"] for r in texts),
            }
        )
    return {
        "alone_text_ttft_s": alone_text,
        "alone_short_video_ttft_s": alone_short,
        "runs": rows,
        "median_long_ttft_s": median([r["long_ttft_s"] for r in rows]),
        "median_short_ttft_s": median([r["short_ttft_s"] for r in rows]),
        "median_text_ttft_s": median([r["text_ttft_median_s"] for r in rows]),
        "text_over_alone": median([r["text_ttft_median_s"] for r in rows]) / alone_text,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["results"]["runs"][0]
    reqs = run["requests"]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * len(reqs)))
    long = reqs[0]
    ax.axvspan(long["sent_s"], long["first_token_s"], color="0.9", label="long video in flight")
    colours = {"long video": "tab:red", "short video": "tab:blue", "text": "tab:green"}
    for i, r in enumerate(reqs):
        ax.barh(i, r["ttft_s"], left=r["sent_s"], color=colours[r["kind"]], height=0.6)
        ax.text(r["first_token_s"] + 0.3, i, f"{r['kind']}: {r['ttft_s']:.2f} s", va="center", fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel("seconds since the long video was sent (bar: send → first token)")
    ax.set_title(f"{result['label']}: {result['settings']['minutes']:g}-min 720p video + short video + text")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--short-seconds", type=float, default=5.0)
    parser.add_argument("--delay", type=float, default=5.0, help="seconds after the long video")
    parser.add_argument("--text-every", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--label", default="run")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    started = time.strftime("%Y%m%d-%H%M%S")
    results = run(args)
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
        dirty = bool(
            subprocess.check_output(["git", "status", "--porcelain", "qtsplus_vllm"], cwd=REPO, text=True)
        )
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", None
    result = {
        "label": args.label,
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_sha": sha,
        "plugin_modified": dirty,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "settings": vars(args) | {"out": str(args.out)},
        "results": results,
        "summary": summarise(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"fairness-{args.label}-{started}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
