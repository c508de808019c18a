"""Range rules of the affine, structural, pooling, resampling and selection ops (issue 12).

Ground truth is sampling: every model is traced in float64, its ranges propagated over a domain, and
>= 2000 points of the domain (plus box corners) executed through the IR; every node's value must lie in its
range. Tightness is checked where the exact answer is known (a linear map right after the input, a
permutation of the input box, monotone ops on the box's ends). Rules are also applied to hand-made ranges
and compared with brute force over a grid of their points.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipgraph
from lipgraph import execute, ir
from lipgraph.bounds import ranges as ranges_mod
from lipgraph.domains import Ball, Box, Domain, Range
from lipgraph.ops import RULES

N_SAMPLES = 2000


# --- helpers -------------------------------------------------------------------------------------------


def _flat(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _flat(x)]
    return []


def _flat_ranges(r: Any) -> list[Range]:
    if isinstance(r, Range):
        return [r]
    return [t for x in r for t in _flat_ranges(x)]


def _points(domain: Domain, x: torch.Tensor, n: int = N_SAMPLES) -> torch.Tensor:
    pts = domain.sample(n, x, torch.Generator().manual_seed(0))
    if isinstance(domain, Box):
        e = domain.enclosure(x)
        pick = torch.rand((200, *x.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64) < 0.5
        corners = torch.where(pick, e.hi, e.lo)
        pts = torch.cat([pts, e.lo[None], e.hi[None], corners])
    return pts


def traced(model: nn.Module, x: torch.Tensor):
    model = model.double().eval()
    x = x.double()
    return model, x, lipgraph.trace(model, x)


def check_enclosure(model: nn.Module, x: torch.Tensor, domain: Domain, *, exact_affine: bool = True,
                    monkeypatch: pytest.MonkeyPatch | None = None, allow_none: tuple[str, ...] = ()):
    """Propagate ranges and check every sampled value of every node lies in its range. Returns
    ``(graph, result, observed)`` with ``observed[name]`` the (min, max) of the samples per flat part."""
    model, x, g = traced(model, x)
    if not exact_affine:
        assert monkeypatch is not None
        monkeypatch.setattr(ranges_mod, "AFFINE_RANGE_ENTRIES", 0)
    res = ranges_mod.propagate(g, domain, x)
    for n in ir.nodes(g):
        if n.op in allow_none:
            continue
        assert res.ranges[n.name] is not None, (n.name, n.op, res.reasons.get(n.name))
    observed: dict[str, list[list[torch.Tensor]]] = {}
    for p in _points(domain, x):
        _, values = execute(g, p, keep=True)
        for n in ir.nodes(g):
            r = res.ranges.get(n.name)
            if r is None:
                continue
            vals = _flat(values[n.name])
            rs = _flat_ranges(r)
            assert len(vals) == len(rs), n.name
            obs = observed.setdefault(n.name, [[v.detach().double().clone(), v.detach().double().clone()]
                                               for v in vals])
            for k, (v, rk) in enumerate(zip(vals, rs, strict=True)):
                v = v.detach().double()
                assert torch.isfinite(rk.lo).all() and torch.isfinite(rk.hi).all(), n.name
                assert v.shape == rk.lo.shape, (n.name, v.shape, rk.lo.shape)
                bad = (v < rk.lo) | (v > rk.hi)
                assert not bool(bad.any()), (f"{n.name} ({n.op}) leaves its range by "
                                             f"{float(torch.maximum(rk.lo - v, v - rk.hi).max()):.3g}")
                obs[k][0] = torch.minimum(obs[k][0], v)
                obs[k][1] = torch.maximum(obs[k][1], v)
    return g, res, observed


def ops_of(g) -> set[str]:
    return {n.op for n in ir.nodes(g)}


def node_of(g, op: str) -> ir.IRNode:
    return next(n for n in ir.nodes(g) if n.op == op)


def tight(res, observed, name: str, factor: float = 1.0 + 1e-6) -> None:
    """The range is at most ``factor`` times the sampled spread, plus the rounding widening of a few
    ``1e-9 * max |v|``: the samples reach its ends."""
    for r, (lo, hi) in zip(_flat_ranges(res.ranges[name]), observed[name], strict=True):
        slack = 1e-8 * (1.0 + r.abs_max)
        assert bool(((r.hi - r.lo) <= factor * (hi - lo) + slack).all()), name


def box_for(x: torch.Tensor, seed: int = 0, width: float = 0.5) -> Box:
    gen = torch.Generator().manual_seed(seed)
    lo = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return Box(lo, lo + width * torch.rand(x.shape, generator=gen, dtype=torch.float64))


def domains_for(x: torch.Tensor) -> list[Domain]:
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return [box_for(x), Ball(c, 0.7, "l2"), Ball(c, 0.3, "linf", clip=(c - 0.2, c + 1.0))]


# --- models -----------------------------------------------------------------------------------------------


class AffineNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.ct = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 8 * 8, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(-2, 2)
            self.bn.bias.uniform_(-1, 1)
        self.register_buffer("s", torch.tensor([[[[1.5]], [[-0.5]]]]))
        self.register_buffer("w", torch.randn(8, 3))

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = self.bn(self.c2(y))
        y = self.ct(y) * self.s
        y = y / 3.0
        z = torch.matmul(y, torch.ones(8, 8, dtype=y.dtype) - 2 * torch.eye(8, dtype=y.dtype))
        return self.fc(z.flatten(1)), torch.matmul(self.w.to(y.dtype).T, y)


class StructNet(nn.Module):
    def forward(self, x):
        r = torch.relu(x)
        a = x - 0.5 * r + 1.0
        c = torch.cat([a, r], dim=1)
        s = torch.stack([a, x], dim=2)
        p1, p2 = torch.chunk(c, 2, dim=1)
        u0, u1 = torch.unbind(s, dim=2)
        y = p1 + p2 - u0 + u1
        y = y.reshape(1, 2, 16).permute(0, 2, 1).contiguous()
        y = y[:, 1:9, :].flatten(1).reshape(1, 4, 2, 2)
        y = torch.flip(y, (2,)) + torch.roll(y, 1, 3)
        y = F.pad(y, (1, 1, 1, 1), value=0.5) + F.pad(y, (1, 1, 1, 1), mode="reflect")
        y = y + F.pad(y, (0, 0, 0, 0)) + F.pad(y[:, :, 1:3, 1:3], (1, 1, 1, 1), mode="replicate")
        y = F.pixel_shuffle(y, 2)
        z = F.pixel_unshuffle(y, 2)
        z = F.channel_shuffle(z, 2)
        e = r[:, :1].expand(1, 3, 4, 4) + r[:, 1:].repeat(1, 3, 1, 1)
        return z.to(torch.float32).to(torch.float64), e


class PoolNet(nn.Module):
    def forward(self, x):
        m = F.max_pool2d(x, 3, 2, padding=1)
        am = F.adaptive_max_pool2d(x, (2, 3))
        a = F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=True)
        a2 = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
        aa = F.adaptive_avg_pool2d(x, (3, 2))
        mean = x.mean(dim=(2, 3), keepdim=True)
        sm = x.sum(dim=1)
        lp2 = F.lp_pool2d(x, 2.0, 2, 2)
        lp1 = F.lp_pool1d(x.flatten(2), 1.0, 3, 3)
        return m, am, a, a2, aa, mean, sm, lp2, lp1, x.sum(), x.mean()


class ResizeNet(nn.Module):
    def forward(self, x):
        r = torch.relu(x) - x  # not affine in x: the rule itself is used
        return (F.interpolate(r, scale_factor=2, mode="nearest"),
                F.interpolate(r, size=(7, 5), mode="bilinear", align_corners=False),
                F.interpolate(r, scale_factor=2, mode="bicubic", align_corners=True),
                F.interpolate(r, size=(3, 3), mode="area"),
                F.interpolate(r.flatten(2), scale_factor=1.5, mode="linear"))


class SelectNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.rand(1, 2, 4, 4) < 0.5)
        self.register_buffer("two", torch.full((1, 2, 4, 4), 2.0))

    def forward(self, x):
        r = torch.relu(x)
        mx = torch.maximum(x, r - 0.3)
        mn = torch.minimum(x, 0.2 - r)
        am = torch.amax(x, dim=(2, 3))
        ami = torch.amin(x, dim=1)
        lse = torch.logsumexp(x, dim=3)
        w = torch.where(self.mask, x, r)
        w2 = torch.where(self.mask, x, self.two)
        cs = torch.cumsum(x, dim=3)
        return mx, mn, am, ami, lse, w, w2, cs, torch.max(x)


# --- sampling tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exact_affine", [True, False])
@pytest.mark.parametrize("d", range(3))
def test_affine_ops_enclose_samples(d: int, exact_affine: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4)
    domain = domains_for(x.double())[d]
    g, res, obs = check_enclosure(AffineNet(), x, domain, exact_affine=exact_affine, monkeypatch=monkeypatch)
    assert {"conv", "batch_norm", "conv_transpose", "scale", "matmul_const", "linear"} <= ops_of(g)
    # the first conv is affine in x: on a box its interval is A c -+ |A| r exactly (A: the dense Jacobian)
    if isinstance(domain, Box):
        conv = node_of(g, "conv")
        e = domain.enclosure(x.double())
        f = _Fn(lambda t: F.conv2d(t, conv.params["weight"], conv.params.get("bias"), 1, 1))
        a = torch.autograd.functional.jacobian(f, e.mid).reshape(-1, e.mid.numel())
        mid, rad = f(e.mid).reshape(-1), a.abs() @ e.rad.reshape(-1)
        r = res.ranges[conv.name]
        assert bool((r.lo.reshape(-1) <= mid - rad).all() and (r.hi.reshape(-1) >= mid + rad).all())
        assert torch.allclose(r.lo.reshape(-1), mid - rad, rtol=0, atol=1e-8)  # widened by ~1e-9 only
        assert torch.allclose(r.hi.reshape(-1), mid + rad, rtol=0, atol=1e-8)


@pytest.mark.parametrize("d", range(3))
def test_structural_ops_enclose_samples(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    domain = domains_for(x.double())[d]
    g, res, obs = check_enclosure(StructNet(), x, domain, exact_affine=False, monkeypatch=monkeypatch)
    assert {"add", "cat", "stack", "split", "unbind", "tuple_getitem", "reshape", "permute", "identity", "getitem",
            "expand", "repeat", "flip", "roll", "pad", "pixel_shuffle", "channel_shuffle"} <= ops_of(g), ops_of(g)
    if isinstance(domain, Box):  # selections of relu(x): exact ranges, attained at the box's ends
        for op in ("expand", "repeat"):
            for n in ir.nodes(g):
                if n.op == op:
                    tight(res, obs, n.name)


def test_permute_of_input_box_is_the_permuted_box() -> None:
    class P(nn.Module):
        def forward(self, x):
            return x.permute(0, 3, 1, 2).flip(1).reshape(1, -1)

    x = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    box = box_for(x, seed=5)
    _, x, g = traced(P(), x)
    res = ranges_mod.propagate(g, box, x)
    r = res.ranges[node_of(g, "permute").name]
    lo, hi = box.lo.permute(0, 3, 1, 2), box.hi.permute(0, 3, 1, 2)
    assert bool((r.lo <= lo).all() and (r.hi >= hi).all())
    assert torch.allclose(r.lo, lo, rtol=0, atol=1e-8) and torch.allclose(r.hi, hi, rtol=0, atol=1e-8)
    out = res.ranges[node_of(g, "reshape").name]
    assert torch.allclose(out.lo, lo.flip(1).reshape(1, -1), rtol=0, atol=1e-8)
    assert torch.allclose(out.hi, hi.flip(1).reshape(1, -1), rtol=0, atol=1e-8)


@pytest.mark.parametrize("d", range(3))
def test_pooling_ops_enclose_samples(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 2, 5, 6, generator=torch.Generator().manual_seed(2))
    domain = domains_for(x.double())[d]
    g, res, obs = check_enclosure(PoolNet(), x, domain, exact_affine=False, monkeypatch=monkeypatch)
    assert {"max_pool", "adaptive_max_pool", "avg_pool", "adaptive_avg_pool", "mean", "sum", "lp_pool"} <= ops_of(g)
    if isinstance(domain, Box):  # monotone ops attain both ends at the box's corners lo and hi
        for n in ir.nodes(g):
            if n.op in ("max_pool", "adaptive_max_pool", "avg_pool", "adaptive_avg_pool", "mean", "sum"):
                tight(res, obs, n.name)


@pytest.mark.parametrize("d", range(3))
def test_resize_encloses_samples(d: int) -> None:
    x = torch.randn(1, 2, 4, 3, generator=torch.Generator().manual_seed(4))
    domain = domains_for(x.double())[d]
    g, res, _ = check_enclosure(ResizeNet(), x, domain)
    assert sum(n.op == "resize" for n in ir.nodes(g)) == 5


@pytest.mark.parametrize("d", range(3))
def test_selection_ops_enclose_samples(d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    domain = domains_for(x.double())[d]
    g, res, obs = check_enclosure(SelectNet(), x, domain, exact_affine=False, monkeypatch=monkeypatch)
    assert {"elementwise_max", "amax", "logsumexp", "where_const", "cumsum"} <= ops_of(g), ops_of(g)
    if isinstance(domain, Box):
        for n in ir.nodes(g):
            if n.op in ("amax", "cumsum", "logsumexp"):
                tight(res, obs, n.name)


def test_linear_after_input_has_the_exact_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 4)).double()
    x = torch.zeros(1, 6, dtype=torch.float64)
    box = box_for(x, seed=8)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    c, r = box.enclosure(x).mid, box.enclosure(x).rad
    exact_lo, exact_hi = c @ w.T + b - r @ w.abs().T, c @ w.T + b + r @ w.abs().T
    for affine in (True, False):
        if not affine:
            monkeypatch.setattr(ranges_mod, "AFFINE_RANGE_ENTRIES", 0)
        g = lipgraph.trace(model, x)
        rr = ranges_mod.propagate(g, box, x).ranges[node_of(g, "linear").name]
        assert torch.allclose(rr.lo, exact_lo, rtol=1e-8, atol=1e-12)
        assert torch.allclose(rr.hi, exact_hi, rtol=1e-8, atol=1e-12)
        assert bool((rr.lo <= exact_lo).all() and (rr.hi >= exact_hi).all())


class _Round(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)


def test_op_without_range_rule_gives_none_with_reason() -> None:
    model = nn.Sequential(nn.Linear(4, 3), _Round(), nn.Linear(3, 2), nn.ReLU()).double()
    x = torch.zeros(1, 4, dtype=torch.float64)
    g = lipgraph.trace(model, x)
    res = ranges_mod.propagate(g, Box(-1, 1), x)
    rounded = node_of(g, "discontinuous")
    assert res.ranges[node_of(g, "linear").name] is not None
    assert res.ranges[rounded.name] is None and "discontinuous" in res.reasons[rounded.name]
    after = [n for n in ir.nodes(g) if n.op in ("relu", "output")]
    assert after and all(res.ranges[n.name] is None and "discontinuous" in res.reasons[n.name] for n in after)


# --- rules on hand-made ranges against brute force -----------------------------------------------------------


def _grid_points(r: Range, k: int = 3) -> torch.Tensor:
    """All points of the product grid with k values per coordinate (corners included)."""
    lo, hi = r.lo.reshape(-1), r.hi.reshape(-1)
    ts = torch.linspace(0, 1, k, dtype=torch.float64)
    pts = [lo + t * (hi - lo) for t in itertools.product(ts, repeat=lo.numel()) for t in [torch.stack(t)]]
    return torch.stack(pts).reshape(-1, *r.lo.shape)


def _range_of(n: ir.IRNode, *rs: Range) -> Any:
    rule = RULES[n.op]
    if rule.ranges is not None:
        return rule.ranges(n, *rs)
    return ranges_mod.monotone_range(n, list(rs))


def _brute(n: ir.IRNode, *rs: Range, k: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    grids = [_grid_points(r, k) for r in rs]
    outs = [_flat(RULES[n.op].forward(n, *p)) for p in itertools.product(*grids)]
    return [(torch.stack([o[i] for o in outs]).amin(0), torch.stack([o[i] for o in outs]).amax(0))
            for i in range(len(outs[0]))]


def _check_rule(n: ir.IRNode, *rs: Range, exact: bool, k: int = 3) -> None:
    got = _flat_ranges(_range_of(n, *rs))
    for r, (lo, hi) in zip(got, _brute(n, *rs, k=k), strict=True):
        assert bool((r.lo <= lo).all() and (r.hi >= hi).all()), n.op
        if exact:  # attained on the grid (linear/monotone ops attain their ends at corners)
            assert torch.allclose(r.lo, lo, rtol=1e-7, atol=1e-8) and torch.allclose(r.hi, hi, rtol=1e-7,
                                                                                       atol=1e-8), n.op


def _hand_range(shape: tuple[int, ...], seed: int) -> Range:
    gen = torch.Generator().manual_seed(seed)
    lo = torch.randn(shape, generator=gen, dtype=torch.float64)
    return Range(lo, lo + torch.rand(shape, generator=gen, dtype=torch.float64))


def _node(model: nn.Module, x: torch.Tensor, op: str) -> ir.IRNode:
    _, x, g = traced(model, x)
    return node_of(g, op)


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


@pytest.mark.parametrize(("name", "fn", "shape", "op", "exact"), [
    ("conv", nn.Conv1d(1, 2, 2), (1, 1, 3), "conv", True),
    ("conv_t", nn.ConvTranspose1d(1, 1, 2, stride=1), (1, 1, 3), "conv_transpose", True),
    ("linear", nn.Linear(3, 2), (1, 3), "linear", True),
    ("linear1d", _Fn(lambda x: F.interpolate(x, size=5, mode="linear")), (1, 1, 3), "resize", True),
    ("maxpool", _Fn(lambda x: F.max_pool1d(x, 2, 1)), (1, 1, 4), "max_pool", True),
    ("lp2", nn.LPPool1d(2.0, 2, 1), (1, 1, 4), "lp_pool", True),
    ("lp1", nn.LPPool1d(1.0, 2, 1), (1, 1, 4), "lp_pool", True),
    ("lse", _Fn(lambda x: torch.logsumexp(x, dim=1)), (1, 4), "logsumexp", True),
    ("cumsum", _Fn(lambda x: torch.cumsum(x, dim=1)), (1, 4), "cumsum", True),
    ("amin", _Fn(lambda x: torch.amin(x, dim=1)), (1, 4), "amax", True),
])
def test_rule_on_hand_made_ranges_matches_brute_force(name: str, fn: nn.Module, shape, op: str, exact: bool) -> None:
    torch.manual_seed(11)
    n = _node(fn, torch.zeros(shape), op)
    r = _hand_range(shape, seed=len(name))
    _check_rule(n, r, exact=exact, k=3)
    # a range straddling 0 (the grid -a, 0, a holds the minimum of |x| for the norm pools)
    a = r.abs_max + 1.0
    _check_rule(n, Range(-a, a), exact=exact, k=3)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_is_monotone_brute_force(largest: bool) -> None:
    """The j-th largest entry is max over j-subsets of the subset's min: nondecreasing in every entry, so the
    range of the top-k values is [topk(lo), topk(hi)] (exact, attained at lo and hi)."""
    n = ir.IRNode("t", "topk", ["x"], {"k": 3, "dim": 1, "largest": largest}, in_shapes=[(2, 4)],
                  out_shape=(2, 3))
    r = _hand_range((2, 4), 9)
    _check_rule(n, Range(r.lo - 0.5, r.hi), exact=True, k=3)


def test_lp_pool_odd_power_needs_nonnegative_inputs() -> None:
    """PyTorch lp_pool with p = 3 is NaN where the window's sum of cubes is negative: no range unless lo >= 0."""
    n = _node(nn.LPPool1d(3.0, 2, 1), torch.zeros(1, 1, 4), "lp_pool")
    r = _hand_range((1, 1, 4), 3)
    assert RULES["lp_pool"].ranges(n, Range(r.lo - 5.0, r.hi)) is None
    pos = Range(r.lo.abs(), r.lo.abs() + 1.0)
    _check_rule(n, pos, exact=True, k=3)


def test_bicubic_rule_needs_absolute_weights() -> None:
    """Bicubic has negative weights: [f(lo), f(hi)] is not an enclosure, the |A| rule is (checked on a grid)."""
    n = _node(_Fn(lambda x: F.interpolate(x, size=7, mode="bicubic", align_corners=False)), torch.zeros(1, 1, 3, 3),
              "resize")
    r = Range(torch.zeros(1, 1, 3, 3, dtype=torch.float64), torch.ones(1, 1, 3, 3, dtype=torch.float64))
    r = Range(r.lo, r.hi * torch.tensor([[1.0, 0.0, 1.0]] * 3, dtype=torch.float64))  # some entries fixed at 0
    got = RULES["resize"].ranges(n, r)
    lo, hi = _brute(n, r, k=2)[0]
    assert bool((got.lo <= lo).all() and (got.hi >= hi).all())
    naive = ranges_mod.monotone_range(n, [r])
    assert bool(((naive.lo > lo + 1e-9) | (naive.hi < hi - 1e-9)).any())  # the monotone shortcut would be wrong
    assert torch.allclose(got.lo, lo, atol=1e-8) and torch.allclose(got.hi, hi, atol=1e-8)  # |A| rad is exact here


def test_add_and_where_and_max_with_two_inputs_brute_force() -> None:
    a, b = _hand_range((1, 3), 1), _hand_range((1, 3), 2)
    mask = torch.tensor([[True, False, True]])
    cases = [
        (_Fn(lambda x, y: 2.0 * x - 0.5 * y + 1.0), "add"),
        (_Fn(lambda x, y: torch.where(mask, x, y)), "where_const"),
        (_Fn(lambda x, y: torch.maximum(x, y)), "elementwise_max"),
        (_Fn(lambda x, y: torch.cat([x, y], 1)), "cat"),
    ]
    for fn, op in cases:
        model = fn.double()
        z = torch.zeros(1, 3, dtype=torch.float64)
        g = lipgraph.trace(model, (z, z))
        n = node_of(g, op)
        _check_rule(n, a, b, exact=True, k=2)


def test_cast_rules_on_hand_made_ranges() -> None:
    n = ir.IRNode("c", "identity", ["x"], {"dtype": torch.int32})
    r = Range(torch.tensor([-1.5, 0.2, 2.7], dtype=torch.float64), torch.tensor([-0.5, 1.9, 3.0], dtype=torch.float64))
    got = RULES["identity"].ranges(n, r)
    assert torch.equal(got.lo, torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64))
    assert torch.equal(got.hi, torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64))
    huge = Range(torch.tensor([0.0], dtype=torch.float64), torch.tensor([1e12], dtype=torch.float64))
    assert RULES["identity"].ranges(n, huge) is None  # would wrap around
    nb = dataclasses.replace(n, attrs={"dtype": torch.bool})
    rb = Range(torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    got = RULES["identity"].ranges(nb, rb)
    assert torch.equal(got.lo, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(got.hi, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    nf = dataclasses.replace(n, attrs={"dtype": torch.float16})
    x = torch.tensor([0.1, 1 / 3, 1000.7], dtype=torch.float64)
    got = RULES["identity"].ranges(nf, Range.point(x))
    assert got.contains(x.to(torch.float16).to(torch.float64))


def test_scale_dividing_by_zero_has_no_range() -> None:
    n = ir.IRNode("s", "scale", ["x"], {"divide": True}, {"const": torch.tensor([1.0, 0.0])})
    assert RULES["scale"].ranges(n, _hand_range((2,), 0)) is None


class _HalfCast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            self.lin.weight.fill_(1.0)
            self.lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).half().float()


def test_a_narrowing_cast_keeps_its_rounding_in_the_range() -> None:
    """``x -> half(x)`` at x = 1.0007 rounds up to 1.000977: the exact affine form of the Linear before it must not
    replace the cast's own (rounding-aware) range."""
    model = _HalfCast().double()
    x = torch.zeros(1, 1, dtype=torch.float64)
    g = lipgraph.trace(model, x)
    rr = ranges_mod.propagate(g, Box(0.0, 1.0007), x)
    _, values = execute(g, torch.full((1, 1), 1.0007, dtype=torch.float64), keep=True)
    for name, r in rr.ranges.items():
        if isinstance(r, Range) and isinstance(values.get(name), torch.Tensor):
            assert r.contains(values[name].double()), (name, r, values[name])
