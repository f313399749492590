"""The fused scoring kernel against the eager reference (CPU: Triton interpreter; GPU: real shapes)."""

from __future__ import annotations

import contextlib
import types
import zlib

import pytest
import torch

from qtsplus_vllm.config import QTSplusConfig
from qtsplus_vllm.kernels import score_topk
from qtsplus_vllm.kernels.score_topk import (
    budget_stats,
    relevance_reference,
    score_relevance,
    select_top,
    triton_available,
)
from qtsplus_vllm.selector import QTSplusSelector, budget_count

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not triton_available(), reason="Triton is not installed"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {  # (rtol, atol) on r; statistics are fp32 in every case
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-4, 1e-5),
    torch.bfloat16: (1e-4, 1e-5),
}


def fresh_inputs(case: str, h, hkv, ell, m, dh, dtype, strided=False, spread=2.0):
    """Random queries [H, L, Dh] / keys [Hkv, M, Dh], seeded by the case name (fresh per case)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    if strided:  # the layouts the selector produces: views of [L, H*Dh] and [M, Hkv*Dh]
        q = (spread * torch.randn(ell, h * dh, generator=gen)).to(dtype).view(ell, h, dh).transpose(0, 1)
        k = torch.randn(m, hkv * dh, generator=gen).to(dtype).view(m, hkv, dh).transpose(0, 1)
    else:
        q = (spread * torch.randn(h, ell, dh, generator=gen)).to(dtype)
        k = torch.randn(hkv, m, dh, generator=gen).to(dtype)
    return q.to(DEVICE), k.to(DEVICE)


def assert_same_top(r_kernel, r_ref, n, atol):
    """Indices equal, except that tokens whose r is within atol of the cut may swap (ties)."""
    ours, ref = select_top(r_kernel, n).tolist(), select_top(r_ref, n).tolist()
    if ours == ref:
        return
    cut = torch.sort(r_ref, descending=True).values[n - 1].item()
    differing = set(ours) ^ set(ref)
    assert all(abs(r_ref[i].item() - cut) <= atol for i in differing), (sorted(differing), cut)


SHAPES = [
    # H, Hkv, L, M, Dh
    (4, 2, 3, 1, 16),
    (4, 2, 1, 63, 16),
    (4, 2, 5, 65, 16),
    (8, 2, 17, 129, 8),
    (6, 3, 7, 200, 24),
    (4, 4, 2, 97, 32),
    (4, 1, 9, 150, 16),
    (2, 1, 512, 70, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-Hkv{}-L{}-M{}-Dh{}".format(*s))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_relevance_matches_reference(shape, dtype, strided):
    h, hkv, ell, m, dh = shape
    q, k = fresh_inputs(f"{shape}-{dtype}-{strided}", h, hkv, ell, m, dh, dtype, strided)
    out = torch.full((m,), float("nan"), device=DEVICE)  # poisoned: every element must be written
    r = score_relevance(q, k, out=out)
    assert r is out and r.dtype == torch.float32
    assert not torch.isnan(r).any()
    ref = relevance_reference(q, k)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(r, ref, rtol=rtol, atol=atol)

    (max_k, ent_k), (max_r, ent_r) = budget_stats(r), budget_stats(ref)
    torch.testing.assert_close(max_k, max_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(ent_k, ent_r, rtol=rtol, atol=10 * atol)
    for n in {1, max(1, m // 3), m}:
        assert_same_top(r, ref, n, atol=2 * atol)


def test_peaked_and_flat_attention():
    # very large logits (one-hot softmax) and all-equal logits (uniform softmax, r = 1/M everywhere)
    q, k = fresh_inputs("peaked", 4, 2, 3, 300, 16, torch.float32, spread=40.0)
    torch.testing.assert_close(score_relevance(q, k), relevance_reference(q, k), rtol=1e-5, atol=1e-6)
    flat = score_relevance(torch.zeros(4, 3, 16, device=DEVICE), torch.randn(2, 300, 16, device=DEVICE))
    torch.testing.assert_close(flat, torch.full((300,), 1 / 300, device=DEVICE), rtol=1e-5, atol=0)


def test_exact_duplicate_keys_are_tie_aware():
    q, k = fresh_inputs("dups", 4, 2, 2, 10, 16, torch.float32)
    k = k.repeat(1, 7, 1)  # M = 70, every key 7 times
    r, ref = score_relevance(q, k), relevance_reference(q, k)
    for n in (1, 5, 7, 20, 33):
        assert_same_top(r, ref, n, atol=2e-6)


def test_launcher_validates_inputs():
    q = torch.randn(4, 3, 16, device=DEVICE)
    k = torch.randn(2, 50, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"queries must be \[H, L, Dh\]"):
        score_relevance(q[0], k)
    with pytest.raises(ValueError, match="head dims differ"):
        score_relevance(q, k[..., :8])
    with pytest.raises(ValueError, match="multiple of Hkv=3"):
        score_relevance(q, torch.randn(3, 50, 16, device=DEVICE))
    with pytest.raises(ValueError, match="L=0"):
        score_relevance(q[:, :0], k)
    with pytest.raises(TypeError, match="must share a dtype"):
        score_relevance(q.half(), k)
    with pytest.raises(TypeError, match="not supported"):
        score_relevance(q.double(), k.double())
    with pytest.raises(ValueError, match="out must be a contiguous fp32"):
        score_relevance(q, k, out=torch.empty(49, device=DEVICE))
    with pytest.raises(ValueError, match=r"n must be in \[1, M=50\]"):
        select_top(torch.rand(50), 0)


class ClaimsCuda1(torch.Tensor):
    """A CPU tensor that reports ``cuda:1`` as its device (what the launcher sees of a tensor there)."""

    @property
    def device(self):
        return torch.device("cuda:1")


def test_launches_run_with_the_tensors_device_current(monkeypatch):
    # Triton launches on torch.cuda.current_device(), not on the tensors' device: with the runtime on
    # cuda:1 and cuda:0 current, both kernels must be launched inside torch.cuda.device(cuda:1).
    # No GPU needed: the CUDA pieces the launcher touches are replaced by recorders.
    current: list[torch.device] = []  # stack of devices made current by torch.cuda.device(...)
    launches: list[tuple[str, torch.device]] = []

    class RecordingDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    def current_device():
        return current[-1] if current else torch.device("cuda:0")  # cuda:0 is current by default

    class Kernel:
        def __init__(self, name, fill):
            self.name, self.fill = name, fill

        def __getitem__(self, grid):
            def run(*args, **meta):
                launches.append((self.name, current_device()))
                self.fill(args)

            return run

    real_empty = torch.empty

    def empty(*size, device=None, **kwargs):  # allocate on CPU what the launcher asks of cuda:1
        t = real_empty(*size, **kwargs)
        return t.as_subclass(ClaimsCuda1) if torch.device(device or "cpu").type == "cuda" else t

    def fill_stats(args):  # (Q, K, Max, Sum, ...): a max of 0 and a sum of 1 per row
        args[2].fill_(0.0)
        args[3].fill_(1.0)

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=4)
    )
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(score_topk, "_row_stats_kernel", Kernel("row_stats", fill_stats))
    monkeypatch.setattr(score_topk, "_relevance_kernel", Kernel("relevance", lambda args: args[4].fill_(0.5)))

    q = torch.randn(4, 3, 16).as_subclass(ClaimsCuda1)
    k = torch.randn(2, 50, 16).as_subclass(ClaimsCuda1)
    assert q.device == k.device == torch.device("cuda:1")
    r = score_relevance(q, k)
    assert launches == [("row_stats", torch.device("cuda:1")), ("relevance", torch.device("cuda:1"))]
    assert current == []  # the previous device is current again afterwards
    assert r.shape == (50,)


def test_cpu_launches_take_no_cuda_device_guard(monkeypatch):
    # the interpreter path must not touch torch.cuda at all (it would fail on CPU-only builds)
    def no_cuda(device):
        raise AssertionError(f"torch.cuda.device({device}) entered for CPU tensors")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    assert isinstance(score_topk.launch_device(torch.device("cpu")), contextlib.nullcontext)
    if DEVICE == "cpu":
        q, k = fresh_inputs("cpu-guard", 4, 2, 3, 70, 16, torch.float32)
        torch.testing.assert_close(score_relevance(q, k), relevance_reference(q, k), rtol=1e-5, atol=1e-6)


def _selector(seed=0):
    cfg = QTSplusConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        num_hidden_layers=1,
        vocab_size=64,
        qts_plus_scoring_layers=2,
    )
    sel = QTSplusSelector.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    sel.load_state_dict({k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in sel.state_dict().items()})
    return sel.to(DEVICE)


def test_selector_paths_agree(monkeypatch):
    selector = _selector()
    gen = torch.Generator().manual_seed(1)
    x, q = torch.randn(333, 64, generator=gen).to(DEVICE), torch.randn(6, 64, generator=gen).to(DEVICE)
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "torch")
    ref = selector.select(x, q)
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "triton")
    fused = selector.select(x, q)
    assert fused.n == ref.n
    torch.testing.assert_close(fused.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert_same_top(fused.scores, ref.scores, ref.n, atol=2e-6)
    if torch.equal(fused.indices, ref.indices):
        torch.testing.assert_close(fused.embeds, ref.embeds, rtol=1e-5, atol=1e-5)
    assert budget_count(torch.tensor(fused.rho), 333, selector.nmax) == fused.n


def test_bad_impl_switch_is_rejected(monkeypatch):
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "cuda-magic")
    with pytest.raises(
        ValueError, match=r"QTSPLUS_SELECTOR_IMPL='cuda-magic': must be one of auto, triton, torch"
    ):
        _selector().select(torch.randn(5, 64, device=DEVICE), torch.randn(2, 64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["3B", "7B"])
@pytest.mark.parametrize("ell", [16, 64])
def test_real_shapes_on_gpu(model, ell):
    h, hkv = {"3B": (16, 2), "7B": (28, 4)}[model]
    q, k = fresh_inputs(f"gpu-{model}-{ell}", h, hkv, ell, 16411, 128, torch.bfloat16, strided=True)
    r, ref = score_relevance(q, k), relevance_reference(q, k)
    torch.testing.assert_close(r, ref, rtol=1e-3, atol=1e-5)
    assert_same_top(r, ref, 2560, atol=1e-5)
