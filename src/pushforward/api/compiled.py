"""``compile``: a functional variance or covariance captured for repeated calls."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from pushforward.core.functional_model import FunctionalModel
from pushforward.core.options import Options
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine import Compiled

__all__ = ["compile"]

WHATS = ("variance", "covariance", "joint")


def compile(
    model: FunctionalModel | torch.nn.Module,
    cov: CovarianceOperator,
    x: Any,
    *,
    what: Literal["variance", "covariance", "joint"] = "variance",
    outputs: Tensor | None = None,
    group_size: int | None = None,
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    chunk_size: int | None = None,
) -> Compiled:
    """Capture ``functional_variance`` (``what="variance"``), ``functional_covariance``
    (``"covariance"``: per example) or the joint covariance (``"joint"``, within groups of
    ``group_size``) of ``model`` and ``cov`` for repeated calls on inputs like ``x``.

    The model is checked, the plan made and a program captured now (see
    :mod:`pushforward.engine.replay`): ``compiled(x)`` then runs just the program — for a plain
    chain of linear layers and activations, the hand-differentiated chain and the layers' closed
    forms. Inputs of another
    signature, a covariance changed in place or a replaced parameter capture a new program.

    Args:
        model, cov, x: as for :func:`~pushforward.functional_variance` (``x``: example inputs
            with the batch size and shapes of the calls to come).
        what: which result.
        outputs: selected outputs (as in ``functional_variance``), the same at every call.
        group_size: ``what="joint"``: batch elements per group (default: the whole batch).
        strategy, memory_budget, chunk_size: see :class:`~pushforward.Options`.

    Returns:
        A :class:`~pushforward.engine.Compiled`; ``compiled(x)`` returns ``(f, var)`` or
        ``(f, cov)`` as the matching function does (detached: for gradients call the functions
        themselves, whose plans are cached too).

    Example:
        >>> import torch, pushforward as pf
        >>> model = torch.nn.Sequential(torch.nn.Linear(6, 50), torch.nn.Tanh(),
        ...                             torch.nn.Linear(50, 1)).eval()
        >>> fm = pf.FunctionalModel(model)
        >>> S = pf.Diagonal(torch.full((fm.num_params,), 1e-2))
        >>> variance = pf.compile(fm, S, torch.rand(10, 6))
        >>> f, var = variance(torch.rand(10, 6))
    """
    if what not in WHATS:
        raise ValueError(f"what must be one of {list(WHATS)}, got {what!r}")
    options = Options(strategy=strategy, memory_budget=memory_budget, chunk_size=chunk_size)
    return Compiled(
        model,
        cov,
        x,
        kind=what,
        outputs=outputs,
        group_size=group_size,
        options=options,
    )
