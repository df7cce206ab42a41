"""``structured``: contract the covariance inside Linear/Conv/Embedding layers.

Per example, one forward pass with a zero *probe* added to every matched layer's output and one
backward per output direction (all directions of a chunk at once with ``vmap``) give
``G = df/dz`` at every matched layer; with the captured layer inputs ``a`` each layer's Jacobian
is ``G ⊗ a`` and its covariance block is contracted in closed form or from the layer's own
gradient rows (see :mod:`pushforward.engine.structure.layer_contractions`). No per-example gradient w.r.t. all P
parameters is ever formed. Parameters the analysis cannot prove to be a layer's weight or bias
(and covariance groups spanning several layers) go through the generic strategies on a
sub-model, and the two uncorrelated contributions are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import vjp, vmap

from pushforward.core.budget import chunk_budget, measure_cost
from pushforward.core.chunking import RowChunk, progress_bar
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.kernels import transform_kernels
from pushforward.covariance.block_diagonal import BlockDiagonal
from pushforward.covariance.operator import ParamGroup
from pushforward.engine.contraction import ChunkedResult, gram
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import TRAFFIC, Estimate, NotApplicable, Strategy
from pushforward.engine.structure.layer_contractions import (
    GroupContraction,
    OneHot,
    contraction_for,
)
from pushforward.engine.structure.tracing import Analysis, LayerCall, LayerTap, analyze
from pushforward.products.vjp import row_chunks

__all__ = ["StructuredStrategy"]


@dataclass
class _Layout:
    """The split of a problem into layer-structured groups and a generic remainder.

    ``head``: the linear layer whose output is the model output, when its per-example positions
    line up with the problem's (T positions, K outputs). Backward passes then start at the
    head's *input* with cotangent ``W[k]`` instead of at the output with ``e_k``: the head's
    own ``G`` is the one-hot direction itself.
    """

    analysis: Analysis
    contractions: list[GroupContraction]
    input_shapes: list[torch.Size]
    generic_names: tuple[str, ...]
    generic_groups: list[ParamGroup]
    head: LayerCall | None


def _analysis(p: Problem) -> tuple[Analysis, list[torch.Size]]:
    """Trace one example (cached per input signature on the FunctionalModel)."""
    signature = tuple((tuple(t.shape[1:]), t.dtype) for t in p.inputs.tensors())
    cache = p.fm.__dict__.setdefault("_structure_cache", {})
    if signature not in cache:
        one = p.inputs.slice(0, 1).detach()
        params = {n: t.detach() for n, t in p.fm.params(False).items()}
        with transform_kernels(safe_attention=True):
            result = analyze(lambda q: p.fm.call(q, one.args, one.kwargs), params)
            shapes = _input_shapes(p, result, params, one)
        cache[signature] = (result, shapes)
    return cache[signature]


def _input_shapes(p: Problem, analysis: Analysis, params, one) -> list[torch.Size]:
    """Each matched layer's input shape in a one-example forward."""
    tap = LayerTap(analysis, params)
    probes = [torch.zeros(c.output_shape, dtype=p.dtype, device=one.device) for c in analysis.calls]
    with torch.no_grad(), tap.active(probes):
        p.fm.call(params, one.args, one.kwargs)
    return [t.shape for t in tap.inputs]


def _split(p: Problem) -> _Layout:
    analysis, shapes = _analysis(p)
    joint = p.kind == "joint"
    contractions, generic = [], []
    for group in p.cov.param_groups():
        calls = {analysis.matched[n].index for n in group.names if n in analysis.matched}
        if len(calls) == 1 and all(n in analysis.matched for n in group.names):
            call = analysis.calls[calls.pop()]
            c = contraction_for(call, group.names, group.operator, shapes[call.index], joint)
            if c is not None:
                contractions.append(c)
                continue
        generic.append(group)
    if not contractions:
        why = "; ".join(f"{n}: {r}" for n, r in list(analysis.unmatched.items())[:3])
        raise NotApplicable(
            "no covariance group is a single layer's weight/bias used once"
            + (f" ({why})" if why else " (the covariance couples layers)")
        )
    names = tuple(n for g in generic for n in g.names)
    head = analysis.head
    if head is not None:
        width = head.weight_shape[0] if head.kind == "addmm" else head.weight_shape[-1]
        out = head.weight_shape[-1] if head.kind == "addmm" else head.weight_shape[0]
        a_shape = shapes[head.index]
        if out != p.K or a_shape[-1] != width or a_shape.numel() != p.T * width:
            head = None
    return _Layout(analysis, contractions, shapes, names, generic, head)


def _head_cotangents(p: Problem, layout: _Layout, params, chunk: RowChunk) -> Tensor:
    """``(b, r, *a_head)``: cotangents at the head's input, ``W[k]`` at each row's position."""
    head = layout.head
    weight = params[head.weight_name] if head.weight_name else head.weight_value
    rows = weight.T if head.kind == "addmm" else weight  # (K, width)
    index = p.row_index(chunk)
    t, k = index // p.K, index % p.K
    b, r = index.shape
    width = rows.shape[1]
    u = rows.new_zeros(b, r, p.T, width)
    u.scatter_(2, t.view(b, r, 1, 1).expand(b, r, 1, width), rows[k].unsqueeze(2))
    return u.reshape(b, r, *layout.input_shapes[head.index])


def _generic_plan(p: Problem, layout: _Layout):
    """The generic strategies' plan for the parameters outside the matched layers."""
    from pushforward.engine.planner import plan_problem

    fm = p.fm
    sub_fm = FunctionalModel(
        fm.module,
        params=list(layout.generic_names),
        output_dims=fm.output_dims,
        output_fn=fm.output_fn,
    )
    sub_cov = BlockDiagonal({tuple(g.names): g.operator for g in layout.generic_groups}).bind(
        sub_fm.layout
    )
    sub = replace(p, fm=sub_fm, cov=sub_cov, cost=measure_cost(sub_fm, p.inputs))
    return plan_problem(sub, exclude=("structured",))


class StructuredStrategy(Strategy):
    name = "structured"

    def __init__(self) -> None:
        self._layout: _Layout | None = None
        self._generic = None

    def estimate(self, problem: Problem) -> Estimate:
        p = problem
        layout = self._layout = _split(p)
        per_row = 2 * p.cost.activation_bytes + p.cost.output_numel * p.itemsize
        flops = p.B * p.cost.forward_flops + p.B * p.rows_per_sample * p.cost.forward_flops
        rows_bytes = 0
        for c in layout.contractions:
            z = math.prod(c.call.output_shape)
            per_row += 2 * z * p.itemsize
            size = sum(math.prod(c.op.layout.shapes[n]) for n in c.names)
            if not c.closed_form:
                per_row += 2 * size * p.itemsize
                out = c.call.weight_shape[1 if c.call.kind == "addmm" else 0]
                positions = max(1, z // out)
                work = 2 * size * positions + c.op.matmul_flops() + TRAFFIC * size
                flops += p.B * p.rows_per_sample * work
                rows_bytes += size
            else:
                flops += p.B * p.rows_per_sample * 4 * z + p.B * 2 * size
        held = p.result_bytes() + p.B * p.cost.output_numel * p.itemsize
        if p.kind == "joint":
            held += p.B * p.rows_per_sample * rows_bytes * p.itemsize
            flops += (p.B * p.rows_per_sample) ** 2 * rows_bytes * 2
        chunk = max(1, chunk_budget(p.budget, held) // per_row)
        if p.kind == "covariance":
            chunk = max(p.S, chunk // p.S * p.S)
        chunk = min(chunk, p.B * p.rows_per_sample)
        memory = held + chunk * per_row
        passes = f"{p.B * p.rows_per_sample:,} backward directions through {len(layout.contractions)} layer groups"
        if layout.generic_names:
            sub = self._generic = _generic_plan(p, layout)
            flops += sub.estimate.flops
            memory = max(memory, sub.estimate.memory + p.result_bytes())
            passes += f" + {sub.name} for {len(layout.generic_names)} other tensors"
        return Estimate(self.name, flops, memory, int(chunk), passes)

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        p = problem
        layout = self._layout or _split(p)
        params = p.fm.params(p.differentiable)
        acc = _Accumulator(p, layout.contractions)
        chunks = row_chunks(p.B, p.rows_per_sample, estimate.chunk_size)
        head = layout.head
        for chunk in progress_bar(chunks, p.progress, "structured directions", total=len(chunks)):
            sub = p.inputs.slice(chunk.samples.start, chunk.samples.stop)
            if head is None:
                f, inputs, G = _TAPPED(
                    p.fm, p, layout.analysis, params, sub, p.cotangents(chunk), None
                )
            else:
                cot = _head_cotangents(p, layout, params, chunk)
                f, inputs, G = _TAPPED(p.fm, p, layout.analysis, params, sub, cot, head.index)
                index = p.row_index(chunk)
                G[head.index] = OneHot(
                    index, torch.Size((*index.shape, *head.output_shape)), p.dtype
                )
            acc.add(
                chunk,
                f,
                [(c, inputs[c.call.index], G[c.call.index]) for c in layout.contractions],
                params,
            )
        f, result = acc.result()
        if layout.generic_names:
            generic = self._generic or _generic_plan(p, layout)
            _, rest = generic.run_canonical()
            result = result + rest
        return f, result


def _tapped_vmapped(p: Problem, analysis: Analysis, params, inputs, cotangents, start: int | None):
    def one(tensors, cot):
        args, kwargs = inputs.with_tensors([t.unsqueeze(0) for t in tensors])
        return _tapped_example(p, analysis, params, args, kwargs, cot, start)

    with transform_kernels(safe_attention=True):
        return vmap(one, randomness="error")(inputs.tensors(), cotangents)


def _tapped_loop(p: Problem, analysis: Analysis, params, inputs, cotangents, start: int | None):
    results = []
    with transform_kernels(safe_attention=True):
        for b in range(inputs.batch_size):
            one = inputs.slice(b, b + 1)
            results.append(
                _tapped_example(p, analysis, params, one.args, one.kwargs, cotangents[b], start)
            )
    f = torch.stack([r[0] for r in results])
    a = [torch.stack([r[1][i] for r in results]) for i in range(len(analysis.calls))]
    G = [torch.stack([r[2][i] for r in results]) for i in range(len(analysis.calls))]
    return f, a, G


def _tapped_example(p: Problem, analysis: Analysis, params, args, kwargs, cot, start: int | None):
    """One example: ``(f, [a_l], [G_l (c, *z_l)])`` for the chunk's directions ``cot`` — at the
    model output, or at the input of layer call ``start`` (the head)."""
    tap = LayerTap(analysis, params)
    probes = [
        torch.zeros(c.output_shape, dtype=p.dtype, device=p.inputs.device) for c in analysis.calls
    ]

    def f(pr):
        with tap.active(pr):
            out = p.fm.call(params, args, kwargs).squeeze(0)
        if any(t is None for t in tap.inputs):
            raise RuntimeError("a matched layer did not run (data-dependent control flow?)")
        layer_inputs = list(tap.inputs)
        return (out if start is None else layer_inputs[start]), (out, layer_inputs)

    _, vjp_fn, (out, layer_inputs) = vjp(f, probes, has_aux=True)
    (G,) = vmap(vjp_fn)(cot)
    return out, layer_inputs, list(G)


_TAPPED = Ladder(
    "layer-structured",
    [("vmap over examples", _tapped_vmapped), ("a loop over examples", _tapped_loop)],
)


class _Accumulator(ChunkedResult):
    """Canonical results from per-group contractions, chunk by chunk."""

    def __init__(self, p: Problem, contractions: list[GroupContraction]) -> None:
        super().__init__(p)
        self.contractions = contractions
        self.rows: list[list[tuple[RowChunk, Tensor]]] = [[] for _ in contractions]

    def add(self, chunk: RowChunk, f: Tensor, layers, params) -> None:
        p = self.problem
        self.store_outputs(chunk, f)
        if p.kind == "variance":
            self.put(chunk, sum(c.variance(a, G, params) for c, a, G in layers))
        elif p.kind == "covariance":
            self.put(chunk, sum(c.covariance(a, G, params, p.S) for c, a, G in layers))
        else:
            for store, (c, a, G) in zip(self.rows, layers, strict=True):
                store.append((chunk, c.rows(a, G, params)))

    def result(self) -> tuple[Tensor, Tensor]:
        p = self.problem
        if p.kind != "joint":
            return self.outputs(), self.per_example()
        n = p.B * p.rows_per_sample
        total = torch.zeros(n, n, dtype=p.dtype, device=p.inputs.device)
        for store, c in zip(self.rows, self.contractions, strict=True):
            full = None
            for chunk, R in store:
                if full is None:
                    full = R.new_zeros(p.B, p.rows_per_sample, R.shape[-1])
                full[chunk.samples, chunk.rows] = R
            total = total + gram(c.op, full.reshape(n, -1))
        return self.outputs(), total
