"""``structured``: contract the covariance inside Linear/Conv/Embedding layers.

The layer pieces of every chunk — each matched layer's input ``a`` and its output directions
``G = df/dz`` for the chunk's one-hot rows — come from the one producer of layer pieces
(``pushforward.layers.produce``: a hand-differentiated chain for a plain ``nn.Sequential``,
one batched backward, ``vmap`` over examples, a loop); each layer's Jacobian is ``G ⊗ a`` and
its covariance block is contracted in closed form or from the layer's own gradient rows (see
``pushforward.engine.layer_contractions``). No per-example gradient w.r.t. all P parameters
is ever formed. Parameters the analysis cannot prove to be a layer's weight or bias (and
covariance groups spanning several layers) go through the generic strategies on a sub-model,
and the two uncorrelated contributions are added.

**The head.** When a linear layer's output *is* the model output, its own ``G`` is the one-hot
direction and the backward starts at its input; when every posterior parameter sits on that
head (last-layer Laplace) no backward runs at all — one batched forward gives the head's inputs
(the ``last_layer`` strategy name means this).

**Proof per call.** The layer structure is traced once per input signature, on one example;
every call re-proves what it relies on (see ``pushforward.layers.pieces``). A failed proof
raises ``pushforward.layers.StructureError`` after the producer's own ladder is
exhausted, and ``auto`` falls through to the next strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk, progress_bar, row_chunks
from pushforward.core.cost import direction_bytes, example_bytes
from pushforward.core.functional_model import FunctionalModel
from pushforward.covariance.block_diagonal import BlockDiagonal
from pushforward.covariance.operator import ParamGroup
from pushforward.engine.contraction import ChunkedResult
from pushforward.engine.layer_contractions import GroupContraction, contraction_for, fused
from pushforward.engine.problem import Problem
from pushforward.engine.strategies.strategy import (
    Estimate,
    NotApplicable,
    Strategy,
    SubPlanner,
    traffic,
)
from pushforward.layers import (
    BY_HAND,
    RUNGS,
    LayerStructure,
    OneHot,
    OneHotRows,
    first_rung,
    layer_structure,
    produce,
)

__all__ = ["LastLayerStrategy", "StructuredStrategy"]


@dataclass(frozen=True)
class Split:
    """The split of a problem into layer-structured groups and a generic remainder.

    Attributes:
        structure: where the posterior parameters are used (traced on one example).
        contractions: one per covariance group that sits on one matched layer.
        generic: the plan for the other parameters (``None``: there are none).
        head_only: every contraction is on the lined-up head and nothing is generic: one
            forward pass.
    """

    structure: LayerStructure
    contractions: tuple[GroupContraction, ...]
    generic: object | None
    head_only: bool

    @property
    def analysis(self):
        return self.structure.analysis

    @property
    def head(self):
        return self.structure.head

    @property
    def needed(self) -> frozenset[int]:
        """The layer calls whose directions the contractions use."""
        return frozenset(c.call.index for c in self.contractions)

    @property
    def generic_names(self) -> tuple[str, ...]:
        """The parameters that go through the generic sub-plan."""
        return () if self.generic is None else self.generic.problem.fm.param_names


def _split(p: Problem, subplan: SubPlanner) -> Split:
    structure = layer_structure(p.fm, p.inputs)
    analysis = structure.analysis
    joint = p.kind == "joint"
    contractions, generic = [], []
    for group in p.cov.param_groups():
        calls = {analysis.matched[n].index for n in group.names if n in analysis.matched}
        if len(calls) == 1 and all(n in analysis.matched for n in group.names):
            call = analysis.calls[calls.pop()]
            c = contraction_for(call, group.names, group.operator, joint)
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
    head = structure.head
    sub = _generic_plan(p, generic, subplan) if generic else None
    head_only = head is not None and sub is None and all(c.call is head for c in contractions)
    return Split(structure, tuple(fused(contractions)), sub, head_only)


def _generic_plan(p: Problem, groups: list[ParamGroup], subplan: SubPlanner):
    """The generic strategies' plan for the parameters outside the matched layers."""
    fm = p.fm
    names = [n for g in groups for n in g.names]
    sub_fm = FunctionalModel(
        fm.module, params=names, output_dims=fm.output_dims, output_fn=fm.output_fn
    )
    sub_cov = BlockDiagonal({tuple(g.names): g.operator for g in groups}).bind(sub_fm.layout)
    return subplan(p.restricted(sub_fm, sub_cov), ("structured",))


def directions(p: Problem) -> OneHotRows:
    """The problem's rows as output directions: one unit row per asked-for output."""
    return OneHotRows(p.row_index, p.rows_per_sample, p.sample_shape, p.dtype)


class StructuredStrategy(Strategy):
    """Contract the covariance inside matched layers from their inputs and output directions.

    Parameters outside the matched layers go through a generic sub-plan (module docstring).
    """

    name = "structured"

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        """Cost and memory of the layer pieces' pass and the contractions, plus the sub-plan's.

        The chunk size is the number of rows (output directions) taken back at once;
        ``state`` is the problem's ``Split``. Raises :class:`NotApplicable` when no covariance
        group is a single matched layer's weight or bias.
        """
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
            rung = first_rung(p.fm, split.structure, p.inputs, differentiable=p.differentiable)
            z = sum(math.prod(c.call.output_shape) for c in split.contractions)
            per_row = direction_bytes(p.cost, z, autograd=rung not in BY_HAND)
            per_example = example_bytes(p.cost)
            # a backward to the layer outputs only: no parameter gradients (about one forward)
            flops = p.B * p.cost.forward_flops + rows * p.cost.forward_flops
            passes = (
                f"{rows:,} backward directions through {len(split.contractions)} layer groups "
                f"({rung}: {RUNGS[rung]})"
            )
        for c in split.contractions:
            z = math.prod(c.call.output_shape)
            size = sum(math.prod(p.fm.param_shapes[n]) for n in c.names)
            if c.closed_form:
                flops += rows * 4 * z + p.B * 2 * size
            else:
                positions = c.call.geometry.positions
                flops += rows * (2 * size * positions + c.op.matmul_flops() + traffic() * size)
                fixed = c.op.workspace_bytes(0)  # what the block caches (a factor), once
                per_row += 2 * size * p.itemsize + c.op.workspace_bytes(1) - fixed
                held += fixed
        if p.kind == "joint":
            q = p.group_size * p.rows_per_sample
            flops += rows * q * 4 * len(split.contractions)
            # a group's layer inputs and directions are kept until it is complete
            held += p.group_size * per_row * p.rows_per_sample // 2
        chunk = p.budget.chunk(
            per_row + per_example // max(p.rows_per_sample, 1),
            held,
            rows,
            at_least=p.rows_per_sample,
        )
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
        # chunks never span examples; one holds a single example below two examples' rows
        alone = split.generic is None and p.kind != "joint"
        alone = alone and (p.B == 1 or chunk < 2 * p.rows_per_sample)
        return Estimate(self.name, flops, memory, int(chunk), passes, state=split, alone=alone)

    def run(self, problem: Problem, estimate: Estimate) -> tuple[Tensor, Tensor]:
        """``(f, result)``: each chunk's layer pieces contracted, plus the generic sub-plan's.

        The result is in canonical layout; a failed proof of the layer structure raises
        ``StructureError`` once the producer's ladder is exhausted.
        """
        p = problem
        split: Split = estimate.state
        params = p.fm.params(p.differentiable)
        acc = _Accumulator(p, split.contractions)
        rows = directions(p)
        q = p.group_size if p.kind == "joint" else 1
        chunks = row_chunks(p.B, p.rows_per_sample, estimate.chunk_size, q)
        check_chunks = p.check_chunks
        if check_chunks and split.generic is not None:  # its strategy runs the whole batch
            p.fm.check_examples(p.inputs)
            check_chunks = False
        for chunk in progress_bar(chunks, p.progress, "structured directions", total=len(chunks)):
            sub = p.inputs.slice(chunk.samples.start, chunk.samples.stop)
            pieces = produce(
                p.fm,
                split.structure,
                params,
                sub,
                chunk,
                rows,
                needed=split.needed,
                differentiable=p.differentiable,
            )
            # examples run together: do they interact? (not in a plain chain, see the pass's)
            if check_chunks and sub.batch_size > 1 and pieces.rung != "chain":
                p.fm.check_examples(sub, outputs=pieces.f)
            pieces = pieces.raised(p.compute_dtype)
            layers = [
                (c, pieces.a[c.call.index], pieces.G[c.call.index]) for c in split.contractions
            ]
            acc.add(chunk, pieces.f, layers, params)
        f, result = acc.result()
        if split.generic is not None:
            generic = replace(split.generic, problem=split.generic.problem.rebased(p))
            _, rest = generic.run_canonical()
            result = result + rest
        return f, result


class LastLayerStrategy(StructuredStrategy):
    """The structured strategy's one-forward case, by name.

    Every posterior parameter is the weight or bias of the linear layer whose output is the
    model's output (last-layer Laplace). Refuses (saying why) any other problem.
    """

    name = "last_layer"

    def estimate(self, problem: Problem, subplan: SubPlanner) -> Estimate:
        """The structured strategy's estimate, for a posterior on the head alone.

        Raises :class:`NotApplicable` (saying why) unless every posterior parameter sits on
        the linear layer whose output is the model's output.
        """
        _require_head_only(problem)
        est = super().estimate(problem, subplan)
        if not est.state.head_only:
            raise NotApplicable("the head's positions do not line up with the model's outputs")
        return replace(est, strategy=self.name)


def _require_head_only(p: Problem) -> None:
    """Raise :class:`NotApplicable` unless every posterior parameter sits on the head."""
    structure = layer_structure(p.fm, p.inputs)
    analysis = structure.analysis
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
    if structure.head is None or structure.head.index not in calls:
        raise NotApplicable(
            "the layer of the posterior's parameters is not the model output (the model "
            "transforms its output)"
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
