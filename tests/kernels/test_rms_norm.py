"""The fused RMSNorm kernel against the selector's torch formula (CPU: Triton interpreter; GPU: real shapes)."""

from __future__ import annotations

import pytest
import torch

from qtsplus_vllm.kernels.rms_norm import rms_norm_fp32
from qtsplus_vllm.kernels.score_topk import triton_available
from qtsplus_vllm.selector import QTSplusSelector, RMSNormFp32

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not triton_available(), reason="Triton is not installed"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def torch_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNormFp32's CPU path, written out (the reference's formula)."""
    x32 = x.float()
    return (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of a's dtype lie between a and b (same sign assumed)."""
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(view).long() - b.view(view).long()).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, d", [(1, 8), (7, 64), (33, 100), (5, 3584)])
def test_matches_the_torch_formula(rows, d, dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + d)
    x = (3 * torch.randn(rows, d, generator=gen)).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype).to(DEVICE)
    got, ref = rms_norm_fp32(x, w, 1e-6), torch_formula(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    # the sum of squares is reduced in another order, so the fp32 scale can differ in its last bits:
    # fp32 outputs a few units in the last place apart, half-precision ones at most one unit
    assert int(ulps_apart(got, ref).max()) <= (8 if dtype == torch.float32 else 1)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_strided_rows_leading_dims_and_empty():
    x = torch.randn(4, 6, 40, device=DEVICE)[:, ::2]  # [4, 3, 40], rows not evenly spaced in memory
    w = torch.randn(40, device=DEVICE)
    torch.testing.assert_close(rms_norm_fp32(x, w, 1e-6), torch_formula(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    assert rms_norm_fp32(torch.empty(0, 40, device=DEVICE), w, 1e-6).shape == (0, 40)


def test_validates_the_weight():
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[16\]"):
        rms_norm_fp32(x, torch.ones(15, device=DEVICE), 1e-6)


def test_selector_norm_uses_the_kernel_on_cuda_only(monkeypatch):
    calls = []
    import qtsplus_vllm.selector as selector_module

    monkeypatch.setattr(selector_module, "rms_norm_fp32", lambda *a: calls.append(a) or torch_formula(*a))
    norm = RMSNormFp32(16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(norm(x), torch_formula(x, norm.weight, norm.eps))
    assert calls == []  # CPU tensors keep the torch formula (exact to the reference), whatever the impl
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "triton")
    norm(x)
    assert calls == []
    if torch.cuda.is_available():
        monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "auto")
        norm.cuda()(x.cuda())
        assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selector_on_gpu_keeps_the_cpu_choice_at_7b_shapes(monkeypatch):
    """bf16 selector on CUDA (fused norm + 4-D SDPA) against the same weights in fp32 on CPU."""
    sel = QTSplusSelector(3584, 28, 4)
    with torch.no_grad():
        for p in sel.parameters():
            p.normal_(0.0, 0.02)
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(8192, 3584, generator=gen), torch.randn(32, 3584, generator=gen)
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "torch")
    ref = sel.select(x, q, max_tokens=819)
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "auto")
    got = sel.to("cuda", torch.bfloat16).select(x.cuda(), q.cuda(), max_tokens=819)
    assert got.n == ref.n
    overlap = len(set(got.indices.tolist()) & set(ref.indices.tolist())) / ref.n
    assert overlap >= 0.95, overlap
