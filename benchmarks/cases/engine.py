"""The engine's own claims, measured: memory estimates against measured peaks, the planner's
choice against the fastest strategy, the per-call overhead of a cached plan, and joint
covariances by reverse rows.

These cases use only the public API (``plan``, ``functional_covariance``, ...), so the same
module also runs against an older checkout (``PYTHONPATH=<old>/src python benchmarks/run.py
engine --out benchmarks/results/before``) for before/after figures.

* ``estimate/<workload>``: ``functional_variance`` with the planner's choice; the setup records
  the plan's estimated peak (``info.estimated_bytes``) and the peak of PyTorch's allocator during
  one call (``info.allocator_peak_bytes``, ``pushforward.testing.peak_memory``); the harness adds
  the resident-memory peak. The report's "Memory estimate vs measured" section sets them side by
  side.
* ``planner/<workload>/<strategy>``: every exact strategy on the same problem, each named; the
  setup records the planner's own choice (``info.planner_choice``). The report's "Planner's
  choice vs fastest" section says, per problem, whether the choice was the fastest measured.
* ``overhead/<how>``: a joint covariance within groups of 4 at B=12, P=2,851 (the inner loop of
  a q=4 acquisition optimizer): the public call with its plan cached, and the chosen strategy's
  run alone on a prepared problem; 200 calls per timed call.
* ``joint-reverse/<budget>``: the joint 512 x 512 covariance of an MLP 6-200-200-1 with a
  Kronecker posterior by the generic ``reverse`` strategy, at the default budget and at 200 MB,
  and by the planner's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from harness.registry import Context, register
from torch import nn

import pushforward as pf
from cases import workloads

OVERHEAD_CALLS = 200


def _kron(model: nn.Module, seed: int) -> pf.Kronecker:
    """A random Kronecker covariance: factor pairs for weights, dense blocks for biases."""
    g = torch.Generator().manual_seed(seed)

    def spd(n: int, scale: float) -> torch.Tensor:
        A = torch.randn(n, n, generator=g) / n**0.5
        return scale * (A @ A.T + 0.1 * torch.eye(n))

    factors = {}
    for name, p in model.named_parameters():
        if p.dim() > 1:
            factors[name] = (spd(p.shape[0], 0.1), spd(p[0].numel(), 0.1))
        else:
            factors[name] = (spd(p.shape[0], 0.01),)
    return pf.Kronecker(factors)


def _bo_mlp(ctx: Context, width: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
    if ctx.quick:
        width, batch = min(width, 16), max(4, batch // 8)
    torch.manual_seed(ctx.seed)
    model = nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).eval()
    x = torch.rand(batch, 6, generator=torch.Generator().manual_seed(ctx.seed))
    ctx.info.update(
        arch=f"MLP 6-{width}-{width}-1", B=batch, P=sum(p.numel() for p in model.parameters())
    )
    return model, x


# -- memory estimate vs measured ---------------------------------------------------------------
def _estimate(ctx: Context, key: str) -> Callable[[], object]:

    if key == "w6-gpt2-lora":
        model, x = workloads.gpt2_lora(ctx)
        fm = pf.FunctionalModel(model)
        cov = pf.Diagonal(torch.full((fm.num_params,), 1e-2, device=x.device))
        plan = pf.plan(fm, x, cov, strategy="monte_carlo", n_samples=100)
    else:
        w = workloads.build(ctx, key)
        fm, cov = pf.from_laplace(workloads.fit_laplace(ctx, w))
        x = w.x
        plan = pf.plan(fm, x, cov)
    plan.execute()  # one-time work (factorizations cached on the covariance)
    try:
        from pushforward.testing import peak_memory
    except ImportError:  # an older version: no allocator measurement
        allocated = None
    else:
        _, allocated = peak_memory(plan.execute, x.device)
    ctx.info.update(
        strategy=plan.name, estimated_bytes=plan.estimate.memory, allocator_peak_bytes=allocated
    )
    return plan.execute


for _key in ("w1-diag", "w1-kron", "w3-diag", "w4-diag", "w6-gpt2-lora"):
    register(
        f"estimate/{_key}",
        workload="estimate",
        method=f"{_key}: planner's plan; estimated peak vs measured",
        library="pushforward",
    )(partial(_estimate, key=_key))


# -- the planner's choice vs the fastest strategy ---------------------------------------------
def _problem(ctx: Context, name: str):
    """``(model, x, cov, plan keyword arguments)`` of a planner workload."""
    if name == "bo-mlp-joint":
        model, x = _bo_mlp(ctx, 200, 512)
        return model, x, _kron(model, ctx.seed), {"kind": "joint"}
    if name == "bo-mlp-groups":
        model, x = _bo_mlp(ctx, 200, 512)
        return model, x, _kron(model, ctx.seed), {"kind": "joint", "group_size": 4}
    if name == "bo-mlp-variance":
        model, x = _bo_mlp(ctx, 200, 512)
        return model, x, _kron(model, ctx.seed), {}
    key, kind = name.rsplit("-", 1)  # e.g. "w1-diag-covariance"
    w = workloads.build(ctx, key)
    fm, cov = pf.from_laplace(workloads.fit_laplace(ctx, w))
    return fm, w.x, cov, {"kind": kind}


def _planner(ctx: Context, name: str, strategy: str) -> Callable[[], object]:
    model, x, cov, kw = _problem(ctx, name)
    ctx.info["planner_choice"] = pf.plan(model, x, cov, **kw).name
    chosen = pf.plan(model, x, cov, strategy=strategy, **kw)
    ctx.info.update(strategy=strategy, estimated_flops=chosen.estimate.flops)
    return chosen.execute


PLANNER = {
    "bo-mlp-joint": ("structured", "reverse"),
    "bo-mlp-groups": ("structured", "reverse"),
    "bo-mlp-variance": ("structured", "reverse"),
    "w1-diag-variance": ("structured", "reverse"),
    "w1-kron-covariance": ("structured", "reverse"),
    "w4-diag-variance": ("structured", "reverse", "forward"),
}
for _name, _strategies in PLANNER.items():
    for _strategy in _strategies:
        register(
            f"planner/{_name}/{_strategy}",
            workload="planner",
            method=f"{_name}: strategy {_strategy!r}",
            library="pushforward",
        )(partial(_planner, name=_name, strategy=_strategy))


# -- per-call overhead of a cached plan ----------------------------------------------------------
def _overhead(ctx: Context, how: str) -> Callable[[], object]:
    model, x = _bo_mlp(ctx, 50, 12)
    cov = _kron(model, ctx.seed)
    kw = {"joint": "groups", "group_size": 4}
    try:
        pf.functional_covariance(model, x, cov, **kw)
    except (TypeError, ValueError):  # an older version without joint="groups": the full joint
        kw = {"joint": True}
    fm = pf.FunctionalModel(model)

    if how == "public-call":

        def run() -> object:
            for _ in range(OVERHEAD_CALLS):
                out = pf.functional_covariance(fm, x, cov, **kw)
            return out

        run()  # the plan is cached from here on
        return run
    plan = pf.plan(fm, x, cov, kind="joint", **({"group_size": 4} if "group_size" in kw else {}))
    ctx.info["strategy"] = plan.name
    strategy = _strategy_object(plan.name)
    problem, estimate = plan.problem, plan.estimate

    def bare() -> object:
        with torch.no_grad():
            for _ in range(OVERHEAD_CALLS):
                out = strategy.run(problem, estimate)
        return out

    return bare


def _strategy_object(name: str):
    try:
        from pushforward.engine.strategies import STRATEGIES

        return STRATEGIES[name]
    except ImportError:  # an older layout: registry of classes
        from pushforward.strategies import STRATEGIES

        return STRATEGIES[name]()


for _how in ("public-call", "strategy-run"):
    register(
        f"overhead/{_how}",
        workload="overhead",
        method=f"{OVERHEAD_CALLS} joint covariances within groups of 4, B=12, MLP 6-50-50-1, "
        + (
            "public functional_covariance (plan cached)"
            if _how == "public-call"
            else "the chosen strategy's run alone"
        ),
        library="pushforward",
    )(partial(_overhead, how=_how))


# -- joint covariance by reverse rows ----------------------------------------------------------
def _joint(ctx: Context, strategy: str, budget: str | None) -> Callable[[], object]:
    model, x = _bo_mlp(ctx, 200, 512)
    cov = _kron(model, ctx.seed)
    ctx.info["strategy"] = pf.plan(model, x, cov, kind="joint", strategy=strategy).name
    return partial(
        pf.functional_covariance, model, x, cov, joint=True, strategy=strategy, memory_budget=budget
    )


for _label, _strategy, _budget in (
    ("reverse-default-budget", "reverse", None),
    ("reverse-200MB", "reverse", "200MB"),
    ("auto", "auto", None),
):
    register(
        f"joint-reverse/{_label}",
        workload="joint-reverse",
        method=f"joint 512x512 covariance, MLP 6-200-200-1, Kronecker S, strategy {_strategy!r}"
        + (f", memory_budget={_budget}" if _budget else ""),
        library="pushforward",
    )(partial(_joint, strategy=_strategy, budget=_budget))
