"""Per-example results over a sharded evaluation set, gathered in dataset order.

:func:`evaluate` runs :func:`~pushforward.functional_variance`,
:func:`~pushforward.functional_covariance`, :func:`~pushforward.functional_samples` or
:func:`~pushforward.predictive` on every batch of this rank's shard (a ``DataLoader`` with a
``DistributedSampler``), then gathers the ranks' results to every rank (or to one) and puts
them in the order of the data set: example ``i`` of the result is ``dataset[i]``. The sampler's
order is recovered by iterating it again (deterministic for a ``DistributedSampler``, shuffled or
not, for a given epoch); the examples it repeats to pad the shards (``drop_last=False``) are
left out, so the result has one row per example of the data set.

Random draws (samples, ``link="mc"``, ``strategy="monte_carlo"``) need a ``generator``: rank 0's
state is broadcast and every batch starts from it, so the draws are the same weight-space
perturbations for every example of every rank — the samples are joint across the whole data set
and equal to one call on all of it with that generator. The generator is then advanced as such
a call would.

A joint covariance across all examples (``what="covariance", joint=True``) is ``A A^T`` with the
rows ``A = J L`` (``L`` the covariance's square-root factor, ``r`` columns) gathered from every
rank; when ``r`` exceeds the number of parameters ``P`` (e.g. a low rank plus a diagonal) the
Jacobian rows ``J`` are gathered instead and the result is ``J S J^T``. Both are pushed with
forward-mode JVPs (:mod:`pushforward.distributed.joint`); what the gathering and the
``(N K, N K)`` result need is checked against the memory budget first, on every rank alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from pushforward.api.predictive import RegressionPredictive, predictive
from pushforward.api.sampling import functional_samples
from pushforward.api.variance import functional_covariance, functional_variance
from pushforward.core.collectives import (
    AUTO,
    Group,
    broadcast_bytes,
    gather_rows,
    group_min,
    resolve_group,
)
from pushforward.core.cost import Budget
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.options import Options
from pushforward.core.shards import (
    distributed_sampler,
    real_examples,
    refuse_accelerate_shards,
    split_batch,
)
from pushforward.covariance.binding import bind_covariance
from pushforward.covariance.operator import CovarianceOperator
from pushforward.curvature.data import check_samplers_agree, refuse_on_every_rank
from pushforward.distributed.joint import joint_rows

__all__ = ["evaluate"]

WHATS = ("variance", "covariance", "samples", "predictive")


def evaluate(
    model: FunctionalModel | torch.nn.Module,
    loader: Iterable,
    cov: CovarianceOperator,
    what: str = "variance",
    *,
    root: int | None = None,
    process_group: Any = AUTO,
    target_key: str = "labels",
    **options: Any,
) -> Any:
    """``what`` over every example of a sharded data set, gathered in dataset order.

    Each rank computes its shard's batches; the results are gathered to every rank (or to
    ``root``) in the order of the data set — example ``i`` of the result is ``dataset[i]`` —
    without the examples a ``DistributedSampler`` repeats to pad its shards. Random draws
    (samples, ``link="mc"``, ``strategy="monte_carlo"``) start from rank 0's state of
    ``generator`` in every batch: the samples are joint across the whole data set, equal to one
    call on all of it, and the generator is advanced as that call would.

    Args:
        model: the replicated model (an ``nn.Module``, taken out of any DDP wrapper with
            ``.module``, or a :class:`~pushforward.FunctionalModel`).
        loader: this rank's shard: a ``DataLoader`` with a ``DistributedSampler`` of the group's
            size and rank (``drop_last=False``); batches are inputs ``x``, ``(x, y)`` pairs or
            mappings of keyword arguments (targets under ``target_key`` are left out). Without a
            process group, any re-iterable collection of batches (results in its order).
        cov: the weight-space covariance S.
        what: ``"variance"`` (:func:`~pushforward.functional_variance`), ``"covariance"``
            (:func:`~pushforward.functional_covariance`; ``joint=True`` across all examples),
            ``"samples"`` (:func:`~pushforward.functional_samples`; ``n_samples=`` and
            ``generator=`` required) or ``"predictive"`` (:func:`~pushforward.predictive`).
        root: ``None``: the result on every rank; a rank: there only (the others get ``None``).
        process_group: ``"auto"`` (the default group when ``torch.distributed`` is
            initialized with more than one process, else none), ``None`` (this process's
            batches only) or a ``ProcessGroup``.
        target_key: the targets' key in mapping batches.
        **options: the matching function's keyword arguments (``outputs=``, which is per
            batch, and ``joint="groups"`` are not supported).

    Returns:
        What the matching function returns for the whole data set: ``(f, var)``, ``(f, cov)``
        (``cov (N K, N K)`` with ``joint=True``), samples ``(n_samples, N, ...)``, or the
        predictive (probabilities ``(N, ...)`` or a :class:`~pushforward.RegressionPredictive`).
    """
    if what not in WHATS:
        raise ValueError(f"what must be one of {WHATS}, got {what!r}")
    if options.get("outputs") is not None:
        raise ValueError("evaluate does not take outputs= (an index per example of one batch)")
    if options.get("differentiable"):
        raise ValueError("evaluate gathers detached results: differentiable=True is not supported")
    fm = as_functional_model(model)
    group = resolve_group(process_group)
    if root is not None and (group is None or not 0 <= root < group.size):
        raise ValueError(f"root={root} is not a rank of the process group ({group})")
    order = _Order(loader, group)
    joint = what == "covariance" and options.get("joint", False)
    if joint not in (False, True):
        raise ValueError("evaluate supports joint=False or joint=True (not 'groups')")
    random = (
        what == "samples" or options.get("link") == "mc" or options.get("strategy") == "monte_carlo"
    )
    draws = _SharedDraws(options.get("generator"), group) if random else None
    compute, dims = _computation(fm, cov, what, options, draws)
    local: list[list[Tensor]] = []
    seen = 0
    with torch.no_grad():
        for batch in loader:
            parts = compute(_inputs(batch, target_key))
            seen += parts[0].shape[dims[0]]
            local.append(list(parts))
    if draws is not None:
        draws.finish()
    order.check_count(seen, group)
    if joint:
        return _joint(fm, cov, local, order, group, root, options)
    gathered = [order.gather([p[i] for p in local], dim, group, root) for i, dim in enumerate(dims)]
    if root is not None and group is not None and group.rank != root:
        return None
    return _assemble(what, gathered, options)


class _Order:
    """Where this rank's examples go in the data set, and which of them are real."""

    def __init__(self, loader: Iterable, group: Group | None) -> None:
        sampler = distributed_sampler(loader)
        size = 1 if group is None else group.size
        # refused on every rank at once: a rank raising alone would leave the others waiting
        problem: Exception | None = None
        try:
            if size > 1:
                refuse_accelerate_shards(loader)
        except TypeError as err:
            problem = err
        if problem is None and sampler is None and size > 1:
            problem = ValueError(
                "evaluate over several ranks needs a DataLoader with a DistributedSampler, whose "
                "order it can recover to put the results in dataset order (got "
                f"{type(loader).__name__} without one)"
            )
        if problem is None and sampler is not None and group is not None:
            if sampler.drop_last:
                problem = ValueError(
                    "the DistributedSampler drops examples (drop_last=True): the result would "
                    "miss some of the data set; use drop_last=False (its padding is left out)"
                )
            elif (sampler.num_replicas, sampler.rank) != (group.size, group.rank):
                problem = ValueError(
                    f"the DistributedSampler shards for rank {sampler.rank} of "
                    f"{sampler.num_replicas}, but this process is rank {group.rank} of "
                    f"{group.size} in the process group"
                )
        refuse_on_every_rank(problem, group)
        check_samplers_agree(sampler, group)
        self.sampler = sampler
        self.indices = None if sampler is None else torch.tensor(list(iter(sampler)))
        self.real = None if sampler is None else real_examples(sampler)
        self.total = None if sampler is None else len(sampler.dataset)  # type: ignore[arg-type]

    def check_count(self, seen: int, group: Group | None) -> None:
        """Every rank's loader yielded every example its sampler gave.

        Checked together: a rank that raised alone would leave the others waiting in the gather.
        """
        mine = self.indices is None or seen == len(self.indices)
        if not group_min(int(mine), group):
            raise ValueError(
                f"a loader yielded fewer or more examples than its sampler gives (this rank: "
                f"{seen} of {0 if self.indices is None else len(self.indices)}; "
                "DataLoader(drop_last=True)?): the results cannot be put in dataset order"
            )

    def result_count(self, local: int, group: Group | None) -> int:
        """Examples in the result, given ``local`` examples computed here."""
        if group is not None and self.total is not None:
            return self.total
        return local if self.real is None else min(self.real, local)

    def gather(
        self, parts: list[Tensor], dim: int, group: Group | None, root: int | None
    ) -> Tensor | None:
        """This rank's ``parts`` and the other ranks', in dataset order along ``dim``.

        ``parts`` are batches along ``dim``; the padding is left out.
        """
        local = torch.cat(parts, dim).movedim(dim, 0)
        if self.real is not None:
            local = local[: self.real]
        if group is None:
            return local.movedim(0, dim)
        rows = gather_rows(local, group, root)
        index = gather_rows(self.indices[: self.real].to(local.device), group, root)
        if rows is None or index is None:
            return None
        everything, where = torch.cat(rows), torch.cat(index)
        if not torch.equal(where.sort().values, torch.arange(self.total, device=where.device)):
            raise RuntimeError(
                "the ranks' samplers do not cover the data set exactly once (a sampler whose "
                "order is not reproducible, or different epochs on different ranks?)"
            )
        out = torch.empty_like(everything)
        out[where] = everything
        return out.movedim(0, dim)


def _inputs(batch: Any, target_key: str) -> Any:
    """The model inputs of an evaluation batch: ``x``, ``(x,)``, ``(x, y)`` or a mapping."""
    return split_batch(batch, target_key, targets=False)[0]


def _computation(
    fm: FunctionalModel, cov: CovarianceOperator, what: str, options: dict, draws: Any
) -> tuple[Callable[[Any], tuple[Tensor, ...]], tuple[int, ...]]:
    """The per-batch function and the example dimension of each tensor it returns."""
    if what == "covariance" and options.get("joint", False) is True:
        rest = {k: v for k, v in options.items() if k != "joint"}
        return (lambda x: joint_rows(fm, x, cov, **rest)), (0, 0)

    def kwargs() -> dict:
        return options if draws is None else {**options, "generator": draws.copy()}

    if what == "variance":
        return (lambda x: functional_variance(fm, x, cov, **kwargs())), (0, 0)
    if what == "covariance":
        return (lambda x: functional_covariance(fm, x, cov, **kwargs())), (0, 0)
    if what == "samples":
        if "n_samples" not in options:
            raise ValueError("what='samples' needs n_samples=...")
        return (lambda x: (functional_samples(fm, x, cov, **kwargs()),)), (1,)

    def predict(x: Any) -> tuple[Tensor, ...]:
        result = predictive(fm, x, cov, **kwargs())
        return tuple(result) if isinstance(result, RegressionPredictive) else (result,)

    regression = options.get("likelihood") == "regression"
    return predict, ((0, 0) if regression else (0,))


class _SharedDraws:
    """Generators in rank 0's state of the user's ``generator``, one per batch.

    Every batch draws the same perturbations; :meth:`finish` leaves the user's generator where one
    call on the whole data set would.
    """

    def __init__(self, generator: Any, group: Group | None) -> None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                "random draws over a sharded data set need generator=torch.Generator(...)"
                ".manual_seed(...): every batch of every rank must draw the same weight-space "
                "perturbations"
            )
        self.user = generator
        self.state = broadcast_bytes(generator.get_state(), group)
        self.last: torch.Generator | None = None

    def copy(self) -> torch.Generator:
        self.last = torch.Generator(device=self.user.device)
        self.last.set_state(self.state)
        return self.last

    def finish(self) -> None:
        if self.last is not None:
            self.user.set_state(self.last.get_state())


def _assemble(what: str, gathered: list[Tensor | None], options: dict) -> Any:
    if what in ("variance", "covariance"):
        return gathered[0], gathered[1]
    if what == "predictive" and options.get("likelihood") == "regression":
        return RegressionPredictive(gathered[0], gathered[1])
    return gathered[0]


def _joint(
    fm: FunctionalModel,
    cov: CovarianceOperator,
    local: list[list[Tensor]],
    order: _Order,
    group: Group | None,
    root: int | None,
    options: dict,
) -> tuple[Tensor, Tensor] | None:
    """``(f, J S J^T)`` across every example from the gathered rows (module docstring)."""
    f_parts = [p[0] for p in local]
    rows = torch.cat([p[1] for p in local]) if local else None  # (n, E, w)
    if rows is None:
        raise ValueError("evaluate: this rank's loader yielded no batch")
    n, E, w = rows.shape
    N = order.result_count(n, group)
    size = 1 if group is None else group.size
    itemsize = rows.element_size()
    mine = Options(memory_budget=options.get("memory_budget")).budget_bytes(rows.device)
    budget = Budget.of(group_min(mine, group), device=rows.device)
    gathered = (2 * N + size) * E * w  # the padded parts, their concatenation, the ordered rows
    extra = N * E * fm.num_params if w == fm.num_params and cov.sqrt_cols > w else 0
    budget.require(
        (gathered + (N * E) ** 2 + extra) * itemsize,
        f"a joint covariance across {N:,} examples x {E} outputs (gathering {w:,} "
        "square-root-factor columns per output)",
    )
    f = order.gather(f_parts, 0, group, root)
    A = order.gather([rows], 0, group, root)
    if f is None or A is None:
        return None
    A = A.reshape(N * E, w)
    if cov.sqrt_cols > w:  # A = J: J S J^T
        S = bind_covariance(fm, cov, A.dtype, A.device)
        return f, A @ S.matmul_rows(A).T
    return f, A @ A.T
