"""QTSplus against the same weights without selection, served, with the same videos and client.

Systems (each started with ``vllm serve`` and the same engine flags, then driven by
``bench_serving.py``):

- ``qtsplus``:    our plugin, QTS+ selection on;
- ``all-tokens``: the same server, ``{"qtsplus_select": false}`` per request (all M ViT tokens);
- ``stock``:      stock vLLM Qwen2.5-VL on the converted checkpoint (``qtsplus_vllm.convert``), our
                  PyAV loader for identical frames; it differs from ``all-tokens`` in positions
                  (Qwen2.5-VL's (t, h, w) M-RoPE instead of 1-D) and in running the ViT in the worker;
- ``evs``:        stock + vLLM's EVS (``--video-pruning-rate``) at the retention QTSplus chose on
                  average in this run (query-blind pruning after the ViT). vLLM 0.32's CPU runner
                  cannot run EVS (it never strips the pruned rows' position columns: HTTP 500), so
                  the default leaves it out unless CUDA is available.

    python benchmarks/compare_serving.py                     # tiny random checkpoint, CPU defaults
    python benchmarks/compare_serving.py --model DIR --lengths 60,300,600 --concurrency 1,4,16
    python benchmarks/compare_serving.py --preset 7b-proportional --runs sweep --sweep-length 60 \
        --concurrency 8 --video-size 1280x720 --video-fps 30 --video-style texture --max-model-len 56000

``--preset`` serves a cost-proportional checkpoint (``qtsplus_vllm.testing.proportional``): its LM
costs, per token, the real 3B/7B's multiple of the ViT's cost per merged token (measured on the CPU).
Each server's process tree is sampled (peak RSS and CPU seconds per process, a memory trace; a
server is stopped when the machine's available memory falls under 1.5 GiB, and the result says so).

Results: one bench_serving JSON per system under benchmarks/results/<tag>/ plus the plots.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving  # noqa: E402
import compare_report  # noqa: E402
import plot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def engine_flags(max_len: int, batched: int | None = None) -> list[str]:
    """Identical engine settings for every system; caches that could flatter a system are off.

    ``batched``: vLLM's ``--max-num-batched-tokens`` (default ``max_len``: a prompt is prefilled in one
    step). The cost-proportional presets' wide MLPs need chunks: a 27k-token step would take ~8 GB
    of activations. vLLM's stat logging stays on (no ``--disable-log-stats``): the scheduler's
    gauges on ``/metrics`` (requests running/waiting, KV usage, preemptions) are sampled.
    """
    return [
        "--enforce-eager",
        "--dtype", "float32",
        "--max-model-len", str(max_len),
        "--max-num-batched-tokens", str(batched or max_len),
        "--max-num-seqs", "32",
        "--no-enable-prefix-caching",
        "--mm-processor-cache-gb", "0",
    ]  # fmt: skip


def kv_cache_flags(
    model: Path,
    requests: int,
    video_seconds: float,
    max_tokens: int,
    block_size: int,
    size: tuple[int, int] = (1280, 720),
    fps: float = 30.0,
    requests_per_level: int = 100,
) -> dict:
    """KV-cache blocks for exactly ``requests`` all-token requests of a ``size`` video of ``video_seconds``
    at ``fps`` (the generated videos' size and frame rate).

    tokens per request = M (every ViT token of the video at the plugin's default sampling,
    ``qtsplus_vllm.sizing.video_tokens``) + the prompt's other tokens (``text_tokens``, for the
    longest benchmark question with the largest request number) + ``max_tokens``;
    blocks = requests × ⌈tokens / block_size⌉ + 1, given to every system as
    ``--num-gpu-blocks-override`` with the same ``--block-size`` (vLLM applies the override on every
    platform, the CPU one included; it keeps one block back as its null block).
    """
    from qtsplus_vllm.sizing import video_tokens

    m = video_tokens(video_seconds, size[0], size[1], source_fps=fps)
    text = max(
        text_tokens(model, f"{q} (request {requests_per_level - 1})") for q in bench_serving.DEFAULT_QUESTIONS
    )
    per_request = m + text + max_tokens
    blocks = requests * math.ceil(per_request / block_size) + 1  # vLLM keeps one block back (the null block)
    return {
        "requests": requests, "video_seconds": video_seconds, "video_size": list(size), "video_fps": fps,
        "m": m, "text_tokens": text, "max_tokens": max_tokens, "tokens_per_request": per_request,
        "block_size": block_size, "blocks": blocks, "usable_tokens": (blocks - 1) * block_size,
        "formula": "blocks = requests * ceil((M + text_tokens + max_tokens) / block_size) + 1 (vLLM's null block)",
        "flags": ["--block-size", str(block_size), "--num-gpu-blocks-override", str(blocks)],
    }  # fmt: skip


def text_tokens(model: Path, question: str | None = None) -> int:
    """Prompt tokens besides the video placeholders, for ``question`` (default: a typical benchmark one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model), trust_remote_code=False)  # never asks on stdin
    question = question or f"{bench_serving.DEFAULT_QUESTIONS[0]} (request 0)"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"]) - 1  # the one <|video_pad|> is M rows


def run_system(
    system: str, model: Path, flags: list[str], common: list[str], out_dir: Path, mm_kwargs=None
) -> dict:
    out = out_dir / f"serving-{system}.json"
    argv = [
        "--system",
        system,
        "--serve",
        str(model),
        "--serve-args",
        shlex.join(flags),
        "--out",
        str(out),
        "--server-log",
        str(out_dir / f"server-{system}.log"),
        *common,
    ]
    if mm_kwargs:
        argv += ["--mm-processor-kwargs", json.dumps(mm_kwargs)]
    print(f"== {system}: {shlex.join(argv)}", flush=True)
    bench_serving.main(argv)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="QTSplus checkpoint (default: a generated tiny one)")
    p.add_argument(
        "--preset", help="generate a cost-proportional checkpoint instead of the tiny one "
        "(qtsplus_vllm.testing.proportional: 3b-proportional, 7b-proportional)",
    )  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/qtsplus-compare"))
    p.add_argument("--lengths", default="16,64,256", help="video seconds")
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--sweep-length", default="64", help="video seconds for the concurrency sweep")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--video-size", default="160x120", help="WIDTHxHEIGHT of the generated videos")
    p.add_argument("--video-fps", default="4")
    p.add_argument("--video-style", choices=bench_serving.VIDEO_STYLES, default="render")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=20000)
    p.add_argument("--max-num-batched-tokens", type=int, help="default: --max-model-len (no chunking)")
    p.add_argument("--systems", default=None, help="default: qtsplus,all-tokens,stock (+ evs with CUDA)")
    p.add_argument("--runs", default="lengths,sweep", help="which runs: lengths (concurrency 1), sweep")
    p.add_argument(
        "--kv-requests", type=int,
        help="size every system's KV cache for exactly this many all-token requests of --kv-video-seconds",
    )  # fmt: skip
    p.add_argument(
        "--kv-video-seconds", type=float, default=600.0,
        help="video length for --kv-requests (at --video-size and --video-fps)",
    )  # fmt: skip
    p.add_argument("--block-size", type=int, default=128, help="KV block size with --kv-requests")
    p.add_argument("--tag", default=time.strftime("compare-%Y%m%d-%H%M%S"))
    args = p.parse_args(argv)

    from qtsplus_vllm.convert import convert_to_qwen2_5_vl
    from qtsplus_vllm.testing import write_tiny_checkpoint

    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.model and args.preset:
        raise SystemExit("give --model or --preset, not both")
    if args.preset:
        from qtsplus_vllm.testing.proportional import PRESETS

        if args.preset not in PRESETS:
            raise SystemExit(f"--preset must be one of {sorted(PRESETS)}")
        model = write_tiny_checkpoint(args.work_dir / args.preset, seed=0, **PRESETS[args.preset])
    else:
        model = args.model or write_tiny_checkpoint(args.work_dir / "tiny-qtsplus", seed=0)
    stock_model = convert_to_qwen2_5_vl(model, args.work_dir / f"{Path(model).name}-qwen2_5_vl")
    out_dir = RESULTS / args.tag
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    systems = (
        args.systems or "qtsplus,all-tokens,stock" + (",evs" if torch.cuda.is_available() else "")
    ).split(",")
    flags = engine_flags(args.max_model_len, args.max_num_batched_tokens)
    if args.kv_requests:
        width, height = (int(v) for v in args.video_size.split("x"))
        per_level = max([args.num_requests, *(int(c) for c in args.concurrency.split(","))])
        kv = kv_cache_flags(
            Path(model), args.kv_requests, args.kv_video_seconds, args.max_tokens, args.block_size,
            (width, height), float(args.video_fps), per_level,
        )  # fmt: skip
        print(f"== KV cache: {kv['blocks']} blocks of {kv['block_size']} ({kv['formula']}, M={kv['m']}, "
              f"{kv['tokens_per_request']} tokens per request)")  # fmt: skip
        if args.max_model_len > kv["usable_tokens"]:
            raise SystemExit(
                f"--max-model-len {args.max_model_len} exceeds the KV cache of {kv['usable_tokens']} tokens: "
                "vLLM refuses to start; lower --max-model-len or raise --kv-requests"
            )
        flags += kv["flags"]
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kv-cache.json").write_text(json.dumps(kv, indent=1) + "\n")
    stock_flags = flags + ["--media-io-kwargs", json.dumps({"video": {"video_backend": "qtsplus_frames"}})]
    video_dir = args.work_dir / "videos"
    runs = {
        # every video length at concurrency 1, then the concurrency sweep on one length
        "lengths": ["--video-seconds", args.lengths, "--concurrency", "1"],
        "sweep": ["--video-seconds", args.sweep_length, "--concurrency", args.concurrency],
    }
    results: dict[str, dict] = {}
    for run, selection in runs.items():
        if run not in args.runs.split(","):
            continue
        common = [*selection, "--num-requests", str(args.num_requests), "--max-tokens", str(args.max_tokens),
                  "--video-dir", str(video_dir), "--video-size", args.video_size, "--video-fps", args.video_fps,
                  "--video-style", args.video_style]  # fmt: skip
        if "qtsplus" in systems:
            results[f"qtsplus-{run}"] = run_system("qtsplus", model, flags, common, out_dir / run)
        if "all-tokens" in systems:
            results[f"all-{run}"] = run_system(
                "all-tokens", model, flags + ["--trust-request-mm-kwargs"], common, out_dir / run,
                mm_kwargs={"qtsplus_select": False},
            )  # fmt: skip
        if "stock" in systems:
            results[f"stock-{run}"] = run_system("stock", stock_model, stock_flags, common, out_dir / run)
        if "evs" in systems and f"qtsplus-{run}" in results and f"all-{run}" in results:
            t = text_tokens(Path(model))
            kept = [
                (q["prompt_tokens"]["p50"] - t) / (a["prompt_tokens"]["p50"] - t)
                for q, a in zip(results[f"qtsplus-{run}"]["rows"], results[f"all-{run}"]["rows"], strict=True)
            ]
            rate = round(1.0 - sum(kept) / len(kept), 4)
            print(f"== EVS pruning rate {rate} (mean QTSplus keep ratio {1 - rate:.4f})")
            results[f"evs-{run}"] = run_system(
                "evs", stock_model, stock_flags + ["--video-pruning-rate", str(rate)], common, out_dir / run
            )
        plot.main(
            [*map(str, sorted((out_dir / run).glob("serving-*.json"))), "--out-dir", str(out_dir / run)]
        )
        compare_report.plot_running(out_dir / run, out_dir / run / "serving-running-over-time.png")
    print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
