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
    """Capture a functional variance or covariance of ``model`` and ``cov`` for repeated calls.

    ``what`` picks :func:`~pushforward.functional_variance` (``"variance"``),
    :func:`~pushforward.functional_covariance` per example (``"covariance"``) or the joint
    covariance within groups of ``group_size`` batch elements (``"joint"``), for repeated calls
    on inputs like ``x``.

    The model is checked, the plan made and a program captured now (see
    ``pushforward.engine.replay``): ``compiled(x)`` then runs just the program — for a plain
    chain of linear layers and activations, the hand-differentiated chain and the layers' closed
    forms; otherwise the captured plan, without the per-call checks and plan lookup. Inputs of
    another signature (shapes, dtypes, device), a covariance changed in place or a replaced
    parameter capture a new program. The program runs eagerly on every device (no CUDA graph
    capture).

    Args:
        model: a :class:`~pushforward.FunctionalModel` or an ``nn.Module``, as for
            :func:`~pushforward.functional_variance`.
        cov: the weight-space covariance S, a :class:`~pushforward.CovarianceOperator`.
        x: example inputs with the batch size and shapes of the calls to come (tensor, tuple
            of tensors or mapping of keyword arguments).
        what: which result: ``"variance"``, ``"covariance"`` or ``"joint"``.
        outputs: selected outputs (as in ``functional_variance``), the same at every call.
        group_size: ``what="joint"``: batch elements per group (default: the whole batch).
        strategy: as for :func:`~pushforward.functional_variance` (see
            :class:`~pushforward.Options`).
        memory_budget: bytes or a string like ``"2GB"`` (see :class:`~pushforward.Options`).
        chunk_size: at most this many rows/tangents per chunk (see
            :class:`~pushforward.Options`).

    Returns:
        A ``Compiled`` callable: ``compiled(x)`` returns ``(f, var)`` or ``(f, cov)`` as the
        matching function does (detached: for gradients call the functions themselves, whose
        plans are cached too); ``compiled.plan`` is the plan it was captured from.

    Raises:
        ValueError: ``what`` is not one of the three.

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
