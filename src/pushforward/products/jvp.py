"""Forward-mode products: ``J(x) v`` for every example of a batch in one pass.

A Jacobian-vector product with a weight-space tangent ``v`` is one forward pass with dual
numbers, and it gives ``J(x_b) v`` for every example ``b`` at once: forward mode is free across
the batch. Many tangents are pushed together with ``vmap`` in chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp as func_jvp
from torch.func import vmap

from pushforward.core.chunking import progress_bar
from pushforward.core.cost import measure_cost, tangent_bytes
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import transform_kernels
from pushforward.core.options import Options
from pushforward.core.precision import upcast
from pushforward.covariance.checks import all_finite

__all__ = ["batched_jvp", "jvp", "push_tangents"]


def _jvp_vmapped(fm: FunctionalModel, params, inputs: Inputs, tangents):
    def f(p):
        return fm.call(p, inputs.args, inputs.kwargs)

    def one(t):
        return func_jvp(f, (params,), (t,))

    with transform_kernels(safe_attention=True):
        return vmap(one, out_dims=(None, 0), randomness="error")(tangents)


def _jvp_loop(fm: FunctionalModel, params, inputs: Inputs, tangents):
    def f(p):
        return fm.call(p, inputs.args, inputs.kwargs)

    n = next(iter(tangents.values())).shape[0]
    with transform_kernels(safe_attention=True):
        outs = [func_jvp(f, (params,), ({k: v[i] for k, v in tangents.items()},)) for i in range(n)]
    return outs[0][0], torch.stack([o[1] for o in outs])


def _double_backward(fm: FunctionalModel, params, inputs: Inputs, tangents):
    """``J v = d/du <J^T u, v>`` with plain autograd: works wherever backward does."""
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = {
            k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()
        }
        f = fm.call(leaves, inputs.args, inputs.kwargs)
        u = torch.zeros_like(f, requires_grad=True)
        names = list(leaves)
        grads = torch.autograd.grad(
            f, [leaves[k] for k in names], u, create_graph=True, allow_unused=True
        )
        used = [(k, g) for k, g in zip(names, grads, strict=True) if g is not None]
        n = next(iter(tangents.values())).shape[0]
        out = []
        for i in range(n):
            (jv,) = torch.autograd.grad(
                [g for _, g in used],
                u,
                [tangents[k][i] for k, _ in used],
                retain_graph=True,
                create_graph=differentiable,
                allow_unused=True,
            )
            out.append(torch.zeros_like(f) if jv is None else jv)
    if not differentiable:
        f = f.detach()
        out = [o.detach() for o in out]
    return f, torch.stack(out)


#: The fused attention kernels have no forward-mode derivative, so forward mode always runs with
#: the math attention backend (the kernel layer, :mod:`pushforward.core.kernels`).
_FORWARD = Ladder(
    "forward-mode products",
    [
        ("torch.func.jvp", lambda fm, p, i, t: _jvp_vmapped(fm, p, i, t)),
        ("a loop of torch.func.jvp", _jvp_loop),
        ("reverse-mode emulation (double backward)", _double_backward),
    ],
)


def push_tangents(
    fm: FunctionalModel, params: dict[str, Tensor], inputs: Inputs, tangents: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(f, J V)`` for tangents ``{name: (n, *shape)}``: ``J V`` has shape ``(n, *f.shape)``.

    Internal primitive (no chunking, no validation); differentiable iff grad mode is on. The
    tangents are cast to their parameters' dtypes (forward mode pairs each tangent with its
    primal).
    """
    tangents = {name: upcast(t, params[name].dtype) for name, t in tangents.items()}
    return _FORWARD(fm, fm, params, inputs, tangents)


def _as_tangent_batch(fm: FunctionalModel, v: Tensor | Mapping[str, Tensor], batched: bool):
    d = fm.as_dict(v) if isinstance(v, Mapping) else fm.unflatten(_check_flat(fm, v, batched))
    for name, t in d.items():
        shape = fm.param_shapes[name]
        lead = t.shape[: t.dim() - len(shape)]
        if t.shape[len(lead) :] != shape or len(lead) != int(batched):
            want = "(n, *shape)" if batched else "shape"
            raise ValueError(
                f"tangent for {name!r} has shape {tuple(t.shape)}; expected {want} with shape={tuple(shape)}"
            )
        if not all_finite(t):  # no temporary of the tangents' size (the budget counts none)
            raise ValueError(f"tangent for {name!r} has non-finite entries")
    return d if batched else {k: t.unsqueeze(0) for k, t in d.items()}


def _check_flat(fm: FunctionalModel, v: Tensor, batched: bool) -> Tensor:
    want = 2 if batched else 1
    if v.dim() != want or v.shape[-1] != fm.num_params:
        expect = f"(n, {fm.num_params})" if batched else f"({fm.num_params},)"
        raise ValueError(f"tangent has shape {tuple(v.shape)}; expected {expect} (P = num_params)")
    return v


def jvp(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    v: Tensor | Mapping[str, Tensor],
    *,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor]:
    """Jacobian-vector product for every example at once.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors, or mapping of keyword arguments).
        v: weight-space tangent, flat ``(P,)`` or ``{name: tensor of the parameter's shape}``.
        differentiable: keep the graph so gradients flow to ``x``, the parameters and ``v``.

    Returns:
        ``(f, Jv)``, both of the output's shape; ``Jv[b] = J(x_b) v``.
    """
    fm = as_functional_model(model)
    inputs = fm.prepare(x)
    tangents = _as_tangent_batch(fm, v, batched=False)
    with torch.set_grad_enabled(differentiable):
        inputs = inputs if differentiable else inputs.detach()
        f, jv = push_tangents(fm, fm.params(differentiable), inputs, tangents)
    return f, jv[0]


def batched_jvp(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    tangents: Tensor | Mapping[str, Tensor],
    *,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Jacobian-vector products for many tangents, in chunks.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors, or mapping of keyword arguments).
        tangents: ``(n, P)`` or ``{name: (n, *shape)}``.
        chunk_size: at most this many tangents pushed at once (default: as many as
            ``memory_budget`` allows).
        memory_budget: bytes or a string like ``"2GB"`` bounding what the call allocates, the
            result ``(n, *f.shape)`` included (default: half of the available memory).
        differentiable: keep the graph so gradients flow to ``x``, the parameters and the
            tangents.
        progress: a tqdm progress bar over the chunks.

    Returns:
        ``(f, JV)`` with ``JV.shape == (n, *f.shape)``; ``JV[i, b] = J(x_b) v_i``.
    """
    options = Options(
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    fm = as_functional_model(model)
    inputs = fm.prepare(x)
    tangents = _as_tangent_batch(fm, tangents, batched=True)
    n = next(iter(tangents.values())).shape[0]
    cost = measure_cost(fm, inputs)
    B = inputs.batch_size
    budget = options.budget(inputs.device)
    held = (n + 1) * B * cost.output_bytes  # the result and f
    per = tangent_bytes(cost, B)
    chunk = budget.chunk(per, held, at_most=n)
    budget.require(budget.peak(held, chunk, per), f"batched_jvp of {n:,} tangents")
    with torch.set_grad_enabled(differentiable):
        inputs = inputs if differentiable else inputs.detach()
        params = fm.params(differentiable)
        if n == 0:
            f = fm.call(params, inputs.args, inputs.kwargs)
            return f, f.new_zeros((0, *f.shape))
        starts = range(0, n, chunk)
        out: Tensor | None = None
        parts = []
        for s in progress_bar(starts, progress, "jvp chunks", total=len(starts)):
            part = {k: t[s : s + chunk] for k, t in tangents.items()}
            f, jv = push_tangents(fm, params, inputs, part)
            if differentiable:
                parts.append(jv)
                continue
            if out is None:
                out = jv.new_empty(n, *jv.shape[1:])
            out[s : s + jv.shape[0]] = jv
    return f, torch.cat(parts) if differentiable else out
