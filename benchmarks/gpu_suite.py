"""GPU evidence in one command: kernel tests, selector, gate, ViT attention, pipeline, proportional, media, NVDEC.

On a bare GPU machine (Python 3.12, torch, Triton, transformers; no vLLM, PyAV or qwen-vl-utils; no
network) it installs the wheels carried in ``benchmarks/wheels/`` (``scripts/fetch_gpu_wheels.py``
fetches them here) into a private folder, makes the package importable from the working tree, then
runs each step in its own time-boxed subprocess inside one overall budget (default 8 minutes):

=================  =====================================================================================
``kernel_tests``   ``pytest tests/kernels`` (on CUDA the CUDA-only cases run instead of being skipped)
``selector``       QTSplusSelector.select at 7B shapes on CUDA (torch and Triton paths, fp32 and bf16)
                   against the CPU fp32 result: n, indices (near-ties allowed), scores, rows
``score_topk``     ``bench_score_topk.py`` at 3B/7B shapes (gate vs eager vs floor vs LM prefill of M)
``vit_attention``  the Qwen2.5-VL ViT at 7B shapes on a 10-minute video (grid 300x20x36, 216,000 patches,
                   M = 54,000) with every attention implementation that runs (qtsplus_vllm.vision):
                   median ms, peak CUDA memory, error against the first; plus fp32 on a 1-minute video
``pipeline``       ``bench_pipeline.py --model 7B --minutes 10`` (ViT, selector, prefill n vs M, KV bytes,
                   decode, follow-up)
``proportional``   the cost-proportional comparison's in-process part at the real 7B and 3B shapes (bf16,
                   random weights, no vLLM): ViT ms per merged token on a 1-minute 720p grid, transformers'
                   Qwen2 causal prefill ms per token at proportional.benchmark_contexts (n + text, M + text
                   at 1/5/10 min); measured ratio vs the counted FLOP ratio, KV bytes per token, and the
                   prefill seconds selection removes per video
``media``          ``benchmarks/bench_media.py --device ... --minutes 5 --content smooth`` (the long-video
                   media path on the GPU)
``nvdec``          ``benchmarks/bench_nvdec.py``: FFmpeg's CUDA hwaccel (NVDEC) against the software
                   decoder on 1-minute 720p30 texture and smooth videos: frames per second alone and 4 at
                   once, and whether the sampled frames' YUV and RGB are equal
=================  =====================================================================================

A step that cannot run (CUDA, a package or the script missing, budget spent) is recorded as skipped
with the reason; a crash or a timeout is recorded as failed with the end of its log. Output (at most
8 files, what a device call brings back): ``suite.json`` (machine, versions, command, every step's
status, the targets, and under ``results`` every step's full record) and ``suite.png``. While the
suite runs, each step writes ``<step>.json`` (kept if the suite itself is cut short); they are folded
into ``suite.json`` at the end. A summary table ends stdout.

    python benchmarks/gpu_suite.py                          # GPU, full sizes, into $OUT (or benchmarks/results/)
    python benchmarks/gpu_suite.py --device cpu --quick     # CPU dry run at tiny sizes (CI runs it)
    python benchmarks/gpu_suite.py --steps score_topk,vit_attention --budget-s 300

Exit status 0 when no step failed (skips are not failures).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
WHEELS = BENCHMARKS / "wheels"
SITE = Path(tempfile.gettempdir()) / "qtsplus-gpu-site"
STEPS = (
    "kernel_tests",
    "selector",
    "score_topk",
    "vit_attention",
    "pipeline",
    "proportional",
    "media",
    "nvdec",
)
# per-step time boxes in seconds (full run, --quick); the overall --budget-s caps them further
TIME_BOX = {
    "setup": (90, 60),
    "kernel_tests": (90, 120),
    "selector": (60, 60),
    "score_topk": (150, 90),
    "vit_attention": (100, 60),
    "pipeline": (170, 120),
    "proportional": (120, 60),
    "media": (150, 60),
    "nvdec": (90, 30),
}
CUDA_ONLY_TESTS = (
    "test_real_shapes_on_gpu",
    "test_selector_on_gpu",
)  # tests/kernels cases skipped without CUDA
SKIP_EXIT = 75  # a step exits with this after writing {"status": "skipped", "reason": ...}
MIN_STEP_S = 10
MAX_FILES = 8
VERSIONS = ("torch", "triton", "transformers", "av", "qwen-vl-utils", "flash-attn", "vllm", "numpy", "pytest")
TARGETS = {  # DESIGN §5 / README targets
    "gate_speedup_vs_eager_min": 5.0,
    "gate_over_floor_max": 2.0,
    "gate_fraction_of_prefill_max": 0.01,
    "ttft_ratio_selected_over_all_max": 0.4,
}
TARGET_M = 65536


# ----------------------------------------------------------------------------- child side


def bootstrap(device: str) -> None:
    """Make ``qtsplus_vllm`` (with ``qtsplus_vllm.kernels`` = REPO/kernels) importable without installing."""
    if device == "cpu":  # Triton kernels on CPU tensors run in the interpreter (read at kernel import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path[:0] = [p for p in (str(REPO), str(BENCHMARKS)) if p not in sys.path]
    import qtsplus_vllm

    try:
        import qtsplus_vllm.kernels  # noqa: F401  (an installed package maps it already)
    except ImportError:
        qtsplus_vllm.__path__.append(str(REPO))  # the kernels package lives at REPO/kernels


class Skip(Exception):
    """The step cannot run here; the message says why."""


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))


def cuda_sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` calls (CUDA events on a GPU)."""
    from bench_score_topk import time_samples

    return time_samples(fn, device, warmup, iters)


def step_kernel_tests(args, tmp: Path) -> dict:
    import pytest
    import torch

    junit = tmp / "junit.xml"
    selection = ["-k", "selector_paths_agree or real_shapes or selector_on_gpu"] if args.quick else []
    argv = [
        str(REPO / "tests" / "kernels"),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *selection,
    ]
    code = pytest.main(argv)
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag if tag != "failure" else "failed", (node.get("message") or "")[:300]
        cases.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time", 0)),
                "message": message,
            }
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    cuda_only = [c for c in cases if c["name"].startswith(CUDA_ONLY_TESTS)]
    return {
        "ok": code == 0 and counts["failed"] == counts["error"] == 0,
        "pytest_exit_code": int(code),
        "command": shlex.join(["python", "-m", "pytest", "tests/kernels", *selection]),
        "cuda": torch.cuda.is_available(),
        "counts": counts,
        "cuda_only": {k: sum(c["outcome"] == k for c in cuda_only) for k in ("passed", "failed", "skipped")},
        "cases": cases,
    }


def _compare_selections(ref, other, fp32: bool) -> dict:
    import torch

    ref_idx, idx = set(ref.indices.cpu().tolist()), set(other.indices.cpu().tolist())
    scores_ref, scores = ref.scores.float().cpu(), other.scores.float().cpu()
    row = {
        "n": other.n,
        "n_reference": ref.n,
        "rho": other.rho,
        "rho_reference": ref.rho,
        "jaccard": len(ref_idx & idx) / max(len(ref_idx | idx), 1),
        "scores_max_rel_error": (
            (scores - scores_ref).abs().max() / scores_ref.abs().max().clamp_min(1e-30)
        ).item(),
    }
    if fp32:
        # near-ties: tokens whose reference score is within tolerance of the cut may swap
        cut = torch.sort(scores_ref, descending=True).values[ref.n - 1].item()
        tolerance = 1e-4 * abs(cut) + 1e-9
        differing = ref_idx ^ idx
        far = [i for i in differing if abs(scores_ref[i].item() - cut) > tolerance]
        row.update(indices_differing=len(differing), indices_differing_beyond_ties=len(far))
        if torch.equal(ref.indices.cpu(), other.indices.cpu()):
            row["rows_max_abs_error"] = (
                (ref.embeds.float().cpu() - other.embeds.float().cpu()).abs().max().item()
            )
        row["agrees"] = other.n == ref.n and not far
    return row


def step_selector(args, tmp: Path) -> dict:
    import torch
    from bench_score_topk import MODELS, random_selector

    from qtsplus_vllm.kernels.score_topk import triton_available

    if args.quick:  # CPU: the Triton path runs in the interpreter against the torch path, tiny shapes
        shape, m, ell, nmax = (64, 4, 2), 333, 6, 64
    else:
        shape, m, ell, nmax = MODELS["7B"][:3], 16384, 32, 2560
    d, h, hkv = shape
    selector = random_selector(d, h, hkv, nmax, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(m, d, generator=gen), torch.randn(ell, d, generator=gen) * 0.02
    rho = (0.1, 0.1)  # forced keep ratio: n = ceil(0.1 M) (random weights predict no real budget)

    def select(device, dtype, impl):
        os.environ["QTSPLUS_SELECTOR_IMPL"] = impl
        sel = selector.to(device=device, dtype=dtype)
        clock = time.perf_counter()
        result = sel.select(x.to(device, dtype), q.to(device, dtype), rho_bounds=rho)
        cuda_sync(device)
        return result, (time.perf_counter() - clock) * 1e3

    reference, ref_ms = select("cpu", torch.float32, "torch")
    rows = [
        {"device": "cpu", "dtype": "float32", "impl": "torch", "ms_first_call": ref_ms, "reference": True}
    ]
    device = args.device
    impls = ["torch"] + (["triton"] if triton_available() else [])
    cases = [(device, torch.float32, impl) for impl in impls if not (device == "cpu" and impl == "torch")]
    if device != "cpu":
        cases += [(device, torch.bfloat16, impl) for impl in impls]
    for dev, dtype, impl in cases:
        result, ms = select(dev, dtype, impl)
        fp32 = dtype == torch.float32
        rows.append({"device": dev, "dtype": str(dtype).removeprefix("torch."), "impl": impl, "ms_first_call": ms,
                     **_compare_selections(reference, result, fp32)})  # fmt: skip
    checked = [r for r in rows if "agrees" in r]
    return {
        "ok": bool(checked) and all(r["agrees"] for r in checked),
        "shape": {"D": d, "H": h, "Hkv": hkv, "M": m, "L": ell, "nmax": nmax, "rho": rho[0]},
        "criterion": "fp32: same n, indices equal except near-ties (|r - cut| <= 1e-4 |cut|); bf16: reported only",
        "rows": rows,
    }


def step_score_topk(args, tmp: Path) -> dict:
    import bench_score_topk

    raw = tmp / "score_topk.json"
    if args.quick:
        # CPU: Triton runs in the interpreter; the smallest sizes that still exercise every path
        argv = ["--device", args.device, "--models", "tiny", "--m", "256", "--l", "8", "--warmup", "0",
                "--iters", "1", "--no-prefill", "--out", str(raw)]  # fmt: skip
    else:
        argv = ["--device", args.device, "--models", "3B,7B", "--m", f"4096,16384,{TARGET_M}", "--l", "16,64",
                "--warmup", "3", "--iters", "20", "--out", str(raw)]  # fmt: skip
    sys.argv = ["benchmarks/bench_score_topk.py", *argv]
    code = bench_score_topk.main(argv)
    result = json.loads(raw.read_text())
    return {"ok": code == 0, "argv": argv, "targets": score_topk_targets(result), "result": result}


def score_topk_targets(result: dict) -> dict:
    rows = [r for r in result.get("rows", []) if r.get("model") == "7B" and r.get("M") == TARGET_M]
    if not rows:
        return {"checked": False, "reason": f"no 7B row at M = {TARGET_M} (quick or CPU run)"}
    worst_speedup = min(r["speedup_vs_eager"] for r in rows)
    worst_floor = max(r["gate_over_floor"] for r in rows)
    fractions = [r["gate_fraction_of_prefill"] for r in rows if "gate_fraction_of_prefill" in r]
    out = {
        "checked": True,
        "M": TARGET_M,
        "L": [r["L"] for r in rows],
        "speedup_vs_eager": worst_speedup,
        "speedup_vs_eager_pass": worst_speedup >= TARGETS["gate_speedup_vs_eager_min"],
        "gate_over_floor": worst_floor,
        "gate_over_floor_pass": worst_floor <= TARGETS["gate_over_floor_max"],
    }
    if fractions:
        out["gate_fraction_of_prefill"] = max(fractions)
        out["gate_fraction_of_prefill_pass"] = max(fractions) < TARGETS["gate_fraction_of_prefill_max"]
    return out


def step_pipeline(args, tmp: Path) -> dict:
    try:
        import av  # noqa: F401
        import qwen_vl_utils  # noqa: F401
    except ImportError as exc:
        raise Skip(f"{exc.name} is missing (carry its wheel: python scripts/fetch_gpu_wheels.py)") from exc
    import bench_pipeline

    raw = tmp / "pipeline.json"
    if args.quick:
        argv = ["--model", "tiny", "--device", args.device, "--minutes", "0.25", "--iters", "1", "--warmup", "0",
                "--decode-steps", "2", "--height", "120", "--width", "214", "--out", str(raw)]  # fmt: skip
    else:
        argv = ["--model", "7B", "--minutes", "10", "--device", args.device, "--iters", "3", "--warmup", "1",
                "--out", str(raw)]  # fmt: skip
    code = bench_pipeline.main(argv)
    result = json.loads(raw.read_text())
    ratio = result["derived"]["ttft_ratio_selected_over_all"]
    targets = {"checked": result["settings"]["model"] == "7B" and result["settings"]["minutes"] == 10}
    if targets["checked"]:
        targets.update(ttft_ratio=ratio, ttft_ratio_pass=ratio <= TARGETS["ttft_ratio_selected_over_all_max"])
    else:
        targets["reason"] = "not the 7B 10-minute run"
    return {"ok": code == 0, "argv": argv, "targets": targets, "result": result}


def random_vit(spec: dict, device, dtype, seed: int = 0):
    """The Qwen2.5-VL ViT at ``spec`` with random weights, wrapped as serving wraps it."""
    import torch
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from qtsplus_vllm.config import VIT_DEFAULTS
    from qtsplus_vllm.vision import VisionEncoder

    fixed = {k: v for k, v in VIT_DEFAULTS.items() if k not in spec}
    config = Qwen2_5_VLVisionConfig(**spec, **fixed)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        vit = Qwen2_5_VisionTransformerPretrainedModel(config)
    vit = vit.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name or "ln_" in name else 0.0)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    with torch.device(device):
        vit.rotary_pos_emb = type(vit.rotary_pos_emb)(config)
    return VisionEncoder(vit.eval(), attention=None).requires_grad_(False)


QWEN25_VIT_7B = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                     fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584)  # fmt: skip


def _vit_run(
    spec: dict, device, label: str, dtype, grid: tuple, warmup: int, iters: int, progress
) -> list[dict]:
    """One video through the ViT with each attention implementation (transformers' SDPA loop first)."""
    import torch

    from qtsplus_vllm.vision import ATTENTION_CHOICES, attention_unavailable, pick_attention

    encoder = random_vit(spec, device, dtype)
    t, hh, ww = grid
    gen = torch.Generator(device=device).manual_seed(1)
    pixels = torch.randn(t * hh * ww, 3 * 2 * 14 * 14, device=device, dtype=dtype, generator=gen)
    grid_thw = torch.tensor([grid], device=device)
    auto = pick_attention(device, dtype, "auto")
    rows, reference = [], None
    for name in ("sdpa", *[n for n in ATTENTION_CHOICES[1:] if n != "sdpa"]):
        row = {"run": label, "dtype": str(dtype).removeprefix("torch."), "grid_thw": list(grid),
               "patches": t * hh * ww, "M": t * hh * ww // 4, "attention": name, "auto_choice": name == auto}  # fmt: skip
        reason = attention_unavailable(name, device, dtype)
        if reason is not None:
            rows.append({**row, "status": "skipped", "reason": reason})
            continue
        encoder.set_attention(name)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                row["memory_before_gib"] = torch.cuda.memory_allocated(device) / 2**30
            slow = name == "sdpa" and t >= 100  # the per-window loop on a long video: one timed run
            samples = time_ms(
                lambda: encoder(pixels, grid_thw), device, 0 if slow else warmup, 1 if slow else iters
            )
            out = encoder(pixels, grid_thw).float()
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as exc:  # e.g. out of memory: record it, go on with the next
            rows.append({**row, "status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            progress(rows)
            continue
        row.update(status="ok", median_ms=statistics.median(samples), samples_ms=samples)
        if reference is None:
            reference = (name, out)
        else:
            row.update(
                rel_error_vs=reference[0],
                rel_error=((out - reference[1]).norm() / reference[1].norm()).item(),
            )
        rows.append(row)
        progress(rows)
    return rows


def _save_vit_rows(path: Path, done: tuple, new_rows: list) -> None:
    write_json(path, {"step": "vit_attention", "rows": [*done, *new_rows]})


def step_vit_attention(args, tmp: Path) -> dict:
    import torch

    device = torch.device(args.device)
    if args.quick:
        spec = dict(depth=4, hidden_size=160, num_heads=2, intermediate_size=96, fullatt_block_indexes=[3],
                    out_hidden_size=128)  # fmt: skip
        runs = [("tiny", torch.float32, (3, 12, 20), 1, 1)]
    else:
        spec = QWEN25_VIT_7B  # 10 min, 1 fps, 720p -> 600 frames of 280x504 -> grid (300, 20, 36)
        runs = [
            ("7B 10 min", torch.bfloat16, (300, 20, 36), 1, 3),
            ("7B 1 min fp32", torch.float32, (30, 20, 36), 1, 2),
        ]
    rows = []
    path = args.out / "vit_attention.json"  # rows so far, kept if the step is killed at its time box
    for run in runs:
        rows += _vit_run(spec, device, *run, functools.partial(_save_vit_rows, path, tuple(rows)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok_rows = [r for r in rows if r["status"] == "ok"]
    tolerance = {"float32": 1e-4, "bfloat16": 3e-2}
    errors_ok = all(r.get("rel_error", 0.0) <= tolerance[r["dtype"]] for r in ok_rows)
    return {"ok": bool(ok_rows) and errors_ok and not any(r["status"] == "failed" for r in rows),
            "vit": spec, "rel_error_tolerance": tolerance, "rows": rows}  # fmt: skip


def step_media(args, tmp: Path) -> dict:
    script = BENCHMARKS / "bench_media.py"
    if not script.is_file():
        raise Skip(
            "no long-video media path on the GPU in this tree yet (benchmarks/bench_media.py is absent)"
        )
    import bench_media

    raw = tmp / "media.json"
    # 5 minutes of smooth content: the 10-minute texture video's encoding alone outran the box on the H200 host
    argv = [
        "--device",
        args.device,
        "--minutes",
        "0.25" if args.quick else "5",
        "--content",
        "smooth",
        "--out",
        str(raw),
    ]
    argv += ["--quick"] if args.quick else []
    code = bench_media.main(argv)
    return {"ok": code == 0, "argv": argv, "result": json.loads(raw.read_text()) if raw.is_file() else None}


# ----------------------------------------------------------------------------- proportional

PROPORTIONAL_MODELS = ("7B", "3B")  # the headline model first: a time box cuts the last
PROPORTIONAL_DEFINITION = (
    "measured_ratio = (median ms of a causal prefill of S tokens / S) / (median ms of the ViT on a 1-minute 720p "
    "grid / its merged tokens), both in-process on the device with random weights (CUDA events, synchronised). "
    "Prefill: transformers' Qwen2Model at the real LMShape over S random input embeddings (one pass, no chunks, "
    "no KV cache kept), then lm_head on the last position; with layers_timed < layers_total the time of "
    "layers_timed layers (+ final norm) is scaled by layers_total / layers_timed and lm_head_ms (timed apart) "
    "added once. real_flop_ratio: "
    "counted FLOPs of the released model (qtsplus_vllm.testing.proportional: prefill FLOPs of S tokens / S over "
    "ViT FLOPs per merged token). measured_over_real = measured_ratio / real_flop_ratio. kv_bytes_per_token: "
    "counted, 2 x layers x Hkv x Dh x dtype bytes"
)
PROPORTIONAL_TOLERANCE = 0.2  # bench_proportional.py's: within ±20 % counts as proportional
# --quick (CPU, fp32): write_tiny_checkpoint's LM and the vit_attention step's tiny ViT on a 12 x 20
# patch grid; "1, 5, 10 minutes" are 1, 5, 10 temporal slices of it
QUICK_SELECTOR = dict(nmax=32, rho_min=0.05, rho_max=0.5)
QUICK_GRIDS = {1: (1, 12, 20), 5: (5, 12, 20), 10: (10, 12, 20)}
QUICK_TEXT_TOKENS = 16


def proportional_cases(quick: bool) -> tuple[dict, str]:
    """label -> (proportional.Model, contexts, ViT grid), and where the contexts come from."""
    from qtsplus_vllm.testing import proportional as prop

    if quick:
        tiny = prop.Model(
            "tiny (write_tiny_checkpoint's LM, the vit_attention step's tiny ViT)",
            prop.LMShape(128, 2, 4, 2, 256, 512),
            prop.ViTShape(depth=4, hidden=160, intermediate=96, heads=2, out_hidden=128, fullatt_blocks=(3,)),
            prop.FP32, QUICK_SELECTOR,
        )  # fmt: skip
        contexts = prop.benchmark_contexts(tiny.selector, QUICK_TEXT_TOKENS, QUICK_GRIDS)
        return {"tiny": (tiny, contexts, QUICK_GRIDS[1])}, "QUICK_GRIDS (tiny)"
    try:
        contexts = prop.benchmark_contexts(prop.TRAINING_SELECTOR)
        source = "proportional.benchmark_contexts (the sizing rule)"
    except ImportError as exc:  # the bare GPU image: no PyAV / qwen-vl-utils for qtsplus_vllm.video
        contexts = prop.benchmark_contexts(prop.TRAINING_SELECTOR, 64, prop.GRIDS_720P)
        source = f"proportional.GRIDS_720P and 64 text tokens ({exc.name} is not installed)"
    return {k: (prop.REAL[k], contexts, prop.GRIDS_720P[1]) for k in PROPORTIONAL_MODELS}, source


def vit_spec(vit) -> dict:
    """random_vit's spec for a :class:`~qtsplus_vllm.testing.proportional.ViTShape`."""
    return dict(depth=vit.depth, hidden_size=vit.hidden, num_heads=vit.heads, intermediate_size=vit.intermediate,
                fullatt_block_indexes=list(vit.fullatt_blocks), out_hidden_size=vit.out_hidden)  # fmt: skip


def random_lm(lm, layers: int, device, dtype, attention: str, seed: int = 0):
    """transformers' Qwen2Model at ``lm``'s dims with ``layers`` layers and random weights, and an lm_head.

    Built on the meta device and materialised on ``device`` in ``dtype`` (never in fp32 first). The
    embedding table is a stub: prompts go in as embeddings, as the visual rows do.
    """
    import torch
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(vocab_size=8, hidden_size=lm.hidden, intermediate_size=lm.intermediate,
                         num_hidden_layers=layers, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
                         max_position_embeddings=131072, use_cache=False)  # fmt: skip
    config._attn_implementation = attention
    with torch.device("meta"):
        model = Qwen2Model(config).to(dtype)
        head = torch.nn.Linear(lm.hidden, lm.vocab, bias=False).to(dtype)
    model, head = model.to_empty(device=device), head.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *head.named_parameters()]:
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    with torch.device(device):
        model.rotary_emb = type(model.rotary_emb)(config)
    return model.eval().requires_grad_(False), head.eval().requires_grad_(False)


def _proportional_rows(model, contexts: list, measured: dict, rec: dict) -> list[dict]:
    """One row per (minutes, selected | all), as proportional.ratios lays them out."""
    from qtsplus_vllm.testing import proportional as prop

    rows = []
    for c in contexts:
        for kind in ("selected", "all"):
            s = c[f"s_{kind}"]
            real = prop.lm_prefill_flops(model.lm, s)["per_token"] / rec["vit_flops_per_merged_token"]
            row = {"minutes": c["minutes"], "context": kind, "tokens": s, "m": c["m"], "n": c["n_rho_max"],
                   "real_flop_ratio": real, "kv_bytes_per_token": rec["kv_bytes_per_token"],
                   "kv_bytes": rec["kv_bytes_per_token"] * s}  # fmt: skip
            got = measured.get(s, {"status": "not run"})
            if got["status"] == "ok":
                ratio = got["ms"] / s / rec["vit_ms_per_merged_token"]
                row.update(status="ok", lm_ms=got["ms"], lm_ms_per_token=got["ms"] / s, measured_ratio=ratio,
                           measured_over_real=ratio / real)  # fmt: skip
            else:
                row.update({k: v for k, v in got.items() if k in ("status", "reason", "error")})
            rows.append(row)
    return rows


def _time_vit(vit, grid, device, dtype, warmup: int, iters: int) -> tuple[str, list[float]]:
    """The attention implementation serving picks here, and ms of each timed ViT forward on ``grid``."""
    import torch

    encoder = random_vit(vit_spec(vit), device, dtype)
    attention = encoder.set_attention("auto")
    gen = torch.Generator(device=device).manual_seed(1)
    pixels = torch.randn(math.prod(grid), 3 * 2 * 14 * 14, device=device, dtype=dtype, generator=gen)
    grid_thw = torch.tensor([grid], device=device)
    return attention, time_ms(lambda: encoder(pixels, grid_thw), device, warmup, iters)


def measure_proportional(
    model, contexts, grid, device, dtype, reps, lm_layers, attention, deadline, save
) -> dict:
    """The ViT's ms per merged token on ``grid``, then the prefill's ms at each distinct S (ascending).

    ``save(record)`` is called as figures come in (the step's JSON survives a time box). A prompt whose
    projected time (the last one's scaled by counted FLOPs) would end past ``deadline`` is skipped.
    """
    import torch

    from qtsplus_vllm.testing import proportional as prop

    warmup, iters = reps
    t, hh, ww = grid
    vit_fl = prop.vit_flops(model.vit, t, hh, ww)
    dtype_bytes = prop.BF16 if dtype in (torch.bfloat16, torch.float16) else prop.FP32
    layers = min(lm_layers or model.lm.layers, model.lm.layers)
    rec = {"model": model.name, "lm": dataclasses.asdict(model.lm), "vit": dataclasses.asdict(model.vit),
           "vit_grid": list(grid), "vit_merged_tokens": vit_fl["merged_tokens"],
           "vit_flops_per_merged_token": vit_fl["per_merged_token"], "lm_attention": attention,
           "layers_timed": layers, "layers_total": model.lm.layers, "scaled_by_layers": layers < model.lm.layers,
           "kv_bytes_per_token": model.lm.kv_bytes_per_token(dtype_bytes), "contexts": []}  # fmt: skip
    rec["vit_attention"], samples = _time_vit(model.vit, grid, device, dtype, warmup, iters)
    vit_ms = statistics.median(samples)
    rec.update(vit_ms_samples=samples, vit_ms=vit_ms, vit_ms_per_merged_token=vit_ms / vit_fl["merged_tokens"],
               vit_tflops=vit_fl["total"] / vit_ms / 1e9)  # fmt: skip
    save(rec)

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    clock = time.monotonic()
    lm, head = random_lm(model.lm, layers, device, dtype, attention)
    cuda_sync(device)
    rec["lm_build_s"] = time.monotonic() - clock
    scale = model.lm.layers / layers
    gen = torch.Generator(device=device).manual_seed(2)
    head_ms = 0.0  # lm_head on one position: timed apart when the layers are scaled, added once
    if scale != 1:
        last_row = torch.randn(1, model.lm.hidden, device=device, dtype=dtype, generator=gen)
        with torch.inference_mode():
            head_ms = statistics.median(
                time_ms(lambda h=head, x=last_row: h(x), device, warmup, max(iters, 3))
            )
        rec["lm_head_ms"] = head_ms
    measured, last = {}, None  # last: (counted FLOPs, ms of the timed layers) of the last prompt
    for s in sorted({c[k] for c in contexts for k in ("s_selected", "s_all")}):
        flops = prop.lm_prefill_flops(model.lm, s)
        entry = {"tokens": s}
        if last is not None and deadline is not None:
            projected = (warmup + iters) * last[1] / 1e3 * flops["total"] / last[0]
            if time.monotonic() + projected > deadline:
                measured[s] = {**entry, "status": "skipped",
                               "reason": f"~{projected:.0f} s would not fit the step's time box"}  # fmt: skip
                continue
        x = torch.randn(1, s, model.lm.hidden, device=device, dtype=dtype, generator=gen) * 0.02

        def prefill(x=x, lm=lm, head=head):
            with torch.inference_mode():
                return head(lm(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1])

        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            ms = time_ms(prefill, device, warmup, iters)
            if cuda:
                entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as exc:  # e.g. out of memory: record it, go on with the next
            measured[s] = {**entry, "status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        finally:
            del x, prefill
        median = statistics.median(ms)
        last = (flops["total"], median)
        full = [(m - head_ms) * scale + head_ms for m in ms]
        measured[s] = {**entry, "status": "ok", "ms": statistics.median(full), "ms_samples": full,
                       "tflops": flops["total"] / statistics.median(full) / 1e9}  # fmt: skip
        rec.update(
            prompts=list(measured.values()), contexts=_proportional_rows(model, contexts, measured, rec)
        )
        save(rec)
    del lm, head
    rec.update(prompts=list(measured.values()), contexts=_proportional_rows(model, contexts, measured, rec))
    ok = {s for s, m in measured.items() if m["status"] == "ok"}
    rec["selection_removes"] = [
        {"minutes": c["minutes"], "m": c["m"], "n": c["n_rho_max"], "tokens_all": c["s_all"],
         "tokens_selected": c["s_selected"], "prefill_all_s": measured[c["s_all"]]["ms"] / 1e3,
         "prefill_selected_s": measured[c["s_selected"]]["ms"] / 1e3,
         "removed_s": (measured[c["s_all"]]["ms"] - measured[c["s_selected"]]["ms"]) / 1e3,
         "vit_s": rec["vit_ms_per_merged_token"] * c["m"] / 1e3}
        for c in contexts
        if c["s_all"] in ok and c["s_selected"] in ok
    ]  # fmt: skip
    save(rec)
    return rec


def step_proportional(args, tmp: Path, cases: dict | None = None, lm_layers: int | None = None) -> dict:
    """LM prefill time per token over ViT time per merged token at the real 3B/7B shapes, on the device.

    ``cases`` (label -> (Model, contexts, ViT grid)) and ``lm_layers`` override the sizes (tests).
    """
    import torch

    device = torch.device(args.device)
    source = "given"
    if cases is None:
        cases, source = proportional_cases(args.quick)
    half = device.type == "cuda" and not args.quick
    dtype = torch.bfloat16 if half else torch.float32
    reps = (1, 3) if half else (1, 1)
    flash = half and importlib.util.find_spec("flash_attn") is not None
    attention = "flash_attention_2" if flash else "sdpa"
    timeout = getattr(args, "step_timeout_s", None)
    deadline = time.monotonic() + timeout - 10 if timeout else None
    out = {"definition": PROPORTIONAL_DEFINITION, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
           "reps": {"warmup": reps[0], "iters": reps[1]}, "contexts_source": source,
           "tolerance": PROPORTIONAL_TOLERANCE, "models": {}}  # fmt: skip
    path = args.out / "proportional.json"
    for label, (model, contexts, grid) in cases.items():
        if deadline is not None and time.monotonic() > deadline - 15:
            out["models"][label] = {
                "model": model.name,
                "status": "skipped",
                "reason": "the step's time box is spent",
            }
            continue

        def save(rec, label=label):
            write_json(path, {"step": "proportional", **out, "models": {**out["models"], label: rec}})

        try:
            rec = measure_proportional(
                model, contexts, grid, device, dtype, reps, lm_layers, attention, deadline, save
            )
            rec["status"] = "ok"
        except Exception as exc:  # e.g. out of memory building it: record it, go on with the next model
            rec = {
                "model": model.name,
                "status": "failed",
                "error": f"{type(exc).__name__}: {str(exc)[:500]}",
            }
        out["models"][label] = rec
        if device.type == "cuda":
            torch.cuda.empty_cache()
    records = out["models"].values()
    failed = [r for r in records if r["status"] == "failed"] + [
        p for r in records for p in r.get("prompts", []) if p["status"] == "failed"
    ]
    measured = [c for r in records for c in r.get("contexts", []) if c["status"] == "ok"]
    return {"ok": bool(measured) and not failed, "targets": proportional_targets(out), **out}


def proportional_targets(data: dict) -> dict:
    """Is the 7B's measured LM/ViT time ratio its FLOP ratio within the tolerance, at every context?"""
    rows = [c for c in data["models"].get("7B", {}).get("contexts", []) if c["status"] == "ok"]
    if not rows:
        return {"checked": False, "reason": "no 7B row (quick or CPU run, or not measured)"}
    worst = max((c["measured_over_real"] for c in rows), key=lambda q: abs(q - 1.0))
    return {"checked": True, "contexts": len(rows), "measured_over_real_min": min(c["measured_over_real"] for c in rows),
            "measured_over_real_max": max(c["measured_over_real"] for c in rows), "worst": worst,
            "within_tolerance": abs(worst - 1.0) <= PROPORTIONAL_TOLERANCE}  # fmt: skip


def step_nvdec(args, tmp: Path) -> dict:
    """NVDEC vs the software decoder (benchmarks/bench_nvdec.py): frames per second, equality of the sampled frames."""
    if args.device == "cpu":
        raise Skip("NVDEC needs a CUDA device (bench_nvdec.py --device cpu runs the software rows alone)")
    import bench_nvdec

    record = bench_nvdec.measure(tmp / "nvdec.json", ["texture", "smooth"], 60.0, 4, 30, args.device)
    return {"ok": True, **record}


STEP_FUNCTIONS = {
    "kernel_tests": step_kernel_tests,
    "selector": step_selector,
    "score_topk": step_score_topk,
    "vit_attention": step_vit_attention,
    "pipeline": step_pipeline,
    "proportional": step_proportional,
    "media": step_media,
    "nvdec": step_nvdec,
}


def run_step(args) -> int:
    """Child: run one step in this process, write <out>/<step>.json; exit 0 ok, 1 failed, 75 skipped."""
    out = args.out / f"{args.run_step}.json"
    clock = time.perf_counter()
    try:
        if args.device != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise Skip(f"--device {args.device} but torch {torch.__version__} sees no CUDA device")
        bootstrap(args.device)
        with tempfile.TemporaryDirectory(prefix=f"qtsplus-{args.run_step}-") as tmp:
            data = STEP_FUNCTIONS[args.run_step](args, Path(tmp))
        status = "ok" if data.pop("ok") else "failed"
    except Skip as skip:
        data, status = {"reason": str(skip)}, "skipped"
    write_json(
        out, {"step": args.run_step, "status": status, "step_seconds": time.perf_counter() - clock, **data}
    )
    return {"ok": 0, "failed": 1, "skipped": SKIP_EXIT}[status]


# ----------------------------------------------------------------------------- parent side


# the pinned wheels (benchmarks/gpu_wheels.json) -> the module each one provides
WHEEL_MODULES = {
    "av": "av", "qwen_vl_utils": "qwen_vl_utils", "pydantic": "pydantic", "pydantic_core": "pydantic_core",
    "pydantic_settings": "pydantic_settings", "annotated_types": "annotated_types",
    "typing_inspection": "typing_inspection", "python_dotenv": "dotenv", "typing_extensions": "typing_extensions",
}  # fmt: skip


def missing_modules(names=tuple(WHEEL_MODULES.values())) -> list[str]:
    from importlib.util import find_spec

    return [n for n in names if find_spec(n) is None]


def setup(args, env: dict) -> dict:
    """Install the carried wheels into SITE when a module the steps import is missing."""
    clock = time.perf_counter()
    missing = missing_modules()
    record = {"step": "setup", "missing_before": missing, "wheels": []}
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    if not missing:
        record.update(status="ok", note="nothing to install: every carried package imports here")
    elif not wheels:
        record.update(status="skipped", reason=f"{missing} missing and no wheels in {args.wheels} "
                      "(run scripts/fetch_gpu_wheels.py here and carry benchmarks/wheels)")  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(args.site), *map(str, wheels)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIME_BOX["setup"][args.quick])
        record.update(command=shlex.join(cmd), wheels=[w.name for w in wheels], returncode=proc.returncode)
        record.update(
            status="ok" if proc.returncode == 0 else "failed", log_tail=(proc.stdout + proc.stderr)[-2000:]
        )
    if record["status"] == "ok" and missing:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.site), env.get("PYTHONPATH")]))
    record["seconds"] = time.perf_counter() - clock
    return record


def run_child(name: str, args, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-step", name, "--device", args.device,
           "--out", str(args.out), "--step-timeout-s", f"{timeout:.0f}", *(["--quick"] if args.quick else [])]  # fmt: skip
    clock = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+", errors="replace") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        log.seek(0)
        tail = log.read()[-4000:]
    seconds = time.perf_counter() - clock
    path = args.out / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"step": name}  # partial rows on a timeout
    if code is None:
        data.update(status="failed", reason=f"timed out after {timeout:.0f} s")
    elif code not in (0, 1, SKIP_EXIT) or "status" not in data:
        data.update(status="failed", reason=f"exit status {code}")
    data.update(seconds=seconds, timeout_s=timeout, returncode=code, log_tail=tail)
    write_json(path, data)
    print(
        f"[{name}] {data['status']} in {seconds:.1f} s" + (f": {data['reason']}" if "reason" in data else ""),
        flush=True,
    )
    return data


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device}
    if device != "cpu":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = "--query-gpu=name,memory.total,driver_version"
            info["gpu"] = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True,
                                         text=True, timeout=20).stdout.strip()  # fmt: skip
    return info


def git_sha() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    return "unknown"


def headline(name: str, data: dict) -> str:
    """One line of key figures per step for the summary table."""
    if data.get("status") != "ok" and "reason" in data:
        return data["reason"][:100]
    with contextlib.suppress(KeyError, TypeError, ValueError, IndexError):
        if name == "setup":
            return ", ".join(data["wheels"]) or data.get("note", "")
        if name == "kernel_tests":
            c, g = data["counts"], data["cuda_only"]
            return f"{c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped; CUDA-only {g}"
        if name == "selector":
            checked = [r for r in data["rows"] if "agrees" in r]
            fp32 = f"fp32 agrees with CPU fp32: {sum(r['agrees'] for r in checked)}/{len(checked)}"
            bf16 = [
                f"{r['impl']} bf16 jaccard {r['jaccard']:.3f}"
                for r in data["rows"]
                if r["dtype"] == "bfloat16"
            ]
            return "; ".join([fp32, *bf16])
        if name == "score_topk":
            rows = data["result"]["rows"]
            big = max(rows, key=lambda r: (r["model"] == "7B", r["M"], r["L"]))
            return (f"{big['model']} M={big['M']} L={big['L']}: triton {big['triton_ms']:.3f} ms, "
                    f"x{big['speedup_vs_eager']:.1f} vs eager, {big['gate_over_floor']:.2f}x floor")  # fmt: skip
        if name == "vit_attention":
            ok = [r for r in data["rows"] if r["status"] == "ok"]
            return "; ".join(f"{r['run']} {r['attention']} {r['median_ms']:.0f} ms"
                             + (f" {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else "") for r in ok)  # fmt: skip
        if name == "pipeline":
            d, v = data["result"]["derived"], data["result"]["video"]
            return (f"M={v['M']} n={v['n']}: TTFT {d['ttft_selected_ms']:.0f} vs {d['ttft_all_ms']:.0f} ms "
                    f"(x{d['ttft_ratio_selected_over_all']:.3f}); vit {data['result']['implementations']['vit_attention']}")  # fmt: skip
        if name == "nvdec":
            parts = []
            for case in data["cases"]:
                hard, eq = case.get("nvdec", {}), case.get("equality", {})
                if "fps" not in hard:
                    parts.append(
                        f"{case['content']}: nvdec {hard.get('error', data.get('nvdec_skipped', 'not run'))[:60]}"
                    )
                    continue
                parts.append(f"{case['content']}: {case['software']['fps']:.0f} vs nvdec {hard['fps']:.0f} fps, "
                             f"rgb equal {eq['rgb']['frames_equal']}/{eq['sampled_frames']}")  # fmt: skip
            return "; ".join(parts)
        if name == "proportional":
            models = data["models"]
            label = "7B" if models.get("7B", {}).get("status") == "ok" else next(iter(models))
            rec = models[label]
            quotients = [c["measured_over_real"] for c in rec["contexts"] if c["status"] == "ok"]
            removed = rec["selection_removes"]
            seconds = "/".join(f"{r['removed_s']:.2f}" for r in removed)
            minutes = "/".join(f"{r['minutes']:g}" for r in removed)
            return (f"{label} time/FLOP ratio x{min(quotients):.2f}..x{max(quotients):.2f}; selection "
                    f"removes {seconds} s of prefill at {minutes} min")  # fmt: skip
    return ""


def target_lines(steps: dict) -> list[tuple[str, str, str]]:
    lines = []
    gate = steps.get("score_topk", {}).get("targets", {})
    pipe = steps.get("pipeline", {}).get("targets", {})

    def verdict(flag):
        return "n/a" if flag is None else ("PASS" if flag else "FAIL")

    if gate.get("checked"):
        lines.append((f"gate >= {TARGETS['gate_speedup_vs_eager_min']:g}x eager (7B, M={TARGET_M})",
                      f"x{gate['speedup_vs_eager']:.1f}", verdict(gate["speedup_vs_eager_pass"])))  # fmt: skip
        lines.append((f"gate <= {TARGETS['gate_over_floor_max']:g}x its floor", f"{gate['gate_over_floor']:.2f}x",
                      verdict(gate["gate_over_floor_pass"])))  # fmt: skip
        if "gate_fraction_of_prefill" in gate:
            lines.append(("gate < 1 % of prefill of M", f"{100 * gate['gate_fraction_of_prefill']:.3f} %",
                          verdict(gate["gate_fraction_of_prefill_pass"])))  # fmt: skip
    else:
        lines.append(("gate targets (7B, M=65536)", "-", "n/a: " + gate.get("reason", "step did not run")))
    if pipe.get("checked"):
        lines.append((f"TTFT selected / all <= {TARGETS['ttft_ratio_selected_over_all_max']:g} (7B, 10 min)",
                      f"{pipe['ttft_ratio']:.3f}", verdict(pipe["ttft_ratio_pass"])))  # fmt: skip
    else:
        lines.append(("TTFT target (7B, 10 min)", "-", "n/a: " + pipe.get("reason", "step did not run")))
    prop = steps.get("proportional", {}).get("targets", {})
    label = f"7B LM/ViT time ratio = FLOP ratio ±{100 * PROPORTIONAL_TOLERANCE:g} %"
    if prop.get("checked"):
        lines.append((label, f"x{prop['measured_over_real_min']:.2f}..{prop['measured_over_real_max']:.2f}",
                      verdict(prop["within_tolerance"])))  # fmt: skip
    else:
        lines.append((label, "-", "n/a: " + prop.get("reason", "step did not run")))
    return lines


def plot(steps: dict, path: Path) -> str | None:
    """suite.png: gate vs M, ViT attention implementations, pipeline TTFT, LM/ViT time vs FLOP ratio;
    None when nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    gate, vit, pipe = (steps.get(k, {}) for k in ("score_topk", "vit_attention", "pipeline"))
    ax = axes[0]
    if gate.get("status") == "ok":
        rows = gate["result"]["rows"]
        ell = max(r["L"] for r in rows)
        for model in sorted({r["model"] for r in rows}):
            pts = sorted((r for r in rows if r["model"] == model and r["L"] == ell), key=lambda r: r["M"])
            ms = [r["M"] for r in pts]
            for key, style in (("eager_ms", "--"), ("triton_ms", "-"), ("prefill_ms", ":")):
                if all(key in r for r in pts):
                    ax.plot(ms, [r[key] for r in pts], style, marker="o", label=f"{model} {key[:-3]}")
            ax.plot(ms, [r["floor"]["ms"] for r in pts], "-.", label=f"{model} floor")
        ax.set(
            xscale="log", yscale="log", xlabel="M visual tokens", ylabel="ms", title=f"QTS+ gate (L={ell})"
        )
        ax.legend(fontsize=7)
    else:
        ax.set_title("gate: " + gate.get("status", "not run"))
    ax = axes[1]
    ok = [r for r in vit.get("rows", []) if r["status"] == "ok"]
    if ok:
        labels = [f"{r['run']}\n{r['attention']}" for r in ok]
        bars = ax.bar(range(len(ok)), [r["median_ms"] for r in ok])
        for bar, r in zip(bars, ok, strict=True):
            if "peak_memory_gib" in r:
                ax.annotate(f"{r['peak_memory_gib']:.1f} GiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(ok)), labels, fontsize=6, rotation=30, ha="right")
        ax.set(yscale="log", ylabel="ms (median)", title="ViT forward by attention implementation")
    else:
        ax.set_title("ViT attention: " + vit.get("status", "not run"))
    ax = axes[2]
    if pipe.get("status") == "ok":
        stages = {k: v["median_ms"] for k, v in pipe["result"]["stages"].items()}
        shared = ["decode_sampling", "preprocess", "vit"]
        columns = {
            "selected": [*shared, "selector", "prefill_selected"],
            "all tokens": [*shared, "prefill_all"],
        }
        colours = {
            part: f"C{i}" for i, part in enumerate(dict.fromkeys(p for ps in columns.values() for p in ps))
        }
        totals = []
        for i, parts in enumerate(columns.values()):
            bottom = 0.0
            for part in parts:
                label = part if i == 0 or part not in columns["selected"] else None  # each stage once
                ax.bar(i, stages[part], bottom=bottom, color=colours[part], label=label)
                bottom += stages[part]
            totals.append(bottom)
            ax.annotate(f"{bottom / 1e3:.2f} s", (i, bottom), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(
            [0, 1],
            [f"{name}\n({total / totals[1]:.2f}x)" for name, total in zip(columns, totals, strict=True)],
        )
        ax.set(
            ylabel="ms",
            title=f"TTFT, {pipe['result']['settings']['model']} {pipe['result']['settings']['minutes']:g} min",
        )
        ax.legend(fontsize=7)
    else:
        ax.set_title("pipeline: " + pipe.get("status", "not run"))
    ax, prop = axes[3], steps.get("proportional", {})
    drawn = False
    for label, rec in prop.get("models", {}).items():
        rows = sorted({c["tokens"]: c for c in rec.get("contexts", []) if c["status"] == "ok"}.values(),
                      key=lambda c: c["tokens"])  # fmt: skip
        if rows:
            tokens = [c["tokens"] for c in rows]
            line = ax.plot(tokens, [c["measured_ratio"] for c in rows], "-o", label=f"{label} measured")[0]
            ax.plot(
                tokens,
                [c["real_flop_ratio"] for c in rows],
                "--",
                color=line.get_color(),
                label=f"{label} FLOPs",
            )
            drawn = True
    if drawn:
        ax.set(xscale="log", xlabel="prompt tokens S", ylabel="LM per token / ViT per merged token",
               title=f"LM/ViT cost ratio ({prop.get('dtype', '')}, {prop.get('device', '')})")  # fmt: skip
        ax.legend(fontsize=7)
    else:
        ax.set_title("proportional: " + prop.get("status", "not run"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cuda (default when a GPU is visible) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every step (CPU CI)")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: $OUT, else benchmarks/results/gpu-suite-...)"
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    parser.add_argument(
        "--budget-s", type=float, help="overall seconds for all steps (default 480; --quick 300)"
    )
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="folder of carried wheels")
    parser.add_argument("--site", type=Path, default=SITE, help="where the wheels are installed")
    parser.add_argument("--replot", type=Path, metavar="SUITE_JSON",
                        help="draw suite.png again from a saved suite.json (beside it) and exit")  # fmt: skip
    parser.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--step-timeout-s", type=float, help=argparse.SUPPRESS)  # the child's time box
    args = parser.parse_args(argv)

    if args.replot:
        problem = plot(json.loads(args.replot.read_text())["results"], args.replot.with_suffix(".png"))
        print(problem or f"wrote {args.replot.with_suffix('.png')}")
        return 1 if problem else 0
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.run_step:
        return run_step(args)

    clock = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.quick else 480.0)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else (
            BENCHMARKS / "results" / f"gpu-suite-{args.device}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("QTSPLUS_SELECTOR_IMPL", None)
    env.pop("QTSPLUS_VIT_ATTENTION", None)

    results = {"setup": setup(args, env)}
    print(f"[setup] {results['setup']['status']}: {headline('setup', results['setup'])}", flush=True)
    for name in STEPS:
        if name not in steps:
            continue
        left = budget - (time.perf_counter() - clock)
        if left < MIN_STEP_S:
            results[name] = {
                "step": name,
                "status": "skipped",
                "reason": f"suite budget of {budget:.0f} s spent",
            }
            continue
        results[name] = run_child(name, args, env, min(TIME_BOX[name][args.quick], left))

    summary = {
        "benchmark": "gpu_suite",
        "command": shlex.join(
            ["python", "benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(args.device),
        "versions": versions(),
        "quick": args.quick,
        "budget_s": budget,
        "targets": TARGETS,
        "steps": {
            k: {f: v[f] for f in ("status", "seconds", "reason") if f in v} for k, v in results.items()
        },
        "target_checks": [
            dict(zip(("target", "measured", "verdict"), line, strict=True)) for line in target_lines(results)
        ],
        "setup": results["setup"],
    }
    problem = plot(results, args.out / "suite.png")
    if problem:
        summary["plot"] = problem
    summary["wall_s"] = time.perf_counter() - clock
    # every step's record, folded in: a device call brings back at most MAX_FILES files
    summary["results"] = {k: v for k, v in results.items() if k != "setup"}
    write_json(args.out / "suite.json", summary)
    for name in summary["results"]:
        (args.out / f"{name}.json").unlink(missing_ok=True)
    files = sorted(p.name for p in args.out.iterdir())
    print(f"\nGPU suite on {summary['machine'].get('gpu') or args.device}{' (quick)' if args.quick else ''}, "
          f"{summary['wall_s']:.0f} s, {len(files)} files in {args.out}")  # fmt: skip
    if len(files) > MAX_FILES:
        print(f"warning: {len(files)} files; a device call brings back at most {MAX_FILES}")
    print(f"{'step':<15}{'status':<9}{'seconds':>8}  key figures")
    for name, data in results.items():
        print(f"{name:<15}{data['status']:<9}{data.get('seconds', 0.0):>8.1f}  {headline(name, data)}")
    print("targets:")
    for target, measured, verdict in target_lines(results):
        print(f"  {target:<52}{measured:>12}  {verdict}")
    return 1 if any(d["status"] == "failed" for d in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
