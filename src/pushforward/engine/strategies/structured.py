"""``structured``: contract the covariance inside Linear/Conv/Embedding layers.

Per example, one forward pass with a zero *probe* added to every matched layer's output and one
backward per output direction (all directions of a chunk at once with ``vmap``) give
``G = df/dz`` at every matched layer; with the captured layer inputs ``a`` each layer's Jacobian
is ``G ⊗ a`` and its covariance block is contracted in closed form or from the layer's own
gradient rows (see :mod:`pushforward.engine.structure.layer_contractions`). No per-example
gradient w.r.t. all P parameters is ever formed. Parameters the analysis cannot prove to be a
layer's weight or bias (and covariance groups spanning several layers) go through the generic
strategies on a sub-model, and the two uncorrelated contributions are added.

**The head.** When a linear layer's output *is* the model output (same memory), its own ``G`` is
the one-hot direction: backward passes start at its input with cotangent ``W[k]``, and when
every posterior parameter sits on that head (last-layer Laplace) no backward pass is needed at
all — one batched forward gives the head's inputs (the ``last_layer`` strategy name means this).

**Proof per call.** The analysis is traced once per input signature, on one example; every call
re-proves what it relies on: the tap raises when a matched parameter is used by any other
operation, twice, or not at all; the one-forward head path checks the batch's output is the
head's output tensor; the head shortcut under ``vmap`` (where Python control flow cannot depend
on the data) checks the outputs equal the head's outputs, and the per-example loop (the fallback
for data-dependent control flow) does not take the shortcut at all. A failed proof raises
:class:`~pushforward.engine.structure.tracing.StructureError`, and ``auto`` falls through to the
next strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import vjp, vmap

from pushforward.core.branching import vmap_examples
from pushforward.core.chunking import RowChunk, progress_bar, row_chunks
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.kernels import transform_kernels
from pushforward.covariance.block_diagonal import BlockDiagonal
from pushforward.covariance.operator import ParamGroup
from pushforward.engine.contraction import ChunkedResult
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import (
    Estimate,
    NotApplicable,
    Strategy,
    SubPlanner,
    traffic,
)
from pushforward.engine.structure.layer_contractions import (
    GroupContraction,
    OneHot,
    contraction_for,
)
from pushforward.engine.structure.tracing import (
    Analysis,
    LayerCall,
    LayerTap,
    StructureError,
    analyze,
    is_same_memory,
)

__all__ = ["LastLayerStrategy", "StructuredStrategy"]


@dataclass(frozen=True)
class Split:
    """The split of a problem into layer-structured groups and a generic remainder.

    Attributes:
        analysis: where the posterior parameters are used (traced on one example).
        input_shapes: each matched layer's input shape in a one-example forward.
        contractions: one per covariance group that sits on one matched layer.
        generic: the plan for the other parameters (``None``: there are none).
        head: the linear layer whose output is the model output, when its positions line up
            with the problem's (T positions, K outputs).
        head_only: every contraction is on the head and nothing is generic: one forward pass.
    """

    analysis: Analysis
    input_shapes: tuple[torch.Size, ...]
    contractions: tuple[GroupContraction, ...]
    generic: object | None
    head: LayerCall | None
    head_only: bool

    @property
    def generic_names(self) -> tuple[str, ...]:
        """The parameters that go through the generic sub-plan."""
        return () if self.generic is None else self.generic.problem.fm.param_names


def _analysis(p: Problem) -> tuple[Analysis, tuple[torch.Size, ...]]:
    """Trace one example (cached per input signature in the model's cache)."""
    key = p.inputs.signature()
    found = p.fm.cache.structures.get(key)
    if found is None:
        one = p.inputs.slice(0, 1).detach()
        params = {n: t.detach() for n, t in p.fm.params(False).items()}
        with transform_kernels(safe_attention=True):
            result = analyze(lambda q: p.fm.call(q, one.args, one.kwargs), params)
            shapes = _input_shapes(p, result, params, one)
        found = p.fm.cache.structures[key] = (result, shapes)
    return found


def _input_shapes(p: Problem, analysis: Analysis, params, one) -> tuple[torch.Size, ...]:
    """Each matched layer's input shape in a one-example forward."""
    tap = LayerTap(analysis, params)
    probes = [torch.zeros(c.output_shape, dtype=p.dtype, device=one.device) for c in analysis.calls]
    with torch.no_grad(), tap.active(probes):
        p.fm.call(params, one.args, one.kwargs)
    return tuple(t.shape for t in tap.inputs)


def _split(p: Problem, subplan: SubPlanner) -> Split:
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
    head = analysis.head
    if head is not None:
        width = head.weight_shape[0] if head.kind == "addmm" else head.weight_shape[-1]
        out = head.weight_shape[-1] if head.kind == "addmm" else head.weight_shape[0]
        a_shape = shapes[head.index]
        if out != p.K or a_shape[-1] != width or a_shape.numel() != p.T * width:
            head = None
    sub = _generic_plan(p, generic, subplan) if generic else None
    head_only = head is not None and sub is None and all(c.call is head for c in contractions)
    return Split(analysis, shapes, tuple(contractions), sub, head, head_only)


def _generic_plan(p: Problem, groups: list[ParamGroup], subplan: SubPlanner):
    """The generic strategies' plan for the parameters outside the matched layers."""
    fm = p.fm
    names = [n for g in groups for n in g.names]
    sub_fm = FunctionalModel(
        fm.module, params=names, output_dims=fm.output_dims, output_fn=fm.output_fn
    )
    sub_cov = BlockDiagonal({tuple(g.names): g.operator for g in groups}).bind(sub_fm.layout)
    return subplan(p.restricted(sub_fm, sub_cov), ("structured",))


def _head_cotangents(p: Problem, split: Split, params, chunk: RowChunk) -> Tensor:
    """``(b, r, *a_head)``: cotangents at the head's input, ``W[k]`` at each row's position."""
    head = split.head
    weight = params[head.weight_name] if head.weight_name else head.weight_value
    rows = weight.T if head.kind == "addmm" else weight  # (K, width)
    index = p.row_index(chunk)
    t, k = index // p.K, index % p.K
    b, r = index.shape
    width = rows.shape[1]
    u = rows.new_zeros(b, r, p.T, width)
    u.scatter_(2, t.view(b, r, 1, 1).expand(b, r, 1, width), rows[k].unsqueeze(2))
    return u.reshape(b, r, *split.input_shapes[head.index])


class StructuredStrategy(Strategy):
    name = "structured"

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        p = problem
        split = _split(p, subplan)
        rows = p.B * p.rows_per_sample
        held = p.result_bytes() + p.outputs_bytes()
        if split.head_only:
            per_row = p.itemsize * 8  # indices and one-hot bookkeeping
            per_example = p.cost.activation_bytes + p.cost.output_bytes
            flops = p.B * p.cost.forward_flops
            passes = "1 forward pass (every posterior group sits on the head)"
        else:
            per_row = 2 * p.cost.activation_bytes + p.cost.output_bytes
            per_example = 0
            # a backward to the layer outputs only: no parameter gradients (about one forward)
            flops = p.B * p.cost.forward_flops + rows * p.cost.forward_flops
            passes = f"{rows:,} backward directions through {len(split.contractions)} layer groups"
        for c in split.contractions:
            z = math.prod(c.call.output_shape)
            per_row += 2 * z * p.itemsize
            size = sum(math.prod(c.op.layout.shapes[n]) for n in c.names)
            if c.closed_form:
                flops += rows * 4 * z + p.B * 2 * size
            else:
                out = c.call.weight_shape[1 if c.call.kind == "addmm" else 0]
                positions = max(1, z // out)
                flops += rows * (2 * size * positions + c.op.matmul_flops() + traffic() * size)
                fixed = c.op.workspace_bytes(0)  # what the block caches (a factor), once
                per_row += 2 * size * p.itemsize + c.op.workspace_bytes(1) - fixed
                held += fixed
        if p.kind == "joint":
            q = p.group_size * p.rows_per_sample
            flops += rows * q * 4 * len(split.contractions)
            # a group's layer inputs and directions are kept until it is complete
            held += p.group_size * per_row * p.rows_per_sample // 2
        chunk = p.budget.chunk(per_row + per_example // max(p.rows_per_sample, 1), held, rows)
        if p.kind == "covariance":
            chunk = max(p.S, chunk // p.S * p.S)
        memory = p.budget.peak(held, chunk, per_row) + per_example * max(
            1, chunk // max(p.rows_per_sample, 1)
        )
        if split.generic is not None:
            sub = split.generic
            flops += sub.estimate.flops
            memory = max(memory, sub.estimate.memory + p.result_bytes())
            passes += f" + {sub.name} for {len(sub.problem.fm.param_names)} other tensors"
        return Estimate(self.name, flops, memory, int(chunk), passes, state=split)

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        p = problem
        split: Split = estimate.state
        params = p.fm.params(p.differentiable)
        acc = _Accumulator(p, split.contractions)
        q = p.group_size if p.kind == "joint" else 1
        chunks = row_chunks(p.B, p.rows_per_sample, estimate.chunk_size, q)
        for chunk in progress_bar(chunks, p.progress, "structured directions", total=len(chunks)):
            sub = p.inputs.slice(chunk.samples.start, chunk.samples.stop)
            if split.head_only:
                f, inputs = _head_forward(p, split, params, sub)
                G = dict.fromkeys(range(len(split.analysis.calls)))
            else:
                f, inputs, G = _directions(p, split, params, sub, chunk)
            index = p.row_index(chunk) if split.head is not None else None
            if split.head is not None and (split.head_only or G[split.head.index] is None):
                shape = torch.Size((*index.shape, *split.head.output_shape))
                G[split.head.index] = OneHot(index, shape, p.dtype)
            acc.add(
                chunk,
                f,
                [(c, inputs[c.call.index], G[c.call.index]) for c in split.contractions],
                params,
            )
        f, result = acc.result()
        if split.generic is not None:
            generic = replace(split.generic, problem=split.generic.problem.rebased(p))
            _, rest = generic.run_canonical()
            result = result + rest
        return f, result


class LastLayerStrategy(StructuredStrategy):
    """The structured strategy's one-forward case, by name: every posterior parameter is the
    weight or bias of the linear layer whose output is the model's output (last-layer Laplace).
    Refuses (saying why) any other problem."""

    name = "last_layer"

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        _require_head_only(problem)
        est = super().estimate(problem, subplan)
        if not est.state.head_only:
            raise NotApplicable("the head's positions do not line up with the model's outputs")
        return replace(est, strategy=self.name)


def _require_head_only(p: Problem) -> None:
    """Raise :class:`NotApplicable` unless every posterior parameter sits on the head."""
    analysis, _ = _analysis(p)
    for name in p.fm.param_names:
        if name in analysis.unmatched:
            raise NotApplicable(
                f"{name} is {analysis.unmatched[name]}: the head is called 2 times or its "
                "parameters are tied or used elsewhere (a closed form through the features "
                "needs each used once)"
            )
    calls = {analysis.matched[n].index for n in p.fm.param_names}
    if len(calls) > 1:
        raise NotApplicable(
            "the posterior's parameters do not all belong to one module (the closed form "
            "through the features needs them on the linear head)"
        )
    if analysis.head is None or analysis.head.index not in calls:
        raise NotApplicable(
            "the layer of the posterior's parameters is not the model output (the model "
            "transforms its output)"
        )


def _head_forward(p: Problem, split: Split, params, sub) -> tuple[Tensor, list[Tensor]]:
    """One batched forward with the tap: the outputs and every matched layer's inputs, after
    proving that the model's output is the head's output tensor."""
    tap = LayerTap(split.analysis, params)
    probes = [
        torch.zeros(c.output_shape, dtype=p.dtype, device=sub.device) for c in split.analysis.calls
    ]
    with tap.active(probes):
        f = p.fm.call(params, sub.args, sub.kwargs)
    tap.check_complete()
    if not is_same_memory(tap.outputs[split.head.index], f):
        raise StructureError(
            "the model's output is not its last linear layer's output in this batch "
            "(data-dependent control flow after the head?)"
        )
    return f, [t.unsqueeze(1) for t in tap.inputs]  # (b, 1, ...) as one example's shapes


def _directions(p: Problem, split: Split, params, sub, chunk: RowChunk):
    """``(f, [a_l], [G_l])`` for the chunk's directions, the head's ``G`` left ``None`` when the
    backward passes started at its input."""
    calls = split.analysis.calls
    head = split.head
    batched = _batch_first(split) and p.rows_per_sample <= BATCHED_ROWS_MAX
    ladder = _TAPPED_BATCHED if batched else _TAPPED
    f, inputs, G, mode = ladder(
        p.fm, p, split, params, sub, chunk, head.index if head is not None else None
    )
    G = list(G)
    if head is not None and mode == "shortcut":
        G[head.index] = None
    return f, inputs, dict(zip(range(len(calls)), G, strict=True))


#: Directions per example up to which one batched backward per direction row (for all examples
#: of a chunk) is used; above it ``vmap`` over examples is faster (measured on CPU, one thread:
#: 1-10 outputs 5-15% faster batched, 1,000 outputs 1.65x slower batched).
BATCHED_ROWS_MAX = 64


def _batch_first(split: Split) -> bool:
    """Every matched layer's input and output lead with the example's batch dimension (size 1
    in the one-example trace), so a batched forward gives them as ``(b, ...)``."""
    return all(
        c.output_shape[:1] == (1,) and shape[:1] == (1,)
        for c, shape in zip(split.analysis.calls, split.input_shapes, strict=True)
    )


def _tapped_batched(p: Problem, split: Split, params, sub, chunk: RowChunk, head: int | None):
    """One batched forward with per-example probes ``(b, ...)`` and one backward per row of the
    chunk for all its examples together: the examples are independent (checked when the inputs
    were prepared), so the gradient of ``sum_b <u_b, f_b>`` w.r.t. example ``b``'s probe is its
    own direction ``G_b``. No per-example transform. When the output is proven to be the head's
    output tensor, the head's directions are the one-hot rows and the backward starts at the
    head's input (``W[k]`` rows), so it never goes through the head."""
    calls = split.analysis.calls
    b = chunk.samples.stop - chunk.samples.start
    tap = LayerTap(split.analysis, params)
    with torch.enable_grad():
        probes = [
            torch.zeros(b, *c.output_shape[1:], dtype=p.dtype, device=sub.device).requires_grad_()
            for c in calls
        ]
        with transform_kernels(safe_attention=True), tap.active(probes):
            f = p.fm.call(params, sub.args, sub.kwargs)
        tap.check_complete()
        if any(out.shape != probe.shape for out, probe in zip(tap.outputs, probes, strict=True)):
            raise StructureError("a matched layer's batched output is not (batch, ...)")
        shortcut = head is not None and is_same_memory(tap.outputs[head], f)
        if shortcut and tap.inputs[head].requires_grad:
            # f is the head's output: the backward starts at the head's input with W[k] rows
            start = tap.inputs[head]
            cot = _head_cotangents(p, split, params, chunk).transpose(0, 1)
            cot = cot.reshape(cot.shape[0], *start.shape)  # (r, b, *a_head)
        else:
            start = f
            cot = p.cotangents(chunk).transpose(0, 1)  # (r, b, *sample_shape)
        G = torch.autograd.grad(
            start,
            probes,
            cot if cot.shape[0] > 1 else cot[0],
            create_graph=p.differentiable,
            allow_unused=True,
            is_grads_batched=cot.shape[0] > 1,
        )
    if cot.shape[0] == 1:
        G = [None if g is None else g.unsqueeze(0) for g in G]
    G = [
        torch.zeros(b, cot.shape[0], *c.output_shape, dtype=p.dtype, device=sub.device)
        if g is None
        else g.transpose(0, 1).unsqueeze(2)  # (b, r, 1, ...) as one example's shapes
        for c, g in zip(calls, G, strict=True)
    ]
    inputs = [t.unsqueeze(1) for t in tap.inputs]
    if not p.differentiable:
        f, inputs, G = f.detach(), [t.detach() for t in inputs], [g.detach() for g in G]
    return f, inputs, G, "shortcut" if shortcut else "output"


def _tapped_vmapped(p: Problem, split: Split, params, sub, chunk: RowChunk, head: int | None):
    """All examples of the chunk at once (``vmap``; examples whose Python control flow reads
    different values run as separate groups): every example of a group runs one program, so
    the head shortcut is proven by the outputs equalling the head's."""
    cot = _head_cotangents(p, split, params, chunk) if head is not None else p.cotangents(chunk)

    def one(tensors, c):
        args, kwargs = sub.with_tensors([t.unsqueeze(0) for t in tensors])
        return _tapped_example(p, split.analysis, params, args, kwargs, c, head)

    with transform_kernels(safe_attention=True):
        f, inputs, G, z = vmap_examples(one, [sub.tensors(), cot])
    if head is not None and not torch.equal(f, z.reshape(f.shape)):
        raise StructureError(
            "the model's output differs from its last linear layer's output for some examples "
            "(data-dependent control flow after the head?)"
        )
    return f, inputs, G, "shortcut" if head is not None else "output"


def _tapped_loop(p: Problem, split: Split, params, sub, chunk: RowChunk, head: int | None):
    """Example by example (the fallback when ``vmap`` cannot run the model, e.g. data-dependent
    control flow): backward passes start at the output, no head shortcut."""
    cot = p.cotangents(chunk)
    results = []
    with transform_kernels(safe_attention=True):
        for b in range(sub.batch_size):
            one = sub.slice(b, b + 1)
            results.append(
                _tapped_example(p, split.analysis, params, one.args, one.kwargs, cot[b], None)
            )
    n = len(split.analysis.calls)
    f = torch.stack([r[0] for r in results])
    a = [torch.stack([r[1][i] for r in results]) for i in range(n)]
    G = [torch.stack([r[2][i] for r in results]) for i in range(n)]
    return f, a, G, "output"


def _tapped_example(p: Problem, analysis: Analysis, params, args, kwargs, cot, start: int | None):
    """One example: ``(f, [a_l], [G_l (c, *z_l)], z_head)`` for the directions ``cot`` — at the
    model output, or at the input of layer call ``start`` (the head)."""
    tap = LayerTap(analysis, params)
    probes = [
        torch.zeros(c.output_shape, dtype=p.dtype, device=p.inputs.device) for c in analysis.calls
    ]

    def f(pr):
        with tap.active(pr):
            out = p.fm.call(params, args, kwargs).squeeze(0)
        tap.check_complete()
        layer_inputs = list(tap.inputs)
        head_out = out if start is None else tap.outputs[start]
        return (out if start is None else layer_inputs[start]), (out, layer_inputs, head_out)

    _, vjp_fn, (out, layer_inputs, head_out) = vjp(f, probes, has_aux=True)
    (G,) = vmap(vjp_fn)(cot)
    return out, layer_inputs, list(G), head_out


_TAPPED = Ladder(
    "layer-structured",
    [("vmap over examples", _tapped_vmapped), ("a loop over examples", _tapped_loop)],
)
_TAPPED_BATCHED = Ladder(
    "layer-structured, batch-first layers",
    [
        ("one batched backward per direction", _tapped_batched),
        ("vmap over examples", _tapped_vmapped),
        ("a loop over examples", _tapped_loop),
    ],
)


class _Accumulator(ChunkedResult):
    """Canonical results from per-group contractions, chunk by chunk."""

    def __init__(self, p: Problem, contractions: tuple[GroupContraction, ...]) -> None:
        super().__init__(p)
        self.contractions = contractions
        self.pending: list[list[tuple[RowChunk, Tensor, Tensor | OneHot]]] = [
            [] for _ in contractions
        ]

    def add(self, chunk: RowChunk, f: Tensor, layers, params) -> None:
        p = self.problem
        self.store_outputs(chunk, f)
        if p.kind == "variance":
            self.put(chunk, sum(c.variance(a, G, params) for c, a, G in layers))
        elif p.kind == "covariance":
            self.put(chunk, sum(c.covariance(a, G, params, p.S) for c, a, G in layers))
        else:
            for i, (c, a, G) in enumerate(layers):
                self._joint(i, c, chunk, a, G, params)

    def _joint(self, i: int, c: GroupContraction, chunk: RowChunk, a, G, params) -> None:
        """Contract whole groups at once; keep the pieces of a group split over chunks."""
        p = self.problem
        q, R = p.group_size, p.rows_per_sample
        start, stop = chunk.samples.start, chunk.samples.stop
        whole = start % q == 0 and (stop - start) % q == 0 and chunk.rows == slice(0, R)
        pending = self.pending[i]
        if whole and not pending:
            self.out[start // q : stop // q] += c.joint(a, G, params, q)
            return
        pending.append((chunk, a, G))
        if stop % q or chunk.rows.stop != R:
            return
        group = start // q
        a_full = torch.cat([x for ch, x, _ in pending if ch.rows.start == 0])
        G_full = _assemble(pending, group * q, q, R)
        pending.clear()
        self.out[group : group + 1] += c.joint(a_full, G_full, params, q)


def _assemble(pieces, first: int, q: int, R: int) -> Tensor | OneHot:
    """The directions ``(q, R, ...)`` of one group from its chunks' pieces."""
    G0 = pieces[0][2]
    if isinstance(G0, OneHot):
        index = G0.index.new_zeros(q, R)
        for ch, _, G in pieces:
            index[ch.samples.start - first : ch.samples.stop - first, ch.rows] = G.index
        return OneHot(index, torch.Size((q, R, *G0.shape[2:])), G0.dtype)
    full = G0.new_zeros(q, R, *G0.shape[2:])
    for ch, _, G in pieces:
        full[ch.samples.start - first : ch.samples.stop - first, ch.rows] = G
    return full
