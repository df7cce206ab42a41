"""Convert a fitted laplace-torch (0.3) Laplace approximation to a FunctionalModel and covariance.

laplace-torch is imported only inside :func:`from_laplace`, so ``import pushforward`` never
needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pushforward.core.functional_model import FunctionalModel
from pushforward.covariance.dense import Dense
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.kronecker import Kronecker
from pushforward.covariance.lowrank_precision import LowRankPrecision
from pushforward.covariance.operator import CovarianceOperator
from pushforward.covariance.subset import Subset

__all__ = ["from_laplace"]


def from_laplace(
    la: Any,
    model: nn.Module | None = None,
    *,
    output_dims: int = 1,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> tuple[FunctionalModel, CovarianceOperator]:
    """The model and posterior covariance of a fitted laplace-torch Laplace approximation.

    Args:
        la: a fitted ``FullLaplace``, ``DiagLaplace``, ``KronLaplace``, ``LowRankLaplace``,
            ``FullLLLaplace``, ``DiagLLLaplace``, ``KronLLLaplace``, ``FullSubnetLaplace`` or
            ``DiagSubnetLaplace`` (frozen parameters, ``requires_grad=False``, are left out as
            laplace-torch leaves them out), or a laplace-bayesopt ``LaplaceBoTorch`` (its
            ``bnn``).
        model: the module to wrap instead of laplace-torch's (its parameter names and shapes
            must match). Last-layer Laplace deep-copies the model at construction, so by default
            the :class:`~pushforward.FunctionalModel` wraps that copy, ``la.model.model``; pass
            your own module to wrap it instead.
        output_dims: how many trailing dimensions of the output form one output vector, as for
            :class:`~pushforward.FunctionalModel`.
        output_fn: maps the model's return value to the output tensor, as for
            :class:`~pushforward.FunctionalModel`.

    Returns:
        ``(fm, cov)``: ``fm`` selects exactly laplace-torch's parameters in its order (its flat
        vector equals ``parameters_to_vector`` of them; for last-layer Laplace the last layer of
        the unwrapped model), and ``cov``, bound to ``fm.layout``, is laplace-torch's posterior
        covariance with its prior precision (scalar, per-layer or diagonal), observation noise
        and temperature applied by laplace-torch itself:

        * Full: :class:`~pushforward.Dense` from laplace-torch's ``posterior_scale``
          (Σ = L L^T, exactly its ``posterior_covariance``);
        * Diag: :class:`~pushforward.Diagonal` of its ``posterior_variance``;
        * Kron: :class:`~pushforward.Kronecker` of its ``posterior_precision``
          (``KronDecomposed``), blocks as ``KroneckerEigen`` per weight and dense per bias.
          laplace-torch 0.3 builds ``posterior_precision`` with ``damping=False`` even for
          ``damping=True`` (its ``*`` and ``+`` drop the flag), and so do its predictions; this
          conversion follows it;
        * LowRank: :class:`~pushforward.LowRankPrecision` of its ``posterior_precision``
          ``((U, eigvals), prior_precision_diag)``;
        * Subnet: the tensors containing subnetwork indices are selected, and the sub-covariance
          (Full: :class:`~pushforward.Dense`, Diag: :class:`~pushforward.Diagonal`, in the order
          of ``subnetwork_indices``) is embedded by :class:`~pushforward.Subset` (zero
          elsewhere).
    """
    from laplace.baselaplace import (
        DiagLaplace,
        FullLaplace,
        KronLaplace,
        LowRankLaplace,
        ParametricLaplace,
    )
    from laplace.lllaplace import LLLaplace
    from laplace.subnetlaplace import SubnetLaplace

    if not isinstance(la, ParametricLaplace) and isinstance(
        getattr(la, "bnn", None), ParametricLaplace
    ):
        la = la.bnn  # laplace-bayesopt's LaplaceBoTorch: its fitted Laplace approximation
    if not isinstance(la, ParametricLaplace):
        raise TypeError(
            "from_laplace converts laplace-torch's weight-space Laplace approximations (Full, "
            "Diag, Kron, LowRank; all weights, last layer, subnetwork or trainable subset); got "
            f"{type(la).__name__}"
        )
    _check_fitted(la, LLLaplace, KronLaplace)
    if isinstance(la, LLLaplace):
        source, params = la.model.model, list(la.model.last_layer.parameters())
    else:
        source, params = la.model, list(la.params)
    names = _names_of(source, params)
    module = source if model is None else _check_same_parameters(model, source, names)

    if isinstance(la, SubnetLaplace):
        indices = la.backend.subnetwork_indices
        names, local = _subnet_selection(names, [p.numel() for p in params], indices)
        if isinstance(la, FullLaplace):
            inner: CovarianceOperator = Dense.from_cholesky(la.posterior_scale)
        elif isinstance(la, DiagLaplace):
            inner = Diagonal(la.posterior_variance)
        else:
            raise TypeError(f"unsupported subnetwork Laplace class {type(la).__name__}")
        fm = _functional_model(module, names, output_dims, output_fn)
        cov: CovarianceOperator = Subset(inner, local.to(inner.device), fm.num_params)
    else:
        fm = _functional_model(module, names, output_dims, output_fn)
        if isinstance(la, FullLaplace):
            cov = Dense.from_cholesky(la.posterior_scale)
        elif isinstance(la, DiagLaplace):
            cov = Diagonal(la.posterior_variance)
        elif isinstance(la, KronLaplace):
            cov = Kronecker.from_kron_decomposed(la.posterior_precision)
        elif isinstance(la, LowRankLaplace):
            (U, eigvals), prior_diag = la.posterior_precision
            cov = LowRankPrecision(U, eigvals, prior_diag)
        else:
            raise TypeError(f"unsupported laplace-torch class {type(la).__name__}")
    return fm, cov.bind(fm.layout)


def _check_fitted(la: Any, ll_class: type, kron_class: type) -> None:
    unfitted = (
        (isinstance(la, ll_class) and la.model.last_layer is None)
        or (isinstance(la, kron_class) and la.H_facs is None)
        or getattr(la, "H", None) is None
    )
    if unfitted:
        raise ValueError(f"{type(la).__name__} is not fitted; call la.fit(train_loader) first")


def _names_of(module: nn.Module, params: Sequence[Tensor]) -> tuple[str, ...]:
    """The names (``named_parameters``, tied parameters under their first name) of ``params``."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"laplace-torch's parameters {missing} are not parameters of its model")
    return tuple(by_id[id(p)] for p in params)


def _check_same_parameters(model: nn.Module, source: nn.Module, names: Sequence[str]) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    theirs = dict(source.named_parameters())
    ours = dict(model.named_parameters())
    for n in names:
        if n not in ours:
            raise ValueError(
                f"model has no parameter {n!r}, which laplace-torch's posterior is over"
            )
        if ours[n].shape != theirs[n].shape:
            raise ValueError(
                f"model's parameter {n!r} has shape {tuple(ours[n].shape)}, laplace-torch's has "
                f"{tuple(theirs[n].shape)}"
            )
    return model


def _functional_model(
    module: nn.Module,
    names: Sequence[str],
    output_dims: int,
    output_fn: Callable[[Any], Tensor] | None,
) -> FunctionalModel:
    fm = FunctionalModel(module, params=list(names), output_dims=output_dims, output_fn=output_fn)
    if fm.param_names != tuple(names):
        raise ValueError(
            f"laplace-torch orders its parameters {list(names)}, which is not the model's "
            f"named_parameters() order {list(fm.param_names)}; this layout is not supported"
        )
    return fm


def _subnet_selection(
    names: Sequence[str], sizes: Sequence[int], indices: Tensor
) -> tuple[tuple[str, ...], Tensor]:
    """The parameter tensors holding subnetwork ``indices``, and the indices' positions in them.

    ``indices`` are flat indices over ``names``; the positions are in the flat vector of the
    selected tensors alone.
    """
    indices = indices.to("cpu", torch.int64)
    sizes_t = torch.tensor(list(sizes), dtype=torch.int64)
    starts = sizes_t.cumsum(0) - sizes_t
    owner = torch.searchsorted(sizes_t.cumsum(0), indices, right=True)
    kept = owner.unique()
    new_starts = torch.zeros_like(sizes_t)
    new_starts[kept] = sizes_t[kept].cumsum(0) - sizes_t[kept]
    local = indices - starts[owner] + new_starts[owner]
    return tuple(names[i] for i in kept.tolist()), local
