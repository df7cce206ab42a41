"""Reverse-mode products: per-example rows ``J(x_b)^T u`` in bounded chunks.

Reverse mode sums over the batch, so per-example rows need the batch split: ``vmap`` over
examples of ``torch.func.vjp``, with all cotangents of one example pushed through the same
backward graph by an inner ``vmap``. Work is chunked over (example, row) pairs so that at most
``chunk_size`` P-vectors are alive at once; no example's work touches another example (no
O(B^2) cost as with ``jacrev`` over the whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp as func_vjp
from torch.func import vmap

from pushforward.core.branching import vmap_examples
from pushforward.core.chunking import RowChunk, progress_bar, row_chunks
from pushforward.core.cost import measure_cost, row_bytes
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import transform_kernels
from pushforward.core.options import Options

__all__ = [
    "collect_rows",
    "iter_row_chunks",
    "one_hot_cotangents",
    "per_example_vjp",
    "row_chunk_size",
    "sample_rows",
]


def _rows_vmapped(fm: FunctionalModel, params, inputs: Inputs, cotangents: Tensor):
    def one(tensors, cot):
        args, kwargs = inputs.with_tensors([t.unsqueeze(0) for t in tensors])

        def f(p):
            return fm.call(p, args, kwargs).squeeze(0)

        out, vjp_fn = func_vjp(f, params)
        (grads,) = vmap(vjp_fn)(cot)
        return out, grads

    with transform_kernels(safe_attention=True):
        out, grads = vmap_examples(one, [inputs.tensors(), cotangents])
    return out, _checked(fm, grads, cotangents.shape[:2])


def _checked(fm: FunctionalModel, rows: dict[str, Tensor], lead: torch.Size) -> dict[str, Tensor]:
    """``rows`` after checking each is ``(b, R, *shape)``.

    A transform's batching rule that hands back another lead (PyTorch's ``prelu`` backward under
    nested ``vmap``) raises, so the next method of the ladder runs instead of a silent broadcast.
    """
    for name, r in rows.items():
        want = (*lead, *fm.param_shapes[name])
        if tuple(r.shape) != tuple(want):
            raise RuntimeError(
                f"per-example rows of {name} came back with shape {tuple(r.shape)}, expected "
                f"{want} (a transform's batching rule for an op of the model?)"
            )
    return rows


def _rows_loop_vmapped(fm: FunctionalModel, params, inputs: Inputs, cotangents: Tensor):
    outs, rows = [], []
    with transform_kernels(safe_attention=True):
        for b in range(inputs.batch_size):
            one = inputs.slice(b, b + 1)

            def f(p, one=one):
                return fm.call(p, one.args, one.kwargs).squeeze(0)

            out, vjp_fn = func_vjp(f, params)
            (grads,) = vmap(vjp_fn)(cotangents[b])
            outs.append(out)
            rows.append(_checked(fm, grads, cotangents.shape[1:2]))
    return torch.stack(outs), _stack_dicts(rows)


def _stack_dicts(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def _rows_loop(fm: FunctionalModel, params, inputs: Inputs, cotangents: Tensor):
    differentiable = torch.is_grad_enabled()
    names = list(params)
    outs, rows = [], []
    with torch.enable_grad():
        leaves = {
            k: p if p.requires_grad else p.detach().requires_grad_(True) for k, p in params.items()
        }
        for b in range(inputs.batch_size):
            one = inputs.slice(b, b + 1)
            out = fm.call(leaves, one.args, one.kwargs).squeeze(0)
            sample = []
            for cot in cotangents[b]:
                grads = torch.autograd.grad(
                    out,
                    [leaves[k] for k in names],
                    cot,
                    retain_graph=True,
                    create_graph=differentiable,
                    allow_unused=True,
                )
                sample.append(
                    {
                        k: torch.zeros_like(leaves[k]) if g is None else g
                        for k, g in zip(names, grads, strict=True)
                    }
                )
            outs.append(out)
            rows.append(
                _stack_dicts(sample)
                if sample
                else {k: v.new_zeros(0, *v.shape) for k, v in leaves.items()}
            )
    f, r = torch.stack(outs), _stack_dicts(rows)
    if not differentiable:
        f, r = f.detach(), {k: v.detach() for k, v in r.items()}
    return f, r


_REVERSE = Ladder(
    "reverse-mode products",
    [
        ("vmap over examples of torch.func.vjp", _rows_vmapped),
        ("a loop over examples of torch.func.vjp", _rows_loop_vmapped),
        ("a loop over examples with torch.autograd", _rows_loop),
    ],
)


def sample_rows(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    inputs: Inputs,
    cotangents: Tensor,
    flat: bool = True,
) -> tuple[Tensor, Tensor | dict[str, Tensor]]:
    """Per-example VJP rows: internal primitive (no chunking, no validation).

    Args:
        fm: the model.
        params: its selected parameters by name (what the rows are taken with respect to).
        inputs: the batch, ``b = inputs.batch_size`` examples.
        cotangents: ``(b, R, *f_b)`` where ``f_b`` is one example's output shape (the output
            without its batch dimension).
        flat: concatenate the rows over the parameters (else one tensor per parameter).

    Returns:
        ``(f, rows)``: outputs ``(b, *f_b)`` and rows ``(b, R, P)`` with
        ``rows[i, r] = J(x_i)^T cotangents[i, r]`` — or, with ``flat=False``, the rows per
        parameter ``{name: (b, R, *shape)}`` (no concatenation). Differentiable iff grad mode
        is on.
    """
    f, grads = _REVERSE(fm, fm, params, inputs, cotangents)
    return f, fm.flatten(grads) if flat else grads


def row_chunk_size(
    fm: FunctionalModel, inputs: Inputs, options: Options, result_bytes: int, what: str
) -> int:
    """Rows (P-vectors) computed at once within the budget.

    Next to a ``result_bytes`` result and the outputs; raises
    :class:`~pushforward.MemoryBudgetError` when one row does not fit.
    """
    cost = measure_cost(fm, inputs)
    budget = options.budget(inputs.device)
    held = result_bytes + inputs.batch_size * cost.output_bytes
    per = row_bytes(cost)
    chunk = budget.chunk(per, held)
    budget.require(budget.peak(held, chunk, per), what)
    return chunk


def one_hot_cotangents(index: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """``(b, r, *shape)`` one-hot cotangents with the 1 at flat position ``index[i, j]``."""
    b, r = index.shape
    cot = torch.zeros(b, r, math.prod(shape), dtype=dtype, device=index.device)
    cot.scatter_(2, index.unsqueeze(-1), 1)
    return cot.view(b, r, *shape)


def iter_row_chunks(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    inputs: Inputs,
    rows_per_sample: int,
    make_cotangents: Callable[[RowChunk], Tensor],
    chunk_size: int,
    progress: bool = False,
    desc: str = "rows",
    flat: bool = True,
    group_size: int = 1,
) -> Iterator[tuple[RowChunk, Tensor, Tensor | dict[str, Tensor]]]:
    """Run :func:`sample_rows` over chunks of (example, row) pairs.

    Yields ``(chunk, f, rows)`` with ``f`` of shape ``(b, *f_b)`` and ``rows`` of shape
    ``(b, r, P)`` (or per parameter with ``flat=False``) for the ``b`` examples and ``r`` rows
    of ``chunk``.
    """
    chunks = row_chunks(inputs.batch_size, rows_per_sample, chunk_size, group_size)
    for chunk in progress_bar(chunks, progress, desc, total=len(chunks)):
        sub = inputs.slice(chunk.samples.start, chunk.samples.stop)
        f, rows = sample_rows(fm, params, sub, make_cotangents(chunk), flat=flat)
        yield chunk, f, rows


def per_example_vjp(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cotangents: Tensor,
    *,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    differentiable: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-example vector-Jacobian products ``J(x_n)^T u_n``.

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors, or mapping of keyword arguments).
        cotangents: ``u`` of the output's shape ``(*example_dims, *output_shape)``.
        chunk_size: at most this many rows computed at once (default: as many as
            ``memory_budget`` allows).
        memory_budget: bytes or a string like ``"2GB"`` bounding what the call allocates, the
            ``(N, P)`` result included (default: half of the available memory).
        differentiable: keep the graph so gradients flow to ``x``, the parameters and the
            cotangents.
        progress: a tqdm progress bar over the chunks.

    Returns:
        ``(f, rows)`` with ``rows.shape == (N, P)``, ``N = prod(example_dims)`` (row-major
        over the example dimensions, e.g. batch then token).

    Raises:
        ValueError: ``cotangents`` do not have the output's shape.
    """
    options = Options(
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    fm = as_functional_model(model)
    inputs = fm.prepare(x)
    cost = measure_cost(fm, inputs)
    shape, dtype = cost.output_shape, cost.output_dtype
    example_shape, output_shape = fm.split_shape(torch.Size((inputs.batch_size, *shape)))
    if cotangents.shape != (*example_shape, *output_shape):
        raise ValueError(
            f"cotangents have shape {tuple(cotangents.shape)}; expected the output's shape "
            f"{(*example_shape, *output_shape)}"
        )
    B = inputs.batch_size
    tokens = math.prod(example_shape[1:])
    u = cotangents.to(dtype).reshape(B, tokens, -1)

    def make(chunk: RowChunk) -> Tensor:
        rows = torch.arange(chunk.rows.start, chunk.rows.stop, device=u.device)
        ub = u[chunk.samples]
        cot = u.new_zeros(ub.shape[0], len(rows), tokens, ub.shape[-1])
        cot[:, torch.arange(len(rows)), rows] = ub[:, rows]
        return cot.view(ub.shape[0], len(rows), *shape)

    result = B * tokens * cost.param_bytes
    chunk = row_chunk_size(fm, inputs, options, result, f"per_example_vjp of {B * tokens:,} rows")
    with torch.set_grad_enabled(differentiable):
        inputs = inputs if differentiable else inputs.detach()
        params = fm.params(differentiable)
        f, out = collect_rows(
            iter_row_chunks(fm, params, inputs, tokens, make, chunk, progress, "vjp rows"),
            B,
            tokens,
            fm.num_params,
        )
    return f, out.reshape(B * tokens, fm.num_params)


def collect_rows(
    chunks: Iterator[tuple[RowChunk, Tensor, Tensor]], batch: int, rows_per_sample: int, P: int
) -> tuple[Tensor, Tensor]:
    """Gather chunked outputs and rows into ``f (batch, *f_b)`` and ``(batch, rows, P)``."""
    f_out = rows_out = None
    for chunk, f, rows in chunks:
        if rows_out is None:
            rows_out = rows.new_empty(batch, rows_per_sample, P)
            f_out = f.new_empty(batch, *f.shape[1:])
        rows_out[chunk.samples, chunk.rows] = rows
        if chunk.rows.start == 0:
            f_out[chunk.samples] = f
    if f_out is None or rows_out is None:
        raise ValueError("no rows to collect: the batch is empty or has no rows per example")
    return f_out, rows_out
