"""Benchmark the QTS+ gate: fused Triton scoring vs the eager selector vs the floor vs LM prefill.

For each model shape (3B: D 2048, H 16, Hkv 2; 7B: D 3584, H 28, Hkv 4; Dh 128), each M and each
question length L it times, on one GPU, with CUDA events, median of many runs after warm-up:

- ``eager``:  the gate as the reference computes it — full last scoring layer (q/k/v projections,
              H x L x M fp32 softmax materialised, o_proj, FFN), budget, top-n, re-encode;
- ``torch``:  our selector with QTSPLUS_SELECTOR_IMPL=torch (skips the dead v/o/FFN work);
- ``triton``: our selector with the fused kernel (QTSPLUS_SELECTOR_IMPL=triton);
- ``scoring_kernel``: the fused relevance kernel alone, on precomputed Q/K;
- ``floor``:  max(bytes the gate must move / measured copy bandwidth,
              FLOPs it must do / measured bf16 GEMM rate);
- ``prefill``: a random-weight LM prefill of the same M tokens at the model's shape (torch SDPA,
              flash attention on GPU; one decoder layer's weights reused for every layer — same FLOPs
              and bytes per layer, a fraction of the memory).

Writes one JSON file under benchmarks/results/ (GPU, versions, git sha, command) and prints a
table. ``python benchmarks/plot_score_topk.py FILE`` draws it.

    python benchmarks/bench_score_topk.py                 # full sweep (GPU)
    python benchmarks/bench_score_topk.py --quick         # small smoke run (GPU, or CPU with --device cpu)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # CPU smoke runs: Triton reads this when the kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qtsplus_vllm.config import QTSplusConfig  # noqa: E402
from qtsplus_vllm.kernels.score_topk import budget_stats, score_relevance, select_top  # noqa: E402
from qtsplus_vllm.selector import QTSplusSelector, budget_count  # noqa: E402

MODELS = {
    # name: (D, H, Hkv, layers, intermediate)
    "3B": (2048, 16, 2, 36, 11008),
    "7B": (3584, 28, 4, 28, 18944),
}
RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- timing


def time_samples(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` runs of ``fn()`` after ``warmup`` runs (CUDA events on a GPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(stop))
        else:
            clock = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - clock) * 1e3)
    return samples


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    return statistics.median(time_samples(fn, device, warmup, iters))


def measure_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = int(gib * 2**30) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = timed(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * n * 4 / (ms / 1e3)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP per second of a square GEMM in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = timed(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * size**3 / (ms / 1e3)


# ----------------------------------------------------------------------------- gates


def random_selector(d: int, h: int, hkv: int, nmax: int, device, dtype) -> QTSplusSelector:
    cfg = QTSplusConfig(
        hidden_size=d,
        num_attention_heads=h,
        num_key_value_heads=hkv,
        num_hidden_layers=1,
        intermediate_size=d,
        vocab_size=128,
        qts_plus_nmax=nmax,
    )
    sel = QTSplusSelector.from_config(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in sel.parameters():
            p.normal_(0.0, 0.02)
    return sel.eval()


@torch.inference_mode()
def eager_gate(sel: QTSplusSelector, x: torch.Tensor, q: torch.Tensor):
    """The gate as the reference implementation computes it (materialised weights, dead work kept)."""
    layer = sel.scoring_layers[-1]
    h, hkv, dh = layer.num_heads, layer.num_kv_heads, layer.head_dim
    qn, kvn = layer.q_norm(q), layer.kv_norm(x)
    qs = layer.q_proj(qn).view(-1, h, dh).transpose(0, 1)
    ks = layer.k_proj(kvn).view(-1, hkv, dh).transpose(0, 1).repeat_interleave(h // hkv, 0)
    vs = layer.v_proj(kvn).view(-1, hkv, dh).transpose(0, 1).repeat_interleave(h // hkv, 0)
    weights = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(dh), dim=-1, dtype=torch.float32).to(x.dtype)
    out = (weights @ vs).transpose(0, 1).reshape(q.shape[0], -1)
    q2 = q + layer.o_proj(out)
    q2 = q2 + layer.ffn(layer.ffn_norm(q2))  # the reference computes it; it cannot change r
    r = weights.amax(dim=(0, 1)).float()
    r_max, ent = budget_stats(r)
    stats = torch.stack([torch.tensor(math.log(x.shape[0]), device=x.device), r_max, ent])
    rho = sel.budget(torch.cat([q.float().mean(0), stats]))
    n = budget_count(rho, x.shape[0], sel.nmax)
    idx = torch.topk(r, n).indices.sort().values
    return sel.reencode(x[idx]), q2


def floor_ms(m: int, d: int, h: int, hkv: int, ell: int, nmax: int, bandwidth: float, flops: float) -> dict:
    """Lower bound of the gate: the larger of its compulsory traffic and its compulsory math."""
    dh = d // h
    elt = 2  # bf16
    bytes_moved = (
        m * d * elt  # read X (kv_norm + K projection)
        + m * hkv * dh * elt * 3  # write K once, read it in both kernel passes
        + m * 4 * 2  # write r, read r for statistics / top-n
        + nmax * d * elt * 2  # gather the kept rows
    )
    flop = (
        2 * m * d * hkv * dh  # K projection
        + 2 * 2 * h * ell * m * dh  # q.k in both passes
        + 2 * nmax * d * (2 * d + 2 * hkv * dh)  # re-encode q/k/v/o projections
        + 2 * 2 * h * nmax * nmax * dh  # re-encode attention
        + 2 * 2 * nmax * d * 4 * d  # re-encode FFN
    )
    return dict(
        bytes=bytes_moved,
        flop=flop,
        ms=max(bytes_moved / bandwidth, flop / flops) * 1e3,
        memory_ms=bytes_moved / bandwidth * 1e3,
        compute_ms=flop / flops * 1e3,
    )


# ----------------------------------------------------------------------------- prefill


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@torch.inference_mode()
def prefill_ms(m: int, model: str, device, dtype, warmup: int, iters: int) -> float:
    """Time a random-weight Qwen2-style prefill of m tokens (all layers, shared weights)."""
    d, h, hkv, layers, inter = MODELS[model]
    dh = d // h
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g) * 0.02

    wq, wk, wv, wo = w(h * dh, d), w(hkv * dh, d), w(hkv * dh, d), w(d, h * dh)
    bq, bk, bv = w(h * dh), w(hkv * dh), w(hkv * dh)
    wg, wu, wd = w(inter, d), w(inter, d), w(d, inter)
    ln1, ln2 = torch.ones(d, device=device, dtype=dtype), torch.ones(d, device=device, dtype=dtype)
    x0 = w(m, d) * 50
    pos = torch.arange(m, device=device, dtype=torch.float32)
    inv = 1.0 / (1e6 ** (torch.arange(0, dh, 2, device=device, dtype=torch.float32) / dh))
    ang = torch.outer(pos, inv)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)[None]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)[None]

    def run():
        x = x0
        for _ in range(layers):
            hs = F.rms_norm(x, (d,), ln1, 1e-6)
            q = F.linear(hs, wq, bq).view(m, h, dh).transpose(0, 1)
            k = F.linear(hs, wk, bk).view(m, hkv, dh).transpose(0, 1)
            v = F.linear(hs, wv, bv).view(m, hkv, dh).transpose(0, 1)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
            x = x + F.linear(a.transpose(0, 1).reshape(m, h * dh), wo)
            hs = F.rms_norm(x, (d,), ln2, 1e-6)
            x = x + F.linear(F.silu(F.linear(hs, wg)) * F.linear(hs, wu), wd)
        return x

    return timed(run, device, warmup, iters)


# ----------------------------------------------------------------------------- main


def measure_case(model, sel, m, ell, args, device, dtype, bandwidth, gemm) -> dict:
    """All timings of one (model, M, L) point."""
    d, h, hkv = sel.dim, sel.scoring_layers[-1].num_heads, sel.scoring_layers[-1].num_kv_heads
    x = torch.randn(m, d, device=device, dtype=dtype)
    q = torch.randn(ell, d, device=device, dtype=dtype)
    n_cap = min(args.nmax, m)
    row = dict(model=model, M=m, L=ell, D=d, H=h, Hkv=hkv, nmax=args.nmax)
    row["eager_ms"] = timed(lambda: eager_gate(sel, x, q), device, args.warmup, args.iters)
    for impl in ("torch", "triton"):
        os.environ["QTSPLUS_SELECTOR_IMPL"] = impl
        row[f"{impl}_ms"] = timed(lambda: sel.select(x, q), device, args.warmup, args.iters)
        row[f"{impl}_n"] = sel.select(x, q).n
    layer = sel.scoring_layers[-1]
    with torch.inference_mode():
        qh, kh = layer.project_queries(q), layer.project_keys(x)
    row["scoring_kernel_ms"] = timed(lambda: score_relevance(qh, kh), device, args.warmup, args.iters)
    r = score_relevance(qh, kh)
    row["stable_sort_top_n_ms"] = timed(lambda: select_top(r, n_cap), device, args.warmup, args.iters)
    row["torch_topk_ms"] = timed(lambda: torch.topk(r, n_cap), device, args.warmup, args.iters)
    row["floor"] = floor_ms(m, d, h, hkv, ell, n_cap, bandwidth, gemm)
    if not args.no_prefill and model in ("3B", "7B") and device.type == "cuda":
        row["prefill_ms"] = prefill_ms(m, model, device, dtype, warmup=1, iters=3)
        row["gate_fraction_of_prefill"] = row["triton_ms"] / row["prefill_ms"]
    row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
    row["gate_over_floor"] = row["triton_ms"] / row["floor"]["ms"]
    return row


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="3B,7B")
    parser.add_argument("--m", default="4096,16384,65536", help="comma-separated visual token counts")
    parser.add_argument("--l", default="16,64", help="comma-separated question lengths")
    parser.add_argument("--nmax", type=int, default=2560)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs: a smoke test")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16
    models = args.models.split(",")
    ms_list = [int(v) for v in args.m.split(",")]
    ells = [int(v) for v in args.l.split(",")]
    if args.quick:
        ms_list, ells, args.warmup, args.iters = [1024], [16], 1, 3
    if device.type == "cpu":
        MODELS.update({"tiny": (256, 4, 2, 2, 512)})
        models = ["tiny"] if args.quick else models

    bandwidth = measure_bandwidth(device, 1.0 if device.type == "cuda" else 0.05)
    gemm = measure_matmul_rate(device, dtype, 8192 if device.type == "cuda" else 512)
    rows = []
    for model in models:
        d, h, hkv, _, _ = MODELS[model]
        sel = random_selector(d, h, hkv, args.nmax, device, dtype)
        for m in ms_list:
            for ell in ells:
                row = measure_case(model, sel, m, ell, args, device, dtype, bandwidth, gemm)
                rows.append(row)
                print(
                    f"{model} M={m:6d} L={ell:3d} eager={row['eager_ms']:.3f} torch={row['torch_ms']:.3f} "
                    f"triton={row['triton_ms']:.3f} kernel={row['scoring_kernel_ms']:.3f} ms "
                    f"floor={row['floor']['ms']:.3f} ms x{row['speedup_vs_eager']:.1f} vs eager"
                    + (f" prefill={row['prefill_ms']:.1f} ms" if "prefill_ms" in row else ""),
                    flush=True,
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    result = dict(
        benchmark="score_topk",
        command=" ".join([sys.executable, *sys.argv]),
        git_sha=git_sha(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=__import__("triton").__version__ if "triton" in sys.modules else None,
        cuda=torch.version.cuda,
        dtype=str(dtype),
        measured_bandwidth_gbps=bandwidth / 1e9,
        measured_bf16_tflops=gemm / 1e12,
        warmup=args.warmup,
        iters=args.iters,
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        rows=rows,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = result["device"].replace(" ", "-").replace("/", "-")
    out = args.out or RESULTS / f"score_topk-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
