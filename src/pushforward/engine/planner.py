"""The strategy planner: estimate every applicable strategy, pick the cheapest that fits.

``plan(model, x, cov, ...)`` measures the model once per input signature (activation bytes and
FLOPs of a one-example forward), asks each strategy for its estimate (work, peak memory, chunk
size, and what it prepared) and picks the exact strategy with the least estimated work whose
memory fits the budget. ``print(plan)`` says which, why, and why each other strategy was
rejected.

Plans are immutable and self-contained: executing one runs exactly what was estimated. They are
cached per model (``settings.plan_cache``) under a key of everything a plan depends on — the
input shapes and static arguments, the kind of result and selected outputs' shape, the
covariance operator's identity and the versions of its tensors, the options and the settings —
so a repeated call (the inner loop of an acquisition optimizer) skips planning, tracing and
measuring and only rebinds its inputs.

Under ``strategy="auto"`` a strategy that fails at run time for a reason of the transform
machinery (an op without a batching rule or forward-mode derivative, an old-style
``autograd.Function``, a layer structure that does not hold for this batch) falls through to
the next one in the plan's order, with one :class:`~pushforward.PushforwardFallbackWarning`;
the plan remembers the failure and ``print(plan)`` shows it. A named strategy raises.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from pushforward.core.errors import MemoryBudgetError
from pushforward.core.fallback import Ladder, first_line
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.heap import settle_heap
from pushforward.core.inputs import Inputs
from pushforward.core.options import Options, check_generator
from pushforward.core.precision import HALF, check_overflow
from pushforward.core.settings import settings
from pushforward.core.units import format_bytes
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.problem import Kind, Problem
from pushforward.engine.strategies import STRATEGIES
from pushforward.engine.strategies.strategy import Estimate, NotApplicable

__all__ = ["Plan", "make_plan", "plan", "plan_problem"]


@dataclass(frozen=True)
class Plan:
    """The chosen strategy for one problem, with every alternative's estimate or rejection.

    Attributes:
        problem: what is computed.
        estimate: the chosen strategy's estimate (with what it prepared).
        candidates: every strategy's estimate, chosen first, then the fallback order.
        rejected: ``(strategy, reason)`` for the strategies that cannot compute the problem.
        named: the strategy was named by the caller (no fallback).
        checked: the call's examples were checked for interactions
            (:meth:`~pushforward.FunctionalModel.check_examples`); when not, a strategy that
            evaluates several examples together checks them before it runs.
        key: the plan-cache key (run-time failures are remembered under it).
    """

    problem: Problem
    estimate: Estimate
    candidates: tuple[Estimate, ...]
    rejected: tuple[tuple[str, str], ...] = ()
    named: bool = False
    key: Any = None
    checked: bool = True

    @property
    def name(self) -> str:
        """The chosen strategy's name (e.g. ``"structured"``, ``"reverse"``)."""
        return self.estimate.strategy

    @property
    def chunk_size(self) -> int:
        """The chosen strategy's chunk size (rows, tangents or samples per chunk)."""
        return self.estimate.chunk_size

    def fallbacks(self) -> list[Estimate]:
        """The strategies tried in order under ``auto``, as their estimates.

        The chosen one, then every other exact one that fits the budget, cheapest first (a
        named strategy: only itself).
        """
        if self.named:
            return [self.estimate]
        budget = self.problem.budget.total
        rest = [
            e for e in self.candidates if e is not self.estimate and e.exact and e.memory <= budget
        ]
        return [self.estimate, *sorted(rest, key=lambda e: e.flops)]

    def failures(self) -> dict[str, str]:
        """Strategies of this plan that failed at run time, with why."""
        return self._ladder().failures(self.problem.fm)

    def execute(self) -> tuple[Tensor, ...]:
        """Run the plan: ``(f, result)`` in the user's shapes.

        A Monte Carlo strategy adds the result's standard error: ``(f, result, stderr)``.
        """
        f, *results = self.run_canonical()
        return (f, *(self.problem.user_result(r) for r in results))

    def run_canonical(self) -> tuple[Tensor, ...]:
        """Run the plan: ``(f, result, ...)`` with the results in canonical layout.

        A strategy that fails for a reason of the transform machinery falls through to the next
        one in order (remembered per plan, shown by ``print(plan)``).
        """
        settle_heap()
        return self._ladder()(self.problem.fm)

    def _ladder(self) -> Ladder:
        """The plan's strategies in fallback order, as one ``Ladder``.

        Its memory of failures is the plan's: kept per plan key.
        """
        p = self.problem

        half = p.dtype in HALF or p.fm.dtype in HALF

        def run(est: Estimate):
            def strategy() -> tuple[Tensor, ...]:
                problem = p
                if not (self.checked or est.alone):
                    if est.strategy in _CHECKING_STRATEGIES:
                        problem = replace(p, check_chunks=True)
                    else:
                        p.fm.check_examples(p.inputs)
                with torch.set_grad_enabled(p.differentiable):
                    out = STRATEGIES[est.strategy].run(problem, est)
                if half:
                    check_overflow(out[0], out[1], f"the {est.strategy} strategy")
                return out

            return strategy

        methods = [(e.strategy, run(e)) for e in self.fallbacks()]
        scope = self.key if self.key is not None else id(self)
        return Ladder("strategy", methods, scope=scope, message=_fallback_message)

    def with_call(
        self,
        inputs: Inputs,
        outputs: Tensor | None,
        generator: torch.Generator | None,
        checked: bool = True,
    ) -> Plan:
        """This plan for another call with the same signature (cache hit).

        Args:
            inputs: the call's inputs.
            outputs: the call's selected outputs, or ``None``.
            generator: the call's ``torch.Generator`` for a Monte Carlo strategy, or ``None``.
            checked: the call's examples were checked (see the ``checked`` attribute).

        Returns:
            A :class:`Plan` with the same strategy and estimates, for the new call's problem.
        """
        problem = self.problem.with_call(inputs, outputs, generator)
        return replace(self, problem=problem, checked=checked)

    def __str__(self) -> str:
        p = self.problem
        lines = [
            f"Plan: {p.describe()}",
            f"  {p.budget.describe()}; settings: {settings.current().describe()}",
            f"  -> {self.estimate.summary()}",
        ]
        failed = self.failures()
        others = [e for e in self.candidates if e is not self.estimate]
        if others or self.rejected:
            lines.append("  not chosen:")
        for e in others:
            why = "over the memory budget" if e.memory > p.budget.total else "more work"
            if why == "more work" and e.flops == self.estimate.flops:
                why = "same work"
            if not e.exact:
                why = "not exact (Monte Carlo); ask for it by name"
            lines.append(f"    {e.summary()}  [{why}]")
        for n, reason in self.rejected:
            lines.append(f"    {n}: not applicable: {reason}")
        order = [e.strategy for e in self.fallbacks()]
        if len(order) > 1:
            lines.append(f"  fallback order: {' -> '.join(order)}")
        for n, reason in failed.items():
            lines.append(f"  failed at run time: {n} ({reason}); the next one in order ran")
        return "\n".join(lines)

    __repr__ = __str__


#: Strategies that check the examples they run together against their own forward
#: (``Problem.check_chunks``) instead of a forward of the batch for the check alone.
_CHECKING_STRATEGIES = frozenset({"structured", "last_layer"})


def _fallback_message(failures, used: str, inner: list[str]) -> str:
    """A plan's fall-through, in words: the first failed strategy and why, the one that ran."""
    failed, error = failures[0]
    extra = f" (inside it, {'; '.join(inner)})" if inner else ""
    return (
        f"pushforward: strategy {failed!r} failed for this model ({type(error).__name__}: "
        f"{first_line(error)}); fell back to {used!r} (exact){extra}. print(plan) shows the plan "
        "and the failure."
    )


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
    chunk_size: int | None = None,
    group_size: int | None = None,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Plan:
    """Choose how to compute ``J S J^T`` for ``model`` at ``x``.

    Args:
        model: a :class:`~pushforward.FunctionalModel` or an ``nn.Module`` (trainable
            parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.CovarianceOperator`.
        kind: ``"variance"`` (per-example diagonal), ``"covariance"`` (per-example K x K) or
            ``"joint"`` (across examples: the whole batch, or within groups of ``group_size``
            consecutive examples).
        outputs: optional integer index tensor ``(*example_dims, S)`` selecting S outputs per
            example, as in :func:`~pushforward.functional_variance`.
        strategy: ``"auto"`` or a strategy name (``structured``, ``reverse``, ``forward``,
            ``explicit``, ``monte_carlo``; ``last_layer`` is ``structured``'s one-forward case for
            a posterior on the linear head); a named strategy
            that cannot handle the problem raises ``ValueError`` saying why.
        memory_budget: bytes or a string like ``"2GB"`` bounding what the call allocates (see
            :class:`~pushforward.Options`).
        differentiable: keep the graph when the plan runs: gradients flow to ``x``, the
            model's parameters and the covariance's tensors.
        progress: show a tqdm bar over chunks when the plan runs.
        chunk_size: at most this many rows/tangents/samples per chunk.
        group_size: ``kind="joint"``: consecutive examples per group (default: the whole
            batch).
        n_samples: samples drawn by a Monte Carlo strategy (``monte_carlo``; default 100).
        generator: ``torch.Generator`` for a Monte Carlo strategy's draws.

    Returns:
        A :class:`Plan`; ``print(plan)`` explains the choice, ``plan.execute()`` runs it.
    """
    options = Options(
        strategy=strategy,
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    return make_plan(
        model,
        x,
        cov,
        kind,
        options,
        outputs=outputs,
        group_size=group_size,
        n_samples=n_samples,
        generator=generator,
    )


def make_plan(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    kind: Kind,
    options: Options,
    *,
    outputs: Tensor | None = None,
    group_size: int | None = None,
    n_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Plan:
    """:func:`plan` with the options as one value; reuses a cached plan when one fits."""
    fm = as_functional_model(model)
    inputs = fm.prepare(x, check=False)  # checked below, or by the strategy that runs
    check_generator(generator, inputs.device)
    if not isinstance(cov, CovarianceOperator):
        raise TypeError(f"cov must be a pushforward covariance operator, got {type(cov).__name__}")
    current = settings.current()
    key = (
        kind,
        inputs.signature(with_batch=True),
        None if outputs is None else tuple(getattr(outputs, "shape", ())),
        id(cov),
        cov.version(),
        options,
        group_size,
        n_samples,
        current,
    )
    cache = fm.cache.plans
    entry = cache.get(key) if current.plan_cache else None
    hit = entry is not None and entry[0]() is cov  # ids of freed objects are reused: check it
    checked = not (hit and fm.checked_before(inputs))
    if checked:  # a signature's first call, or a new plan: before the problem is traced on them
        fm.check_examples(inputs)
    if hit:
        with contextlib.suppress(KeyError):  # another thread may have just dropped it
            cache.move_to_end(key)
        return entry[1].with_call(inputs, outputs, generator, checked=checked)
    problem = Problem.build(
        fm,
        inputs,
        cov,
        kind,
        options,
        outputs=outputs,
        group_size=group_size,
        n_samples=n_samples,
        generator=generator,
    )
    chosen = replace(plan_problem(problem, options.strategy), key=key)
    if current.plan_cache:
        cache[key] = (weakref.ref(cov), chosen)
        with contextlib.suppress(KeyError):  # another thread may be trimming too
            while len(cache) > current.plan_cache:
                cache.popitem(last=False)
    return chosen


def plan_problem(problem: Problem, strategy: str = "auto", exclude: tuple[str, ...] = ()) -> Plan:
    """The plan for a built :class:`Problem` (strategies in ``exclude`` are not considered)."""
    if strategy != "auto":
        if strategy not in STRATEGIES:
            names = ["auto", *STRATEGIES]
            raise ValueError(f"unknown strategy {strategy!r}; choose from {names}")
        try:
            est = STRATEGIES[strategy].estimate(problem, _subplan)
        except NotApplicable as err:
            raise ValueError(f"strategy {strategy!r} cannot compute this problem: {err}") from None
        problem.budget.require(est.memory, f"strategy {strategy!r}")
        return Plan(problem, est, (est,), named=True)
    candidates: list[Estimate] = []
    rejected: list[tuple[str, str]] = []
    for name, strat in STRATEGIES.items():
        if name in exclude:
            continue
        try:
            candidates.append(strat.estimate(problem, _subplan))
        except NotApplicable as err:
            rejected.append((name, str(err)))
    exact = [e for e in candidates if e.exact]
    fitting = [e for e in exact if e.memory <= problem.budget.total]
    if not fitting:
        need = min((e.memory for e in exact), default=0)
        raise MemoryBudgetError(
            f"no exact strategy fits the memory budget of {format_bytes(problem.budget.total)} "
            f"(the smallest needs about {format_bytes(need)}); raise memory_budget",
            problem.budget.total,
            need,
        )
    best = min(fitting, key=lambda e: e.flops)
    ordered = [best, *[e for e in candidates if e is not best]]
    return Plan(problem, best, tuple(ordered), tuple(rejected))


def _subplan(problem: Problem, exclude: tuple[str, ...]) -> Plan:
    return plan_problem(problem, "auto", exclude)
