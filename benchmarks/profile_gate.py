"""Where the QTS+ gate's time goes on a GPU: each stage of ``QTSplusSelector.select`` timed apart.

``bench_score_topk.py`` times the whole gate (``select``) and the fused scoring kernel alone; on the
first H200 run the gate took 10.8 ms at 7B, M = 65,536 while the kernel took 0.2-0.6 ms and the
floor is 1.4 ms. This script splits the gate into its stages (kv_norm, K projection, query side,
scoring kernel, budget statistics and head with its host sync, top-n, gather, re-encode), times
each with CUDA events (median), times ``select`` by CUDA events and by host wall clock (a gap means
the host, not the GPU, is the bound), and keeps the top kernels of a ``torch.profiler`` run. It also
times candidate kv_norm forms against the current one and reports how far their outputs differ.

    python benchmarks/profile_gate.py --models 7B --m 16384,65536      # GPU
    python benchmarks/profile_gate.py --device cpu --models tiny --m 2048 --iters 2   # smoke run

Writes ``gate_profile.json`` (and the profiler tables as text inside it) to ``--out``.
"""

# ruff: noqa: B023 - each timing lambda is called at once, inside the iteration that made it
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_suite import bootstrap  # noqa: E402

SHAPES = {"3B": (2048, 16, 2), "7B": (3584, 28, 4), "tiny": (256, 4, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--models", default="7B")
    parser.add_argument("--m", default="16384,65536")
    parser.add_argument("--l", type=int, default=64, help="question tokens")
    parser.add_argument("--n", type=int, default=2560, help="rows kept (the re-encode's size; nmax)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results" / "gate-profile"))
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bootstrap(device.type)
    import torch.nn.functional as F
    from bench_score_topk import random_selector, time_samples

    from qtsplus_vllm.kernels.score_topk import budget_stats, score_relevance, select_top
    from qtsplus_vllm.selector import attention, budget_count

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.environ["QTSPLUS_SELECTOR_IMPL"] = "triton" if device.type == "cuda" else "torch"

    def med(fn) -> float:
        return statistics.median(time_samples(fn, device, args.warmup, args.iters))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    record = {
        "benchmark": "profile_gate",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "cases": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        d, h, hkv = SHAPES[model]
        sel = random_selector(d, h, hkv, args.n, device, dtype)
        last, block = sel.scoring_layers[-1], sel.reencode_layers[0].core
        for m in (int(v) for v in args.m.split(",")):
            n = min(args.n, m)
            x = torch.randn(m, d, device=device, dtype=dtype)
            q = torch.randn(args.l, d, device=device, dtype=dtype)
            case = {"model": model, "M": m, "L": args.l, "n": n, "stages_ms": {}}
            st = case["stages_ms"]
            with torch.inference_mode():
                st["select"] = med(lambda: sel.select(x, q))
                walls = []
                for _ in range(args.iters):
                    sync()
                    t0 = time.perf_counter()
                    sel.select(x, q)
                    sync()
                    walls.append((time.perf_counter() - t0) * 1e3)
                case["select_host_wall_ms"] = statistics.median(walls)
                case["select_n"] = sel.select(x, q).n
                xn = last.kv_norm(x)
                st["kv_norm"] = med(lambda: last.kv_norm(x))
                st["k_proj"] = med(lambda: last.k_proj(xn))
                st["project_keys"] = med(lambda: last.project_keys(x))
                st["project_queries"] = med(lambda: last.project_queries(q))
                qh, kh = last.project_queries(q), last.project_keys(x)
                st["score_kernel"] = med(lambda: score_relevance(qh, kh))
                r = score_relevance(qh, kh)
                st["budget_stats"] = med(lambda: budget_stats(r))
                st["predict_rho"] = med(lambda: sel.predict_rho(r, q))
                rho = sel.predict_rho(r, q)
                st["budget_count_sync"] = med(lambda: budget_count(rho, m, n))
                st["select_top"] = med(lambda: select_top(r, n))
                idx = select_top(r, n)
                st["gather"] = med(lambda: x[idx])
                kept = x[idx]
                st["reencode"] = med(lambda: sel.reencode(kept))
                st["reencode_attention_part"] = med(
                    lambda: block.o_proj(
                        F.scaled_dot_product_attention(
                            block.project_queries(kept),
                            block.project_keys(kept),
                            block._heads(block.v_proj(block.kv_norm(kept)), hkv),
                            enable_gqa=True,
                        )
                        .transpose(0, 1)
                        .reshape(n, -1)
                    )
                )
                st["reencode_ffn_part"] = med(lambda: block.ffn(block.ffn_norm(kept)))
                st["sum_of_stages"] = sum(
                    st[k]
                    for k in ("project_keys", "project_queries", "score_kernel", "predict_rho",
                              "budget_count_sync", "select_top", "gather", "reencode")
                )  # fmt: skip

                # kv_norm forms against the torch formula (the CPU path, equal to the reference)
                eps, w = last.kv_norm.eps, last.kv_norm.weight

                def torch_formula(t=x):
                    t32 = t.float()
                    return (w * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps))).to(t.dtype)

                ref = torch_formula()
                cands = {
                    "torch_formula": torch_formula,
                    "selector_kv_norm": lambda: last.kv_norm(x),  # the fused kernel on CUDA
                    "F.rms_norm": lambda: (w * F.rms_norm(x.float(), (d,), eps=eps)).to(x.dtype),
                }
                if device.type == "cuda":
                    compiled = torch.compile(torch_formula, dynamic=False)
                    cands["torch.compile"] = lambda: compiled(x)
                case["kv_norm_candidates"] = {}
                for name, fn in cands.items():
                    try:
                        got = fn()
                        diff = (got.float() - ref.float()).abs()
                        case["kv_norm_candidates"][name] = {
                            "ms": med(fn),
                            "bit_equal": bool(torch.equal(got, ref)),
                            "max_abs_diff": float(diff.max()),
                            "values_differing": int((diff > 0).sum()),
                            "values": diff.numel(),
                        }
                    except Exception as err:  # noqa: BLE001 - report, keep measuring
                        case["kv_norm_candidates"][name] = {"error": repr(err)[:300]}

                # the re-encode attention: heads as a 3-D batch (math kernel) vs 4-D (fused kernels)
                qa, ka = block.project_queries(kept), block.project_keys(kept)
                va = block._heads(block.v_proj(block.kv_norm(kept)), hkv)
                three_d = F.scaled_dot_product_attention(qa, ka, va, enable_gqa=True)
                four_d = attention(qa, ka, va, gqa=True)
                case["reencode_sdpa"] = {
                    "3d_ms": med(lambda: F.scaled_dot_product_attention(qa, ka, va, enable_gqa=True)),
                    "selector_ms": med(lambda: attention(qa, ka, va, gqa=True)),
                    "max_abs_diff": float((three_d.float() - four_d.float()).abs().max()),
                }

                if device.type == "cuda":
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            sel.select(x, q)
                        sync()
                    ka = prof.key_averages()
                    case["profiler_by_cuda_time"] = ka.table(sort_by="cuda_time_total", row_limit=25)
                    case["profiler_by_cpu_time"] = ka.table(sort_by="cpu_time_total", row_limit=15)
            record["cases"].append(case)
            print(
                f"{model} M={m}: select {st['select']:.2f} ms (host wall {case['select_host_wall_ms']:.2f})"
            )
            for k, v in st.items():
                print(f"    {k:26s} {v:8.3f} ms")
            for k, v in case["kv_norm_candidates"].items():
                print(f"    kv_norm as {k:17s} {v}")
            print(f"    re-encode SDPA {case['reencode_sdpa']}")
            if "profiler_by_cuda_time" in case:
                print(case["profiler_by_cuda_time"])
            (out / "gate_profile.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out / 'gate_profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
