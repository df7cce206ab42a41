"""The strategy planner: estimate every applicable strategy, pick the cheapest that fits.

``plan(model, x, cov, ...)`` measures the model once (activation bytes and FLOPs of a one-example
forward), asks each strategy for its estimate (passes, FLOPs, peak working memory, chunk size)
and picks the exact strategy with the fewest estimated FLOPs whose memory fits the budget.
``print(plan)`` says which, why, and why each other strategy was rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pushforward.core.budget import format_bytes
from pushforward.core.functional_model import FunctionalModel
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.problem import Kind, Problem
from pushforward.engine.strategies import STRATEGIES
from pushforward.engine.strategies.strategy import Estimate, NotApplicable, Strategy

__all__ = ["Plan", "plan", "plan_problem"]


@dataclass
class Plan:
    """The chosen strategy for one problem, with every alternative's estimate or rejection."""

    problem: Problem
    strategy: Strategy
    estimate: Estimate
    candidates: dict[str, Estimate] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def chunk_size(self) -> int:
        return self.estimate.chunk_size

    def execute(self) -> tuple[Tensor, Tensor]:
        """Run the chosen strategy: ``(f, result)`` in the user's shapes."""
        f, result = self.run_canonical()
        return f, self.problem.user_result(result)

    def run_canonical(self) -> tuple[Tensor, Tensor]:
        """Run the chosen strategy: ``(f, result)`` with the result in canonical layout."""
        p = self.problem
        with torch.set_grad_enabled(p.differentiable):
            if not p.differentiable:
                p.inputs = p.inputs.detach()
            return self.strategy.run(p, self.estimate)

    def __str__(self) -> str:
        p = self.problem
        lines = [
            f"Plan: {p.describe()}",
            f"  memory budget {format_bytes(p.budget)}",
            f"  -> {self.estimate.summary()}",
        ]
        others = [e for n, e in self.candidates.items() if n != self.name]
        if others or self.rejected:
            lines.append("  not chosen:")
        for e in others:
            why = "over the memory budget" if e.memory > p.budget else "more work"
            if not e.exact:
                why = "not exact (Monte Carlo); ask for it by name"
            lines.append(f"    {e.summary()}  [{why}]")
        for n, reason in self.rejected.items():
            lines.append(f"    {n}: not applicable: {reason}")
        return "\n".join(lines)

    __repr__ = __str__


def plan(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    *,
    kind: Kind = "variance",
    outputs: Tensor | None = None,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Plan:
    """Choose how to compute ``J S J^T`` for ``model`` at ``x``.

    Args:
        kind: ``"variance"`` (per-example diagonal), ``"covariance"`` (per-example K x K) or
            ``"joint"`` (across all examples).
        strategy: ``"auto"`` or a strategy name (``explicit``, ``reverse``, ``forward``,
            ``last_layer``, ...); a named strategy that cannot handle the problem raises
            ``ValueError`` saying why.
        n_samples: samples drawn by a Monte Carlo strategy (``monte_carlo``; default 100).
        generator: ``torch.Generator`` for a Monte Carlo strategy's draws.

    Returns:
        A :class:`Plan`; ``print(plan)`` explains the choice, ``plan.execute()`` runs it.
    """
    problem = Problem.build(
        model, x, cov, kind, outputs, memory_budget, differentiable, progress, n_samples, generator
    )
    return plan_problem(problem, strategy)


def plan_problem(problem: Problem, strategy: str = "auto", exclude: tuple[str, ...] = ()) -> Plan:
    """:func:`plan` for a built :class:`Problem` (strategies in ``exclude`` are not considered)."""
    if strategy != "auto":
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {['auto', *STRATEGIES]}")
        chosen = STRATEGIES[strategy]()
        try:
            est = chosen.estimate(problem)
        except NotApplicable as err:
            raise ValueError(f"strategy {strategy!r} cannot compute this problem: {err}") from None
        if est.memory > problem.budget:
            raise ValueError(
                f"strategy {strategy!r} needs about {format_bytes(est.memory)} even with its "
                f"smallest chunks, over the memory budget of {format_bytes(problem.budget)}; "
                "raise memory_budget or use strategy='auto'"
            )
        return Plan(problem, chosen, est, {strategy: est})
    candidates: dict[str, Estimate] = {}
    rejected: dict[str, str] = {}
    for name, cls in STRATEGIES.items():
        if name in exclude:
            continue
        try:
            candidates[name] = cls().estimate(problem)
        except NotApplicable as err:
            rejected[name] = str(err)
    fitting = [e for e in candidates.values() if e.exact and e.memory <= problem.budget]
    if not fitting:
        need = min((e.memory for e in candidates.values() if e.exact), default=0)
        raise MemoryError(
            f"no exact strategy fits the memory budget of {format_bytes(problem.budget)} "
            f"(the smallest needs about {format_bytes(need)}); raise memory_budget"
        )
    best = min(fitting, key=lambda e: e.flops)
    return Plan(problem, STRATEGIES[best.strategy](), best, candidates, rejected)
