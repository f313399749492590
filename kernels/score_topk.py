"""Fused QTS+ relevance scoring: r[m] = max_{h,l} softmax_m(q_{h,l} . k_{g(h),m} / sqrt(Dh)).

Inputs are the last scoring layer's query heads Q [H, L, Dh] and the visual keys
K [Hkv, M, Dh] (K = k_proj(kv_norm(X)); that GEMM stays with cuBLAS). Head h reads kv head
g(h) = h // (H / Hkv) (GQA). The eager version materialises H x L x M fp32 weights; here:

pass 1  ``_row_stats_kernel``   per (query row, M split): online max and sum of exp over M -> the
        softmax statistics of every (h, l) row, combined over splits (log-sum-exp) in torch;
pass 2  ``_relevance_kernel``   per block of M: p = exp(s - max_row) / sum_row for every row,
        max over rows -> r for that block, written once. No [H, L, M] tensor ever exists.

Statistics and r are fp32 whatever the input dtype (bf16 / fp16 / fp32; fp32 dots use IEEE
precision, not TF32). The entropy/max for the budget head and the top-n are cheap [M]-sized
torch ops (:func:`budget_stats`, :func:`select_top`), shared with the reference path so that both
paths pick identical indices for identical r.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

try:  # Triton is optional: CPU installs without it fall back to the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

ENTROPY_EPS = 1e-8
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    return triton is not None


# --------------------------------------------------------------------------- reference (torch)


def relevance_reference(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Eager r [M] fp32 from queries [H, L, Dh] and keys [Hkv, M, Dh]; one kv group at a time."""
    num_heads, _, head_dim = queries.shape
    num_kv_heads, m, _ = keys.shape
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    r = torch.zeros(m, dtype=torch.float32, device=keys.device)
    for g in range(num_kv_heads):
        q = queries[g * group : (g + 1) * group].float()  # [group, L, Dh]
        logits = torch.matmul(q, keys[g].float().transpose(0, 1)) * scale  # [group, L, M]
        r = torch.maximum(r, logits.softmax(dim=-1).amax(dim=(0, 1)))
    return r


def budget_stats(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max r, Hent) as 0-d fp32 tensors; Hent = max(0, -sum p log(p + 1e-8)), p = r / (sum r + 1e-8)."""
    r = r.float()
    p = r / (r.sum() + ENTROPY_EPS)
    return r.max(), (-(p * (p + ENTROPY_EPS).log()).sum()).clamp_min(0.0)


def select_top(r: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest r (ties: lower index first), ascending, int64 [n].

    A stable descending sort rather than torch.topk: topk's order among equal values is
    unspecified, and the kernel and reference paths must agree index for index.
    """
    if not 1 <= n <= r.shape[0]:
        raise ValueError(f"n must be in [1, M={r.shape[0]}], got {n}")
    order = torch.sort(r, descending=True, stable=True).indices[:n]
    return torch.sort(order).values


# --------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _row_stats_kernel(
        Q_ptr,
        K_ptr,
        Max_ptr,  # [SPLITS, H * L] fp32
        Sum_ptr,  # [SPLITS, H * L] fp32
        q_stride_h,
        q_stride_l,
        q_stride_d,
        k_stride_h,
        k_stride_m,
        k_stride_d,
        L,
        M,
        m_per_split,
        num_rows_total,
        scale,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        FP32_DOT: tl.constexpr,
    ):
        g = tl.program_id(0)  # kv head
        row_block = tl.program_id(1)  # block of this group's GROUP * L query rows
        split = tl.program_id(2)  # slice of M
        rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < GROUP * L
        h = g * GROUP + rows // L
        ell = rows % L
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(
            Q_ptr + h[:, None] * q_stride_h + ell[:, None] * q_stride_l + d[None, :] * q_stride_d,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_R], tl.float32)
        m_start = split * m_per_split
        m_stop = tl.minimum(m_start + m_per_split, M)
        for m0 in range(m_start, m_stop, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            col_ok = cols < m_stop
            k = tl.load(
                K_ptr + g * k_stride_h + cols[None, :] * k_stride_m + d[:, None] * k_stride_d,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # [BLOCK_D, BLOCK_M]
            if FP32_DOT:
                s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * scale
            else:
                s = tl.dot(q, k) * scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            # guard rows that have seen only masked columns so far (max still -inf)
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(s - safe_max[:, None]), axis=1)
            row_max = new_max
        out = split * num_rows_total + h * L + ell
        tl.store(Max_ptr + out, row_max, mask=row_ok)
        tl.store(Sum_ptr + out, row_sum, mask=row_ok)

    @triton.jit
    def _relevance_kernel(
        Q_ptr,
        K_ptr,
        Max_ptr,  # [H * L] fp32, combined statistics
        Sum_ptr,  # [H * L] fp32
        R_ptr,  # [M] fp32 out
        q_stride_h,
        q_stride_l,
        q_stride_d,
        k_stride_h,
        k_stride_m,
        k_stride_d,
        L,
        M,
        scale,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        FP32_DOT: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        r = tl.zeros([BLOCK_M], tl.float32)
        for g in range(NUM_KV_HEADS):
            k = tl.load(
                K_ptr + g * k_stride_h + cols[None, :] * k_stride_m + d[:, None] * k_stride_d,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # [BLOCK_D, BLOCK_M]
            for r0 in range(0, GROUP * L, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                row_ok = rows < GROUP * L
                h = g * GROUP + rows // L
                ell = rows % L
                q = tl.load(
                    Q_ptr + h[:, None] * q_stride_h + ell[:, None] * q_stride_l + d[None, :] * q_stride_d,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                row_max = tl.load(Max_ptr + h * L + ell, mask=row_ok, other=0.0)
                row_sum = tl.load(Sum_ptr + h * L + ell, mask=row_ok, other=1.0)
                if FP32_DOT:
                    s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, k) * scale
                p = tl.exp(s - row_max[:, None]) / row_sum[:, None]
                p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
                r = tl.maximum(r, tl.max(p, axis=0))
        tl.store(R_ptr + cols, r, mask=col_ok)


# --------------------------------------------------------------------------- launcher


def _check_inputs(queries: torch.Tensor, keys: torch.Tensor) -> None:
    if queries.ndim != 3 or keys.ndim != 3:
        raise ValueError(
            f"queries must be [H, L, Dh] and keys [Hkv, M, Dh]; got {list(queries.shape)} and {list(keys.shape)}"
        )
    (h, ell, dh), (hkv, m, dk) = queries.shape, keys.shape
    if dh != dk:
        raise ValueError(f"head dims differ: queries Dh={dh}, keys Dh={dk}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"H={h} query heads must be a multiple of Hkv={hkv} kv heads")
    if ell == 0 or m == 0:
        raise ValueError(f"need at least one query token and one key: L={ell}, M={m}")
    for name, t in (("queries", queries), ("keys", keys)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} not supported; use one of {SUPPORTED_DTYPES}")
    if queries.dtype != keys.dtype:
        raise TypeError(f"queries ({queries.dtype}) and keys ({keys.dtype}) must share a dtype")
    if queries.device != keys.device:
        raise ValueError(f"queries on {queries.device} but keys on {keys.device}")


def _num_splits(m: int, block_m: int, programs_without_split: int, device: torch.device) -> int:
    """Split M in pass 1 so that the grid fills the GPU (about 4 programs per SM)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(programs_without_split, 1))
    return max(1, min(want, triton.cdiv(m, block_m)))


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for the Triton launches when it is a CUDA device; else do nothing.

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, not on the
    device of the tensors it is given: with the selector on ``cuda:1`` while ``cuda:0`` is current, an
    unguarded launch runs on the wrong GPU (an illegal address, or garbage). CPU tensors (the
    interpreter) need no guard.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def score_relevance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_r: int = 16,
) -> torch.Tensor:
    """Fused relevance r [M] fp32 from queries [H, L, Dh] and keys [Hkv, M, Dh] (any strides).

    ``out``: optional contiguous fp32 [M] buffer to write r into. Runs on CUDA tensors (on their
    device, whichever is current), or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; use relevance_reference or QTSPLUS_SELECTOR_IMPL=torch")
    _check_inputs(queries, keys)
    with launch_device(keys.device):
        return _score_relevance(queries, keys, out, block_m, block_r)


def _score_relevance(
    queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None, block_m: int, block_r: int
) -> torch.Tensor:
    h, ell, dh = queries.shape
    hkv, m, _ = keys.shape
    group = h // hkv
    block_d = max(16, triton.next_power_of_2(dh))
    # fp32 inputs: IEEE fp32 dots (not TF32). The interpreter's bf16/fp16 tl.dot is wrong in Triton 3.9,
    # so there low-precision tiles are upcast first (exact: bf16/fp16 products fit in fp32).
    fp32_dot = queries.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    scale = 1.0 / math.sqrt(dh)
    row_blocks = triton.cdiv(group * ell, block_r)
    splits = _num_splits(m, block_m, hkv * row_blocks, keys.device)
    m_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, m_per_split)

    part_max = torch.empty(splits, h * ell, dtype=torch.float32, device=keys.device)
    part_sum = torch.empty_like(part_max)
    _row_stats_kernel[(hkv, row_blocks, splits)](
        queries, keys, part_max, part_sum,
        *queries.stride(), *keys.stride(),
        ell, m, m_per_split, h * ell, scale,
        GROUP=group, HEAD_DIM=dh, BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_D=block_d, FP32_DOT=fp32_dot,
    )  # fmt: skip
    # combine the per-split statistics: max = max_s max_s, sum = sum_s sum_s * exp(max_s - max)
    row_max = part_max.amax(dim=0)
    row_sum = (part_sum * torch.exp(part_max - row_max)).sum(dim=0)

    r = torch.empty(m, dtype=torch.float32, device=keys.device) if out is None else out
    if r.shape != (m,) or r.dtype != torch.float32 or not r.is_contiguous() or r.device != keys.device:
        raise ValueError(f"out must be a contiguous fp32 [{m}] tensor on {keys.device}")
    _relevance_kernel[(triton.cdiv(m, block_m),)](
        queries, keys, row_max, row_sum, r,
        *queries.stride(), *keys.stride(),
        ell, m, scale,
        NUM_KV_HEADS=hkv, GROUP=group, HEAD_DIM=dh, BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_D=block_d, FP32_DOT=fp32_dot,
    )  # fmt: skip
    return r
