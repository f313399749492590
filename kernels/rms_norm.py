"""Fused fp32-statistics RMSNorm for the selector's norms: one read of x, one write of y.

The selector's ``kv_norm`` runs over every visual token ([M, D], M up to ~65k at D = 3584 for the
7B). Written as torch ops (``x.float()``, ``pow``, ``mean``, ``rsqrt``, two multiplies, a cast) it
makes seven passes over fp32 copies of [M, D]: 3.3 ms of a 11.8-ms gate on an H200 (measured with
``benchmarks/profile_gate.py``), more than the K projection GEMM after it. This kernel computes the
same formula per row in registers:

    y = (weight_fp32 * (x_fp32 * rsqrt(mean(x_fp32^2) + eps))).to(x.dtype)

It is not bit-identical to the torch ops: the sum of squares is reduced in a different order, so the
fp32 statistic can differ in its last bits and a few bf16 outputs land one unit apart (counted by
the tests and the profile). The selector uses it on CUDA tensors only; the CPU path stays the torch
formula, equal to the reference implementation.
"""

from __future__ import annotations

import torch

from .score_topk import launch_device, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        X_ptr,
        W_ptr,
        Y_ptr,
        x_stride,
        y_stride,
        D,
        eps,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(X_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
        mean_sq = tl.sum(x * x, axis=0) / D
        scale = 1.0 / tl.sqrt(mean_sq + eps)
        w = tl.load(W_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = w * (x * scale)
        tl.store(Y_ptr + row * y_stride + cols, y.to(Y_ptr.dtype.element_ty), mask=ok)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` [..., D] with fp32 statistics; the result has x's dtype.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("rms_norm_fp32 needs Triton")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must be [{d}], got {list(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x on {x.device} but weight on {weight.device}")
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty((rows.shape[0], d), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        with launch_device(x.device):
            _rms_norm_kernel[(rows.shape[0],)](
                rows, weight, y, rows.stride(0), y.stride(0), d, float(eps),
                BLOCK_D=triton.next_power_of_2(d),
            )  # fmt: skip
    return y.view(x.shape)
