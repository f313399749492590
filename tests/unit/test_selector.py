"""QTSplusSelector against a literal, slow float64 implementation of DESIGN §2 steps 4-7.

The literal version below deliberately shares nothing with qtsplus_vllm.selector: it reads the raw
state dict, loops over heads and question tokens, and spells out every equation.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qtsplus_vllm.config import CheckpointError, QTSplusConfig
from qtsplus_vllm.selector import QTSplusSelector


def make_config(d=32, h=4, hkv=2, scoring=1, reencode_layers=1, reencode=True, nmax=2560, rho=(0.05, 0.5)):
    return QTSplusConfig(
        hidden_size=d,
        num_attention_heads=h,
        num_key_value_heads=hkv,
        intermediate_size=2 * d,
        num_hidden_layers=1,
        vocab_size=64,
        qts_plus_scoring_layers=scoring,
        qts_plus_reencode_layers=reencode_layers,
        qts_plus_reencode=reencode,
        qts_plus_nmax=nmax,
        qts_plus_rho_min=rho[0],
        qts_plus_rho_max=rho[1],
    )


def random_state_dict(selector: QTSplusSelector, seed: int) -> dict[str, torch.Tensor]:
    """Random weights; q/k projections large enough that attention over M is peaked."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in selector.state_dict().items():
        if "norm" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif "q_proj" in name or "k_proj" in name:
            sd[name] = 0.6 * torch.randn(p.shape, generator=gen)
        else:
            sd[name] = 0.2 * torch.randn(p.shape, generator=gen)
    return sd


# ---------------------------------------------------------------- literal reference (float64)


def lit_rmsnorm(x, w):
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        row = x[t]
        out[t] = w * row / math.sqrt(float((row * row).sum()) / row.shape[0] + 1e-6)
    return out


def lit_gelu(x):
    return 0.5 * x * (1.0 + torch.special.erf(x / math.sqrt(2.0)))


def lit_block(sd, prefix, q, kv, num_heads, num_kv_heads):
    """One attention block; returns (updated q, attention weights [H][L] -> tensor [M])."""
    d = q.shape[1]
    dh = d // num_heads
    qn = lit_rmsnorm(q, sd[prefix + "q_norm.weight"])
    kvn = lit_rmsnorm(kv, sd[prefix + "kv_norm.weight"])
    qp = qn @ sd[prefix + "q_proj.weight"].T + sd[prefix + "q_proj.bias"]
    kp = kvn @ sd[prefix + "k_proj.weight"].T + sd[prefix + "k_proj.bias"]
    vp = kvn @ sd[prefix + "v_proj.weight"].T + sd[prefix + "v_proj.bias"]
    attn_out = torch.zeros(q.shape[0], num_heads * dh, dtype=torch.float64)
    weights = [[None] * q.shape[0] for _ in range(num_heads)]
    for h in range(num_heads):
        g = h // (num_heads // num_kv_heads)
        for i in range(q.shape[0]):
            qv = qp[i, h * dh : (h + 1) * dh]
            logits = [float(qv @ kp[m, g * dh : (g + 1) * dh]) / math.sqrt(dh) for m in range(kv.shape[0])]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            w = torch.tensor([e / total for e in exps], dtype=torch.float64)
            weights[h][i] = w
            attn_out[i, h * dh : (h + 1) * dh] = w @ vp[:, g * dh : (g + 1) * dh]
    q = q + attn_out @ sd[prefix + "o_proj.weight"].T
    hidden = lit_rmsnorm(q, sd[prefix + "ffn_norm.weight"])
    ffn = lit_gelu(hidden @ sd[prefix + "ffn.net.0.weight"].T + sd[prefix + "ffn.net.0.bias"])
    ffn = ffn @ sd[prefix + "ffn.net.2.weight"].T + sd[prefix + "ffn.net.2.bias"]
    return q + ffn, weights


def literal_select(sd32, cfg: QTSplusConfig, X32, Q32):
    sd = {k: v.double() for k, v in sd32.items()}
    X, Q = X32.double(), Q32.double()
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    M = X.shape[0]
    q = Q
    weights = None
    for i in range(cfg.qts_plus_scoring_layers):
        q, weights = lit_block(sd, f"scoring_layers.{i}.", q, X, H, Hkv)
    r = [max(float(weights[h][i][m]) for h in range(H) for i in range(Q.shape[0])) for m in range(M)]
    total = sum(r)
    p = [x / (total + 1e-8) for x in r]
    ent = max(0.0, -sum(pi * math.log(pi + 1e-8) for pi in p))
    feats = torch.cat([Q.mean(0), torch.tensor([math.log(M), max(r), ent], dtype=torch.float64)])
    hidden = lit_gelu(sd["budget.mlp.0.weight"] @ feats + sd["budget.mlp.0.bias"])
    logit = float(sd["budget.mlp.2.weight"][0] @ hidden + sd["budget.mlp.2.bias"][0])
    rho = cfg.qts_plus_rho_min + (cfg.qts_plus_rho_max - cfg.qts_plus_rho_min) / (1.0 + math.exp(-logit))
    n = min(max(math.ceil(rho * M), 1), cfg.qts_plus_nmax)
    ranked = sorted(range(M), key=lambda m: (-r[m], m))
    idx = sorted(ranked[:n])

    def encode(indices):
        """Z for the kept tokens ``indices`` (ascending): re-encoded together, so Z depends on the set."""
        Z = X[list(indices)]
        if cfg.qts_plus_reencode:
            for i in range(cfg.qts_plus_reencode_layers):
                Z, _ = lit_block(sd, f"reencode_layers.{i}.core.", Z, Z, H, Hkv)
        return Z

    return dict(
        r=torch.tensor(r, dtype=torch.float64), rho=rho, n=n, indices=idx, Z=encode(idx), encode=encode
    )


# ---------------------------------------------------------------- comparisons


def assert_same_selection(sel, lit, tol=1e-5):
    """Our selection equals the literal one within ``tol`` (relative; absolute floors tol/10, tol/100).

    Indices may differ only by tokens tied at the cut (|r - r_cut| <= tol/10). Z is then not the
    literal Z: re-encoding mixes the kept rows, so every row depends on the whole kept set. Our rows
    are compared with the literal re-encoding of *our* indices instead, so tie-broken selections are
    checked row by row too.
    """
    assert sel.n == lit["n"]
    assert sel.indices.dtype == torch.int64
    assert sel.indices.tolist() == sorted(sel.indices.tolist())
    assert len(set(sel.indices.tolist())) == sel.n
    torch.testing.assert_close(sel.scores.double(), lit["r"], rtol=tol, atol=tol / 10)
    assert abs(sel.rho - lit["rho"]) <= tol / 10
    ours, ref = sel.indices.tolist(), lit["indices"]
    expected = lit["Z"]
    if ours != ref:
        # tie-aware: only indices whose r sits at the cut (within float noise) may differ
        cut = sorted(lit["r"].tolist(), reverse=True)[sel.n - 1]
        differing = set(ours) ^ set(ref)
        assert all(abs(lit["r"][m].item() - cut) <= tol / 10 for m in differing), (ours, ref)
        expected = lit["encode"](ours)
    assert sel.embeds.shape == tuple(expected.shape)
    for i, (row_ours, row_ref) in enumerate(zip(sel.embeds.double(), expected, strict=True)):
        error, bound = (row_ours - row_ref).norm().item(), tol * row_ref.norm().item() + tol / 100
        assert error <= bound, f"row {i} (token {ours[i]}): |ours - literal| = {error:.3g} > {bound:.3g}"


CASES = {
    # name: (config kwargs, M, L, seed)
    "basic": (dict(), 40, 5, 0),
    "M=1": (dict(), 1, 4, 1),
    "M below minimum budget": (dict(), 3, 4, 2),
    "L=1": (dict(), 37, 1, 3),
    "nmax binding": (dict(nmax=3, rho=(0.4, 0.5)), 50, 3, 4),
    "several layers, GQA 4:1": (dict(h=8, hkv=2, scoring=3, reencode_layers=2), 33, 6, 5),
    "MHA (Hkv = H)": (dict(h=4, hkv=4), 29, 3, 6),
    "MQA (Hkv = 1)": (dict(h=4, hkv=1, scoring=2), 31, 2, 7),
    "no re-encode": (dict(reencode=False), 25, 4, 8),
}
# fp32 against float64: three scoring layers accumulate rounding in q before the last softmax; on
# AVX-512 BLAS r is off by up to 1.8e-5 relative (7e-6 absolute) there, above the default 1e-5.
CASE_TOL = {"several layers, GQA 4:1": 5e-5}


@pytest.mark.parametrize("name", list(CASES))
def test_selector_matches_literal_equations(name):
    cfg_kwargs, M, L, seed = CASES[name]
    cfg = make_config(**cfg_kwargs)
    selector = QTSplusSelector.from_config(cfg)
    sd = random_state_dict(selector, seed)
    selector.load_state_dict(sd)
    gen = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(M, cfg.hidden_size, generator=gen)
    Q = torch.randn(L, cfg.hidden_size, generator=gen)
    sel = selector.select(X, Q)
    assert_same_selection(sel, literal_select(sd, cfg, X, Q), tol=CASE_TOL.get(name, 1e-5))


def test_rho_times_m_exactly_integer_is_not_rounded_up():
    # rho_min == rho_max pins rho = 0.25 exactly; 0.25 * 8 = 2.0 must give n = 2, not 3
    cfg = make_config(rho=(0.25, 0.25))
    selector = QTSplusSelector.from_config(cfg)
    sd = random_state_dict(selector, 11)
    selector.load_state_dict(sd)
    gen = torch.Generator().manual_seed(11)
    X, Q = torch.randn(8, cfg.hidden_size, generator=gen), torch.randn(3, cfg.hidden_size, generator=gen)
    sel = selector.select(X, Q)
    assert sel.rho == 0.25 and sel.n == 2
    assert_same_selection(sel, literal_select(sd, cfg, X, Q))


def test_ties_in_relevance_break_towards_earlier_tokens(monkeypatch):
    # exact ties need bit-identical r for duplicated tokens: the torch path guarantees that; the
    # Triton kernel's ties are checked tie-aware in tests/kernels
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "torch")
    cfg = make_config(rho=(0.3, 0.3))
    selector = QTSplusSelector.from_config(cfg)
    sd = random_state_dict(selector, 12)
    selector.load_state_dict(sd)
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(5, cfg.hidden_size, generator=gen)
    X = base.repeat(4, 1)  # every token appears 4 times: r has exact 4-way ties
    Q = torch.randn(2, cfg.hidden_size, generator=gen)
    sel = selector.select(X, Q)
    lit = literal_select(sd, cfg, X, Q)
    assert sel.n == 6
    assert len(set(sel.scores.tolist())) <= 5
    assert sel.indices.tolist() == lit["indices"]
    assert_same_selection(sel, lit)


def duplicated_tokens_case():
    """The tie case above: 5 distinct tokens, each 4 times, n = 6; (selection, literal)."""
    cfg = make_config(rho=(0.3, 0.3))
    selector = QTSplusSelector.from_config(cfg)
    sd = random_state_dict(selector, 12)
    selector.load_state_dict(sd)
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(5, cfg.hidden_size, generator=gen).repeat(4, 1)
    Q = torch.randn(2, cfg.hidden_size, generator=gen)
    return selector.select(X, Q), literal_select(sd, cfg, X, Q)


def with_index_swapped(sel, old: int, new: int):
    """``sel`` with token ``old`` replaced by ``new`` (kept ascending, ``old``'s row moved along)."""
    rows = dict(zip(sel.indices.tolist(), sel.embeds, strict=True))
    rows[new] = rows.pop(old)
    order = sorted(rows)
    return dataclasses.replace(sel, indices=torch.tensor(order), embeds=torch.stack([rows[i] for i in order]))


def test_comparison_uses_tol_and_compares_rows_under_ties(monkeypatch):
    # the comparison itself must fail on wrong results, also when tie-broken indices differ
    monkeypatch.setenv("QTSPLUS_SELECTOR_IMPL", "torch")
    sel, lit = duplicated_tokens_case()
    assert_same_selection(sel, lit)

    # tol is used: a 1e-4 relative error on one row passes at tol=1e-3, fails at the default 1e-5
    bumped = dataclasses.replace(sel, embeds=sel.embeds.clone())
    bumped.embeds[1] *= 1 + 1e-4
    assert_same_selection(bumped, lit, tol=1e-3)
    with pytest.raises(AssertionError, match="row 1"):
        assert_same_selection(bumped, lit)

    # a legitimate other tie-break: an unselected copy of the token at the cut instead of a selected
    # copy (identical X rows, so identical re-encoded rows) passes ...
    r = lit["r"]
    cut = sorted(r.tolist(), reverse=True)[sel.n - 1]
    chosen = sel.indices.tolist()
    old = max(m for m in chosen if r[m].item() == cut)
    new = next(m for m in range(len(r)) if r[m].item() == cut and m not in chosen)
    swapped = with_index_swapped(sel, old, new)
    assert swapped.indices.tolist() != lit["indices"]
    assert_same_selection(swapped, lit)
    # ... but its rows are still checked: one wrong row fails
    wrong = dataclasses.replace(swapped, embeds=swapped.embeds.clone())
    wrong.embeds[-1] += 0.01 * wrong.embeds[-1].norm()
    with pytest.raises(AssertionError, match="row"):
        assert_same_selection(wrong, lit)
    # and rows that belong to the literal order, not to the swapped indices, fail too
    misordered = dataclasses.replace(swapped, embeds=sel.embeds)
    if not torch.equal(misordered.embeds, swapped.embeds):
        with pytest.raises(AssertionError, match="row"):
            assert_same_selection(misordered, lit)
    # swapping in a token that is not tied at the cut fails
    below = next(m for m in range(len(r)) if r[m].item() < cut - 1e-3)
    with pytest.raises(AssertionError):
        assert_same_selection(with_index_swapped(sel, old, below), lit)


def test_batched_select_equals_one_by_one():
    cfg = make_config(h=4, hkv=2)
    selector = QTSplusSelector.from_config(cfg)
    selector.load_state_dict(random_state_dict(selector, 13))
    gen = torch.Generator().manual_seed(13)
    videos = [torch.randn(m, cfg.hidden_size, generator=gen) for m in (7, 30, 1, 18)]
    questions = [torch.randn(ell, cfg.hidden_size, generator=gen) for ell in (3, 1, 5, 2)]
    batched = selector.select_batch(videos, questions)
    for sel, x, q in zip(batched, videos, questions, strict=True):
        single = selector.select(x, q)
        assert sel.n == single.n and torch.equal(sel.indices, single.indices)
        torch.testing.assert_close(sel.embeds, single.embeds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one question per video"):
        selector.select_batch(videos, questions[:2])


def test_low_precision_inputs_keep_fp32_statistics():
    cfg = make_config()
    selector = QTSplusSelector.from_config(cfg)
    selector.load_state_dict(random_state_dict(selector, 14))
    gen = torch.Generator().manual_seed(14)
    X, Q = torch.randn(64, cfg.hidden_size, generator=gen), torch.randn(4, cfg.hidden_size, generator=gen)
    ref = selector.select(X, Q)
    selector.to(torch.bfloat16)
    low = selector.select(X.bfloat16(), Q.bfloat16())
    assert low.scores.dtype == torch.float32 and low.embeds.dtype == torch.bfloat16
    assert abs(low.n - ref.n) <= 1  # only the rounding of rho * M may move n (DESIGN §2)
    assert low.indices.dtype == torch.int64 and low.indices.tolist() == sorted(low.indices.tolist())


def test_bad_inputs_raise_clear_errors():
    cfg = make_config()
    selector = QTSplusSelector.from_config(cfg)
    X = torch.randn(10, cfg.hidden_size)
    with pytest.raises(ValueError, match="question has no tokens"):
        selector.select(X, torch.zeros(0, cfg.hidden_size))
    with pytest.raises(ValueError, match="M = 0"):
        selector.select(torch.zeros(0, cfg.hidden_size), torch.randn(2, cfg.hidden_size))
    with pytest.raises(ValueError, match=r"vision_embeds must be \[M, 32\]"):
        selector.select(torch.randn(10, 16), torch.randn(2, cfg.hidden_size))


def test_load_state_dict_names_missing_and_misshapen_keys():
    cfg = make_config()
    selector = QTSplusSelector.from_config(cfg)
    sd = random_state_dict(selector, 0)
    del sd["budget.mlp.0.weight"]
    sd["scoring_layers.0.k_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        selector.load_state_dict(sd)
    assert "budget.mlp.0.weight" in str(err.value)
    assert "scoring_layers.0.k_proj.weight: [3, 3] vs [16, 32]" in str(err.value)


def test_released_key_names():
    cfg = make_config(scoring=2, reencode_layers=1)
    names = set(QTSplusSelector.from_config(cfg).state_dict())
    for key in (
        "scoring_layers.0.q_proj.weight",
        "scoring_layers.1.ffn.net.2.bias",
        "scoring_layers.0.kv_norm.weight",
        "budget.mlp.0.weight",
        "budget.mlp.2.bias",
        "reencode_layers.0.core.k_proj.bias",
        "reencode_layers.0.core.ffn_norm.weight",
    ):
        assert key in names
    assert not any("o_proj.bias" in k for k in names)
