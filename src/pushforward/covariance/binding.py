"""A covariance operator bound to a model.

Checked against its parameter layout, in its dtype and on its device, remembered per operator
and version.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from pushforward.core.functional_model import FunctionalModel
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["bind_covariance"]


def bind_covariance(
    fm: FunctionalModel, cov: Any, dtype: torch.dtype, device: torch.device
) -> CovarianceOperator:
    """``cov`` checked against ``fm``'s parameter layout and cast to ``dtype`` on ``device``.

    The bound operator is remembered per (operator, version) in ``fm.cache`` unless the cast
    would be recorded by autograd (a cached graph could be used once only).
    """
    if not isinstance(cov, CovarianceOperator):
        raise TypeError(f"cov must be a pushforward covariance operator, got {type(cov).__name__}")
    key = (id(cov), dtype, device)
    version = cov.version()
    found = fm.cache.bound.get(key)
    if found is not None and found[0]() is cov and found[1] == version:
        return found[2]
    bound = cov.bind(fm.layout)
    recorded = False
    if bound.dtype != dtype or bound.device != device:
        recorded = torch.is_grad_enabled() and any(t.requires_grad for t in bound.tensors())
        bound = bound.to(dtype=dtype, device=device)  # differentiable, like Tensor.to
    if not recorded:
        fm.cache.bound[key] = (weakref.ref(cov), version, bound)
    return bound
