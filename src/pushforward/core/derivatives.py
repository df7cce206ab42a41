"""Whether PyTorch's forward and reverse modes agree on a model's derivatives.

The strategies of this library differentiate the model both ways: forward mode
(``torch.func.jvp``, a Jacobian-vector product per direction) and reverse mode
(``torch.func.vjp`` and autograd, one product per output row). The two can disagree on the same
forward. ``torch.no_grad()`` hides a computation from reverse mode, which treats its result as a
constant, while forward mode differentiates straight through it; a custom
``torch.autograd.Function`` may define its two formulas inconsistently. On such a model the
strategies would give different answers, each silently.

:func:`may_block_derivatives` looks for the signs cheaply, in one forward with gradients: an
operation run with gradients disabled on a value that requires them (``torch.no_grad``, and the
forward of every custom ``autograd.Function``), or an output that requires none.

:func:`check_derivatives` runs the adjoint test on one example: for a pseudo-random tangent ``v``
of the parameters, forward mode gives ``u = J v``, reverse mode ``J^T u``, and ``<u, u>`` must
equal ``<J^T u, v>`` up to rounding. A part of the output that reverse mode cannot see
(``torch.no_grad``) leaves out its share of ``<u, u>`` whatever ``v`` is. ``.detach()`` is a
constant to both modes and passes. :class:`~pushforward.FunctionalModel` runs the test once per
input signature, beside its first check of the examples, where the forward shows a sign.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.func import jvp
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pushforward.core.errors import InconsistentDerivativesError
from pushforward.core.kernels import transform_kernels

__all__ = ["METADATA_CALLS", "check_derivatives", "may_block_derivatives"]

#: Relative disagreement tolerated, in units of the square root of the output dtype's epsilon
#: (about 3e-3 in float32, 1.5e-7 in float64): rounding stays far below it, a part of the output
#: reverse mode cannot see is a share of ``<J v, J v>`` of order one.
_TOLERANCE = 10.0


#: Calls that read a tensor's metadata only (not a use of its values), as a torch function mode
#: sees them.
METADATA_CALLS = frozenset(
    {
        torch.Tensor.dim,
        torch.Tensor.size,
        torch.Tensor.numel,
        torch.Tensor.is_floating_point,
        torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
        torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
        torch.Tensor.device.__get__,  # type: ignore[attr-defined]
        torch.Tensor.ndim.__get__,  # type: ignore[attr-defined]
        torch.Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    }
)
#: Calls that block no derivative the two modes could disagree on: metadata reads, and
#: ``detach`` (a constant to both modes).
_NO_SIGN = METADATA_CALLS | {torch.Tensor.detach}


class _BlockedUses(TorchFunctionMode):
    """Notes whether an operation ran with gradients disabled on a value that requires them."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.found and not torch.is_grad_enabled() and func not in _NO_SIGN:
            self.found = _floating(out, False) and _floating((args, kwargs), True)
        return out


def _floating(tree, requiring_grad: bool) -> bool:
    return any(
        isinstance(t, Tensor) and t.is_floating_point() and (t.requires_grad or not requiring_grad)
        for t in tree_flatten(tree)[0]
    )


def may_block_derivatives(forward: Callable[[], Tensor], params: Mapping[str, Tensor]) -> bool:
    """Whether ``forward()`` shows a sign of derivatives the two modes may disagree on.

    ``forward`` runs the model (its own parameters ``params``, the posterior's) once, with
    gradients enabled. A sign is an operation run with gradients disabled on a value requiring
    them, or a floating-point output requiring none. Where a posterior parameter does not require
    gradients in the module (selected explicitly while frozen) the forward cannot tell what is
    done with it, which counts as a sign too.
    """
    if not all(p.requires_grad for p in params.values()):
        return True
    uses = _BlockedUses()
    with torch.enable_grad(), uses:
        out = forward()
    return uses.found or (
        isinstance(out, Tensor) and out.is_floating_point() and not out.requires_grad
    )


def _pullback(
    call: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], cotangent: Tensor
) -> dict[str, Tensor]:
    """``J^T cotangent`` by reverse mode (autograd), zero for what the output does not reach.

    An output without a derivative (detached, or made under ``torch.no_grad``) depends on nothing
    to reverse mode: every entry is zero.
    """
    leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
    out = call(leaves)
    if out.grad_fn is None:
        return {}
    grads = torch.autograd.grad(out, list(leaves.values()), cotangent, allow_unused=True)
    return {k: g for k, g in zip(leaves, grads, strict=True) if g is not None}


def check_derivatives(
    call: Callable[[dict[str, Tensor]], Tensor], params: Mapping[str, Tensor]
) -> None:
    """Raise :class:`~pushforward.InconsistentDerivativesError` when the two modes disagree.

    Args:
        call: the model on one example as a function of its parameters (outputs of any shape).
        params: the parameters at which the model is linearized.

    The test (module docstring) is skipped where it cannot decide: no parameters, outputs that
    are not float32 or float64 (half-precision rounding is as large as the effect), or a mode
    that cannot run on this model (the strategies that need it fall back).
    """
    if not params:
        return
    params = dict(params)
    g = torch.Generator().manual_seed(0)
    v = {
        k: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
        for k, p in params.items()
    }
    try:
        with torch.enable_grad(), transform_kernels(safe_attention=True):
            out, u = jvp(call, (params,), (v,))
            if out.dtype not in (torch.float32, torch.float64):
                return
            pulled = _pullback(call, params, u.detach())
    except (RuntimeError, NotImplementedError, TypeError):
        return
    forward = float(u.double().square().sum())
    reverse = float(sum((g.double() * v[k].double()).sum() for k, g in pulled.items()))
    scale = max(abs(forward), abs(reverse))
    if not math.isfinite(scale) or scale == 0.0:
        return
    if abs(forward - reverse) > _TOLERANCE * math.sqrt(torch.finfo(out.dtype).eps) * scale:
        raise InconsistentDerivativesError(
            "forward-mode and reverse-mode derivatives of the model disagree on one example: "
            f"<J v, J v> = {forward:.6g} by forward mode (torch.func.jvp), <J^T (J v), v> = "
            f"{reverse:.6g} by reverse mode (autograd), for a random tangent v of the "
            "posterior parameters. Typically the forward computes something from them inside "
            "torch.no_grad(): reverse mode treats it as a constant, forward mode differentiates "
            "through it, so different strategies would give different answers. Compute it "
            "outside torch.no_grad(), or .detach() it (a constant to both modes); a custom "
            "autograd.Function needs forward-mode and backward formulas that agree."
        )
