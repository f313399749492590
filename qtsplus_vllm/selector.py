"""The QTS+ query-aware token selector (inference), torch only.

For one video with visual tokens X [M, D] and question embeddings Q [L, D] (DESIGN §2, steps 4-7):

1. scoring layers (cross-attention, q0 = Q, kv = X):  q <- q + o_proj(attn(q_norm(q), kv_norm(X)));
   q <- q + FFN(ffn_norm(q)).  Relevance r[m] = max over heads h and query tokens l of the LAST
   layer's attention weights softmax_m(q_{h,l} . k_{g(h),m} / sqrt(Dh)), in fp32.
2. budget: p = r / (sum r + 1e-8), Hent = max(0, -sum p log(p + 1e-8)),
   rho = rho_min + (rho_max - rho_min) * sigmoid(MLP([mean_l Q, ln M, max r, Hent])),
   n = min(max(ceil(rho * M), 1), nmax), all in fp32.
3. selection: the n largest r (ties: lower index first), in ascending (temporal) order.
4. re-encode: self-attention blocks (same block as a scoring layer) over the n kept rows.

Module names match the released checkpoints' keys under ``model.qts_plus.selector.`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CheckpointError, QTSplusConfig
from .kernels.rms_norm import rms_norm_fp32
from .kernels.score_topk import (
    budget_stats,
    relevance_reference,
    score_relevance,
    select_top,
    triton_available,
)
from .settings import settings

RMS_EPS = 1e-6
BUDGET_HIDDEN = 256


@dataclass
class Selection:
    """The selector's result for one video.

    indices: [n] int64, ascending positions of the kept tokens in X.
    embeds:  [n, D] kept rows after re-encoding (the selector's dtype and device).
    n:       number of kept tokens.
    rho:     predicted keep ratio (fp32 value as a float).
    scores:  [M] fp32 relevance r.
    """

    indices: torch.Tensor
    embeds: torch.Tensor
    n: int
    rho: float
    scores: torch.Tensor


class RMSNormFp32(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in fp32, result in x's dtype."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and use_triton(x.device):  # one fused pass over [T, D] (kernels/rms_norm.py)
            return rms_norm_fp32(x, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU(erf) -> Linear(4D, D), both with bias (keys ``net.0``, ``net.2``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v per head, no mask: q [H, Lq, Dh], k and v [Hkv, Lk, Dh] (GQA).

    On CUDA the heads get a batch axis: torch's fused SDPA kernels (flash, memory-efficient) take
    4-D inputs only, and 3-D ones fall back to the math kernel, which upcasts to fp32 and
    materialises the H x Lq x Lk weights (4.4 of the gate's 11.8 ms at 7B on an H200, re-encoding
    2,560 rows). On CPU the 3-D call is kept: it is the formula the reference results were taken with.
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=gqa)[0]
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


class AttentionBlock(nn.Module):
    """Pre-norm cross-attention + FFN on the query path; GQA, no positions, no mask.

    The same block serves as a scoring layer (q = question, kv = video) and, wrapped in
    :class:`ReencodeLayer`, as a self-attention re-encode layer (q = kv = kept rows).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.q_norm = RMSNormFp32(dim)
        self.kv_norm = RMSNormFp32(dim)
        self.ffn_norm = RMSNormFp32(dim)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.ffn = FeedForward(dim)

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        return x.view(x.shape[0], n_heads, self.head_dim).transpose(0, 1)  # [heads, T, Dh]

    def project_queries(self, q: torch.Tensor) -> torch.Tensor:
        """[L, D] -> [H, L, Dh]"""
        return self._heads(self.q_proj(self.q_norm(q)), self.num_heads)

    def project_keys(self, kv: torch.Tensor) -> torch.Tensor:
        """[M, D] -> [Hkv, M, Dh]"""
        return self._heads(self.k_proj(self.kv_norm(kv)), self.num_kv_heads)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q [L, D], kv [M, D] -> updated q [L, D]."""
        kvn = self.kv_norm(kv)
        qh = self.project_queries(q)
        kh = self._heads(self.k_proj(kvn), self.num_kv_heads)
        vh = self._heads(self.v_proj(kvn), self.num_kv_heads)
        attn = attention(qh, kh, vh, gqa=self.num_heads != self.num_kv_heads)
        q = q + self.o_proj(attn.transpose(0, 1).reshape(q.shape[0], -1))
        return q + self.ffn(self.ffn_norm(q))


class ReencodeLayer(nn.Module):
    """Self-attention re-encode block over the kept rows (checkpoint keys ``core.*``)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.core = AttentionBlock(dim, num_heads, num_kv_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x, x)


class BudgetHead(nn.Module):
    """rho = rho_min + (rho_max - rho_min) * sigmoid(MLP(x)), x = [mean Q, ln M, max r, Hent] (fp32)."""

    def __init__(self, dim: int, rho_min: float, rho_max: float):
        super().__init__()
        self.rho_min, self.rho_max = rho_min, rho_max
        self.mlp = nn.Sequential(nn.Linear(dim + 3, BUDGET_HIDDEN), nn.GELU(), nn.Linear(BUDGET_HIDDEN, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [D + 3] fp32 -> rho, a 0-d fp32 tensor."""
        w0, b0 = self.mlp[0].weight.float(), self.mlp[0].bias.float()
        w2, b2 = self.mlp[2].weight.float(), self.mlp[2].bias.float()
        logit = F.linear(F.gelu(F.linear(features, w0, b0)), w2, b2)[0]
        return self.rho_min + (self.rho_max - self.rho_min) * torch.sigmoid(logit)


def use_triton(device: torch.device) -> bool:
    """Whether to score with the fused Triton kernel: ``QTSPLUS_SELECTOR_IMPL`` = triton | torch | auto.

    auto (the default) picks Triton for CUDA tensors when it is installed. ``triton`` on CPU tensors
    needs ``TRITON_INTERPRET=1`` set before the process imports this package.
    """
    impl = settings().selector_impl
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("QTSPLUS_SELECTOR_IMPL=triton but Triton is not installed")
        return True
    return device.type == "cuda" and triton_available()  # auto


def budget_count(rho: torch.Tensor, m: int, nmax: int) -> int:
    """n = min(max(ceil(rho * M), 1), nmax), computed in fp32."""
    return int(min(max(int(torch.ceil(rho.float() * float(m)).item()), 1), nmax))


class QTSplusSelector(nn.Module):
    """Query-aware visual token selector with adaptive budget (inference only)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        nmax: int = 2560,
        rho_min: float = 0.05,
        rho_max: float = 0.5,
        scoring_layers: int = 1,
        reencode_layers: int = 1,
        reencode: bool = True,
    ):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"need dim % num_heads == 0 and num_heads % num_kv_heads == 0, got dim={dim}, "
                f"num_heads={num_heads}, num_kv_heads={num_kv_heads}"
            )
        self.dim, self.nmax = dim, nmax
        self.scoring_layers = nn.ModuleList(
            AttentionBlock(dim, num_heads, num_kv_heads) for _ in range(scoring_layers)
        )
        self.budget = BudgetHead(dim, rho_min, rho_max)
        self.reencode_layers = (
            nn.ModuleList(ReencodeLayer(dim, num_heads, num_kv_heads) for _ in range(reencode_layers))
            if reencode
            else None
        )

    @classmethod
    def from_config(cls, config: QTSplusConfig) -> QTSplusSelector:
        return cls(
            dim=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            nmax=config.qts_plus_nmax,
            rho_min=config.qts_plus_rho_min,
            rho_max=config.qts_plus_rho_max,
            scoring_layers=config.qts_plus_scoring_layers,
            reencode_layers=config.qts_plus_reencode_layers,
            reencode=config.qts_plus_reencode,
        )

    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ):
        """Load checkpoint tensors (keys without ``model.qts_plus.selector.``); errors name the keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [
            f"{k}: {list(state_dict[k].shape)} vs {list(v.shape)}"
            for k, v in own.items()
            if k in state_dict and state_dict[k].shape != v.shape
        ]
        problems = []
        if strict and missing:
            problems.append(f"missing selector tensors {missing}")
        if strict and unexpected:
            problems.append(f"unexpected selector tensors {unexpected}")
        if wrong:
            problems.append("selector tensor shapes (checkpoint vs config): " + "; ".join(wrong))
        if problems:
            raise CheckpointError("; ".join(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.budget.mlp[0].weight.dtype

    def _check_inputs(self, vision_embeds: torch.Tensor, question_embeds: torch.Tensor) -> None:
        if vision_embeds.ndim != 2 or vision_embeds.shape[1] != self.dim:
            raise ValueError(f"vision_embeds must be [M, {self.dim}], got {list(vision_embeds.shape)}")
        if question_embeds.ndim != 2 or question_embeds.shape[1] != self.dim:
            raise ValueError(f"question_embeds must be [L, {self.dim}], got {list(question_embeds.shape)}")
        if vision_embeds.shape[0] == 0:
            raise ValueError("vision_embeds is empty (M = 0): the video produced no visual tokens")
        if question_embeds.shape[0] == 0:
            raise ValueError("question_embeds is empty (L = 0): the question has no tokens")

    def score(self, vision_embeds: torch.Tensor, question_embeds: torch.Tensor) -> torch.Tensor:
        """Relevance r [M] fp32 of each visual token to the question."""
        q = question_embeds
        for layer in self.scoring_layers[:-1]:
            q = layer(q, vision_embeds)
        last = self.scoring_layers[-1]
        # Only the last layer's attention weights matter: its v_proj, o_proj and FFN are skipped.
        queries, keys = last.project_queries(q), last.project_keys(vision_embeds)
        if use_triton(keys.device):
            return score_relevance(queries, keys)
        return relevance_reference(queries, keys)

    def predict_rho(self, r: torch.Tensor, question_embeds: torch.Tensor) -> torch.Tensor:
        """The keep ratio rho (0-d fp32 tensor) from r [M] and the raw question embeddings [L, D]."""
        m = r.shape[0]
        r_max, entropy = budget_stats(r)
        stats = torch.stack([torch.tensor(math.log(max(m, 1)), device=r.device), r_max, entropy])
        return self.budget(torch.cat([question_embeds.float().mean(0), stats.float()]))

    def reencode(self, kept: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [n, D] through the re-encode layers (identity when the checkpoint has none)."""
        for layer in self.reencode_layers or ():
            kept = layer(kept)
        return kept

    @torch.inference_mode()
    def select(
        self,
        vision_embeds: torch.Tensor,
        question_embeds: torch.Tensor,
        rho_scale: float = 1.0,
        rho_bounds: tuple[float, float] = (0.0, 1.0),
        max_tokens: int | None = None,
    ) -> Selection:
        """Select and re-encode the visual tokens of one video for one question.

        vision_embeds [M, D], question_embeds [L, D] (cast to the selector's dtype/device).
        Serving controls (defaults leave DESIGN §2 unchanged): rho' = clamp(rho * rho_scale,
        *rho_bounds) and n = min(max(ceil(rho' * M), 1), nmax, max_tokens); ``Selection.rho`` is rho'.
        """
        self._check_inputs(vision_embeds, question_embeds)
        p = self.budget.mlp[0].weight
        x = vision_embeds.to(device=p.device, dtype=p.dtype)
        q = question_embeds.to(device=p.device, dtype=p.dtype)
        r = self.score(x, q)
        rho = self.predict_rho(r, q)
        if rho_scale != 1.0 or rho_bounds != (0.0, 1.0):
            rho = (rho * rho_scale).clamp(*rho_bounds)
        n = budget_count(rho, x.shape[0], self.nmax if max_tokens is None else min(self.nmax, max_tokens))
        indices = select_top(r, n)
        return Selection(indices=indices, embeds=self.reencode(x[indices]), n=n, rho=float(rho), scores=r)

    def select_batch(
        self, vision_embeds: Sequence[torch.Tensor], question_embeds: Sequence[torch.Tensor]
    ) -> list[Selection]:
        """:meth:`select` for several videos (each with its own M and question); same results as one by one.

        Each video is scored and re-encoded on its own rows: padding videos to a common length
        would let padded rows leak into the re-encode attention.
        """
        if len(vision_embeds) != len(question_embeds):
            raise ValueError(
                f"got {len(vision_embeds)} videos but {len(question_embeds)} questions; need one question per video"
            )
        return [self.select(x, q) for x, q in zip(vision_embeds, question_embeds, strict=True)]
