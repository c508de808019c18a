"""Side-by-side: the seed paper's per-layer norms (autograd power method run to convergence, Virmaux &
Scaman 2018) against lipgraph's certified norms, per layer and for the whole model, in one run.

    .venv/bin/python bench/bench_norms.py --models resnet50 --res 224 --out bench/results/norms.txt

Two power-method baselines run per layer (float32, autograd ``A^T A x = grad 0.5||Ax||^2``):

* ``seed``: the seed paper's published stopping rule (``generic_power_method`` in its code): stop when
  ``||v_t - v_{t-1}|| < 1e-8`` or after 500 steps (``--seed-eps``, ``--seed-max-iter``);
* ``tol``: a tuned rule, stop when the estimate's relative change is below ``--tol`` (1e-4) or after
  ``--max-iter`` (100) steps: far fewer steps, the strongest fair baseline.

Per conv / linear layer: both power values, steps and times; lipgraph's certified upper bound, its
attained lower value and its time; the ratio certified / best power value. Whole model: AutoLip with each
baseline's constants (not certificates), AutoLip with the certified constants, and the affine-region fold
(``lipgraph.bounds.affine``), with times; speed-ups against both baselines. ``--skip-seed`` drops the
(slow) seed-rule column. Weights are torchvision's random initialisation (no
download); ``--bn-stats`` draws BatchNorm statistics like a trained network's (gamma in [0.2, 2],
running_var in [0.1, 4]) so that folding BatchNorm into convolutions matters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lipgraph  # noqa: E402
from lipgraph import ir, norms  # noqa: E402
from lipgraph.bounds import affine, autolip  # noqa: E402
from lipgraph.ops import LocalConstant, Settings  # noqa: E402
from lipgraph.ops.linear import conv_apply, conv_transpose_apply  # noqa: E402


def _op(n: ir.IRNode):
    if n.op == "conv":
        return lambda x: conv_apply(n, x, bias=False)
    if n.op == "conv_transpose":
        return lambda x: conv_transpose_apply(n, x, bias=False)
    return lambda x: torch.nn.functional.linear(x, n.params["weight"])


def _bn_stats(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.data = 0.2 + 1.8 * torch.rand(m.weight.shape, generator=gen)
            m.running_var = 0.1 + 3.9 * torch.rand(m.running_var.shape, generator=gen)


def run(name: str, res: int, args: argparse.Namespace, out: list[str]) -> None:
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    if args.bn_stats:
        _bn_stats(model, 0)
    x = torch.randn(1, 3, res, res)
    g = lipgraph.trace(model, x)
    ctx = Settings(device=torch.device(args.device), power_iterations=args.max_iter)

    def say(line: str) -> None:
        print(line, flush=True)
        out.append(line)

    say(f"\n## {name} at {res}x{res}  (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {args.device})")
    say(f"{'layer':<24} {'weight':<19} {'in':>7} {'p_seed':>8} {'it':>4} {'t_seed':>7} {'p_tol':>8} {'it':>4} "
        f"{'t_tol':>6} {'certified':>9} {'lower':>8} {'t_cert':>7} {'cert/pow':>8}")
    seed_local: dict[str, LocalConstant] = {}
    power_local: dict[str, LocalConstant] = {}
    t_seed_total = t_pow_total = t_cert_layers = 0.0
    ratios = []
    layers = [n for n in ir.nodes(g) if n.op in ("conv", "conv_transpose", "linear")]
    cert_local = {}
    for n in layers:
        ps, its, ts = float("nan"), 0, 0.0
        if not args.skip_seed:
            t0 = time.perf_counter()
            ps, its = seed_power_method(_op(n), n.in_shapes[0], args.seed_eps, args.seed_max_iter, args.device)
            ts = time.perf_counter() - t0
            t_seed_total += ts
            seed_local[n.name] = LocalConstant([ps], False, "power-method-seed-rule")
        t0 = time.perf_counter()
        p = norms.power_method(_op(n), n.in_shapes[0], ctx, iterations=args.max_iter, tol=args.tol)
        tp = time.perf_counter() - t0
        iters = _LAST_ITERS.get("n", 0)
        t0 = time.perf_counter()
        lc = lipgraph.ops.RULES[n.op].lipschitz(n, ctx)
        tc = time.perf_counter() - t0
        cert_local[n.name] = lc
        t_pow_total += tp
        t_cert_layers += tc
        power_local[n.name] = LocalConstant([p], False, "power-method")
        ref = max(p, ps) if ps == ps else p
        ratios.append(lc.value / ref)
        say(f"{n.name[:24]:<24} {str(tuple(n.params['weight'].shape)):<19} "
            f"{'x'.join(map(str, n.in_shapes[0][2:])):>7} {ps:8.4f} {its:4d} {ts:7.2f} {p:8.4f} {iters:4d} {tp:6.2f} "
            f"{lc.value:9.4f} {lc.lower or 0:8.4f} {tc:7.2f} {lc.value / ref:8.4f}")
    # whole model: certified local constants for every node (conv/linear included), then AutoLip
    t0 = time.perf_counter()
    local = {}
    for n in ir.nodes(g):
        local[n.name] = cert_local[n.name] if n.name in cert_local else local_constants_one(g, n, ctx)
    t_local = time.perf_counter() - t0 + t_cert_layers
    cum = autolip.autolip(g, local)
    outn = g.graph["output"]
    mixed = {k: power_local.get(k, v) for k, v in local.items()}
    cum_pow = autolip.autolip(g, mixed)
    t0 = time.perf_counter()
    aff = affine.fold(g, local, ctx)
    t_aff = time.perf_counter() - t0
    cum_aff = autolip.autolip(g, local, aff.overrides)
    say(f"layers: {len(layers)}; certified/power per layer: min {min(ratios):.4f}, median "
        f"{sorted(ratios)[len(ratios) // 2]:.4f}, max {max(ratios):.4f}; "
        f"layers within 1%: {sum(r <= 1.01 for r in ratios)}/{len(ratios)}")
    say(f"{'whole model':<40} {'value':>12} {'seconds':>9}")
    if seed_local:
        cum_seed = autolip.autolip(g, {k: seed_local.get(k, v) for k, v in local.items()})
        say(f"{'AutoLip, power method, seed rule':<40} {cum_seed[outn].value:12.5g} {t_seed_total:9.1f}  (estimate)")
    say(f"{'AutoLip, power method, tol rule':<40} {cum_pow[outn].value:12.5g} {t_pow_total:9.1f}  (estimate)")
    say(f"{'AutoLip, certified (lipgraph)':<40} {cum[outn].value:12.5g} {t_local:9.1f}  "
        f"(certified={cum[outn].certified}; conv/linear layers alone {t_cert_layers:.1f}s)")
    say(f"{'AutoLip + affine folding (lipgraph)':<40} {cum_aff[outn].value:12.5g} {t_local + t_aff:9.1f}  "
        f"(certified={cum_aff[outn].certified}; fold pass {t_aff:.1f}s, {len(aff.regions)} regions)")
    if seed_local:
        say(f"speed-up (seed-rule power method / certified AutoLip): {t_seed_total / max(t_local, 1e-9):.1f}x")
    say(f"speed-up (tol-rule power method / certified AutoLip): {t_pow_total / max(t_local, 1e-9):.1f}x")
    ratios.sort()
    SUMMARY.append(f"{name:<20} {res:>4} {len(layers):>6} {t_seed_total if seed_local else float('nan'):>8.1f} "
                   f"{t_pow_total:>7.1f} {t_local:>7.1f} {ratios[len(ratios) // 2]:>8.4f} {ratios[-1]:>8.4f} "
                   f"{sum(r <= 1.01 for r in ratios):>4}/{len(ratios):<4}")


SUMMARY: list[str] = []
SUMMARY_HEAD = (f"{'model':<20} {'res':>4} {'layers':>6} {'t_seed':>8} {'t_tol':>7} {'t_cert':>7} {'med c/p':>8} "
                f"{'max c/p':>8} {'<=1%':>9}")


def local_constants_one(g, n: ir.IRNode, ctx: Settings) -> LocalConstant:
    """The local constant of one node (what lipgraph.bounds.local.local_constants does per node)."""
    rule = lipgraph.ops.RULES.get(n.op)
    if rule is None:
        return LocalConstant([float("inf")] * len(n.inputs), True, "no-rule")
    return rule.lipschitz(n, ctx)


def seed_power_method(op, in_shape, eps: float, max_iter: int, device: str) -> tuple[float, int]:
    """The seed paper's power method, as its published code runs it: ``v <- normalize(grad ||A v||^2)``
    until ``||v - v_prev|| < eps`` or the step counter passes ``max_iter``; then ``||A v||``. Returns the
    value and the number of steps."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(tuple(in_shape), generator=gen).to(device)
    v = v / v.norm()
    it = 0
    while True:
        prev = v
        x = v.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(op(x).square().sum(), x)
        v = grad / grad.norm()
        it += 1
        if float((v - prev).norm()) < eps or it > max_iter:
            break
    with torch.no_grad():
        return float(op(v).norm()), it


_LAST_ITERS: dict[str, int] = {}
_orig_power = norms.power_method


def _counting_power(op, in_shape, ctx, iterations=None, dtype=torch.float32, x0=None, tol=None, exact_op=None):
    """norms.power_method, counting the steps it takes (for the table)."""
    count = {"n": 0}

    def counted(x):
        count["n"] += 1
        return op(x)

    v = _orig_power(counted, in_shape, ctx, iterations, dtype, x0, tol, exact_op)
    _LAST_ITERS["n"] = max(count["n"] - 1, 0)
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50"])
    ap.add_argument("--res", nargs="+", type=int, default=[224])
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--seed-eps", type=float, default=1e-8)
    ap.add_argument("--seed-max-iter", type=int, default=500)
    ap.add_argument("--skip-seed", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bn-stats", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    norms.power_method = _counting_power  # type: ignore[assignment]
    out: list[str] = [f"# bench_norms: {' '.join(sys.argv[1:])}", f"# {time.strftime('%Y-%m-%d %H:%M')}"]
    for name in args.models:
        for res in args.res:
            try:
                run(name, res, args, out)
            except Exception as exc:  # noqa: BLE001 - a model that does not fit this size is reported, not fatal
                out.append(f"\n## {name} at {res}x{res}: skipped ({type(exc).__name__}: {str(exc)[:160]})")
                print(out[-1], flush=True)
    if len(SUMMARY) > 1:
        out += ["", "## summary (seconds for all conv/linear layers; c/p = certified / best power value)",
                SUMMARY_HEAD, *SUMMARY]
        print("\n".join(out[-len(SUMMARY) - 2:]))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
