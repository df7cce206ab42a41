"""One pass over the data: the layer pieces of the curvature's rows, and the plan that says how.

A :class:`Consumer` (the diagonal, K-FAC, the dense matrix) says what it holds and what it
forms per row; :class:`CurvaturePass` goes over the batches, takes each batch's rows from the
likelihood (:class:`~pushforward.curvature.directions.LikelihoodRows`), sizes its chunks with
the cost model (:mod:`pushforward.core.cost`) within the memory budget, and hands the consumer
the pieces of every chunk from the one producer of layer pieces
(:func:`pushforward.layers.produce`). :meth:`CurvaturePass.plan` explains a batch's pass —
which rung of the producer runs and why, chunk sizes, estimated work and peak — as
``print(ggn.plan("diagonal"))`` shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pushforward.core.chunking import progress_bar, row_chunks
from pushforward.core.cost import (
    Budget,
    ModelCost,
    direction_bytes,
    example_bytes,
    measure_cost,
    squared_direction_bytes,
)
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.heap import settle_heap
from pushforward.core.inputs import Inputs
from pushforward.core.precision import accumulation_dtype
from pushforward.core.units import format_bytes
from pushforward.curvature.data import Batch
from pushforward.curvature.directions import LikelihoodRows, RowKind, draw_noise
from pushforward.curvature.likelihoods import Likelihood
from pushforward.layers import (
    BY_HAND,
    RUNGS,
    SQUARES_GROUP_BYTES,
    Directions,
    LayerStructure,
    Pieces,
    StructureError,
    first_rung,
    layer_structure,
    produce,
    squares_apply,
)

__all__ = ["JOINED_EXAMPLES", "Consumer", "CurvaturePass", "PassPlan", "joins_batches"]

#: At most this many examples of consecutive batches run together (:meth:`CurvaturePass.joined`).
JOINED_EXAMPLES = 2**16


def joins_batches(device: torch.device) -> bool:
    """Whether consecutive batches run together on ``device``: on any but the CPU.

    See :meth:`CurvaturePass.joined`.
    """
    return device.type != "cpu"


def _chunk_rows(
    budget: Budget, per_row: int, per_example: int, R: int, held: int, at_most: int | None = None
) -> int:
    """Rows per chunk: as many as ``budget`` takes next to ``held``, an example's ``R`` at least.

    Each row costs ``per_row`` and its share of its example's ``per_example``.
    """
    return budget.chunk(per_row + per_example // max(R, 1), held, at_most, at_least=R)


def _joinable(first: Batch, batch: Batch) -> bool:
    """``batch`` can be concatenated after ``first``: the same input signature and targets."""
    a, b = first.y, batch.y
    same_targets = (a.shape[1:], a.dtype, a.device) == (b.shape[1:], b.dtype, b.device)
    return same_targets and batch.inputs.signature() == first.inputs.signature()


def _joined(group: list[Batch]) -> Batch:
    """The batches of ``group`` as one (its first's index)."""
    if len(group) == 1:
        return group[0]
    first = group[0].inputs
    parts = zip(*(b.inputs.tensors() for b in group), strict=True)
    args, kwargs = first.with_tensors([torch.cat(p) for p in parts])
    total = sum(b.inputs.batch_size for b in group)
    y = torch.cat([b.y for b in group])
    return Batch(group[0].index, Inputs(args, kwargs, total), y)


class Consumer(Protocol):
    """What a pass feeds: a curvature's running sums.

    Attributes:
        what: names the computation in plans and errors.
        structured: the layer structure is used (else every parameter's per-example rows).
        allow_unstructured: an example that does not run the traced layers may give every
            parameter's rows instead (the result does not depend on the structure).
        squares: of a layer applied once per example, only the squares of its directions summed
            over the rows are needed (:class:`~pushforward.layers.RowSquares` where a rung forms
            them on the way back).
    """

    what: str
    structured: bool
    allow_unstructured: bool
    squares: bool

    def held_bytes(self) -> int:
        """Bytes held through the pass (the sums)."""

    def row_bytes(self, structure: LayerStructure | None, cost: ModelCost) -> int:
        """Bytes the consumer forms per row of a chunk, beyond the pieces."""

    def add(self, pieces: Pieces) -> None:
        """Fold in one chunk's pieces."""


@dataclass(frozen=True)
class PassPlan:
    """How a pass runs over a batch.

    Attributes:
        what: the computation.
        producer: the producer's first rung and why.
        examples: the batch's examples.
        rows: rows per example.
        chunk: rows per chunk.
        held: bytes held through the pass.
        per_row: bytes per row of a chunk.
        per_example: bytes per example of a chunk.
        flops: estimated work for the batch (FLOP).
        budget: the memory budget.
    """

    what: str
    producer: str
    examples: int
    rows: int
    chunk: int
    held: int
    per_row: int
    per_example: int
    flops: float
    budget: Budget

    @property
    def chunks(self) -> int:
        """Chunks per batch, ``ceil(examples * rows / chunk)``."""
        total = self.examples * self.rows
        return math.ceil(total / self.chunk) if total else 0

    @property
    def memory(self) -> int:
        """Estimated peak memory of the pass in bytes (what it holds, and one chunk)."""
        examples = min(self.examples, max(1, math.ceil(self.chunk / max(self.rows, 1))))
        return self.held + self.chunk * self.per_row + examples * self.per_example

    def __str__(self) -> str:
        return "\n".join(
            [
                f"Pass: {self.what} over batches of {self.examples:,} examples x "
                f"{self.rows:,} rows",
                f"  {self.budget.describe()}",
                f"  -> layer pieces by {self.producer}",
                f"     {self.chunks:,} chunks of up to {self.chunk:,} rows per batch; est. "
                f"{self.flops:.2e} FLOP, {format_bytes(self.memory)} per batch",
            ]
        )

    __repr__ = __str__


class CurvaturePass:
    """Passes of ``likelihood``'s rows ``kind`` over data, feeding a :class:`Consumer`.

    Args:
        fm: the model; the curvature is over its selected parameters.
        likelihood: the loss.
        kind: which rows each example gets.
        budget: the memory budget in bytes.
        progress: a progress bar over the batches.
    """

    def __init__(
        self,
        fm: FunctionalModel,
        likelihood: Likelihood,
        kind: RowKind,
        *,
        budget: int,
        progress: bool = False,
    ) -> None:
        self.fm, self.likelihood, self.kind = fm, likelihood, kind
        self.budget, self.progress = budget, progress
        #: per consumer, input signature, batch size and rows: the consumer (kept alive, so its
        #: id is not reused), a batch's plan, its layer structure and its generic parameters —
        #: the same for every such batch of the pass
        self._plans: dict[tuple, tuple] = {}
        self._params: dict[str, Tensor] | None = None  # read once per pass

    def output_split(self, cost: ModelCost) -> tuple[int, int]:
        """``(n, K)``: positions and outputs per example."""
        shape = cost.output_shape
        K = math.prod(shape[len(shape) - self.fm.output_dims :])
        return shape.numel() // max(K, 1), K

    def _batch(self, batch: Batch, consumer: Consumer, rows: Directions | None = None):
        """``(plan, inputs, structure, rows, generic)`` of one batch.

        Its rows are the likelihood's, unless given.
        """
        fm, lik = self.fm, self.likelihood
        # a signature's first batch is checked now; later ones against the pass's own forward
        inputs = fm.prepare(batch.inputs, check=False)
        if not fm.checked_before(inputs):
            fm.check_examples(inputs)
        inputs = inputs.detach()
        cost = measure_cost(fm, inputs)
        if rows is None:
            n, K = self.output_split(cost)
            B = inputs.batch_size
            y = lik.prepare_targets(batch.y, torch.Size((B, n, K)))
            noise = draw_noise(
                lik, self.kind, batch.index, B, n, K, cost.output_dtype, inputs.device
            )
            rows = LikelihoodRows(lik, self.kind, y, noise, cost.output_shape, n, K)
        key = (id(consumer), inputs.signature(), inputs.batch_size, rows.rows)
        planned = self._plans.get(key)
        if planned is None:
            planned = self._plans[key] = (consumer, *self._plan(consumer, inputs, cost, rows.rows))
        _, plan, structure, generic = planned
        return plan, inputs, structure, rows, generic

    def _plan(
        self, consumer: Consumer, inputs: Inputs, cost: ModelCost, R: int
    ) -> tuple[PassPlan, LayerStructure | None, tuple[str, ...]]:
        """``(plan, structure, generic)`` of a batch of ``inputs``' size and signature."""
        fm = self.fm
        structure = layer_structure(fm, inputs) if consumer.structured else None
        B = inputs.batch_size
        generic = fm.param_names if structure is None else structure.generic(fm.param_names)
        shapes = fm.param_shapes
        generic_numel = sum(math.prod(shapes[name]) for name in generic)
        z = 0 if structure is None else structure.z_numel()
        rung = first_rung(
            fm,
            structure,
            inputs,
            generic=bool(generic),
            allow_unstructured=consumer.allow_unstructured,
        )
        per_example = example_bytes(cost)
        held = consumer.held_bytes()
        producer = f"{rung}: {RUNGS[rung]}"
        if consumer.squares and rung in BY_HAND and squares_apply(fm.dtype):
            # on a CPU in cache-sized groups of examples (see produce)
            group = SQUARES_GROUP_BYTES if inputs.device.type == "cpu" else None
            per_row, squares, fixed = squared_direction_bytes(
                cost, z, structure.widest(), group, B * R, R
            )
            per_example += squares
            held += fixed
            producer += "; the directions reduced to their squares on the way back"
        else:
            per_row = direction_bytes(cost, z, generic_numel, autograd=rung not in BY_HAND)
        per_row += consumer.row_bytes(structure, cost)
        budget = Budget.of(self.budget, device=inputs.device)
        chunk = _chunk_rows(budget, per_row, per_example, R, held, max(B * R, 1))
        flops = B * cost.forward_flops * (1 + R)  # one forward, a backward per row (~ forward)
        plan = PassPlan(
            consumer.what, producer, B, R, chunk, held, per_row, per_example, flops, budget
        )
        return plan, structure, tuple(generic)

    def plan(self, batch: Batch, consumer: Consumer) -> PassPlan:
        """The plan of ``consumer``'s pass over ``batch``."""
        return self._batch(batch, consumer)[0]

    def first_plan(self, data: Iterable[Batch], consumer: Consumer) -> PassPlan | None:
        """The plan of the first batch ``consumer``'s pass over ``data`` runs (``None``: none).

        On a GPU, that batch may be several of the data's batches run together
        (:meth:`joined`).
        """
        first = next(iter(self.joined(data, consumer)), None)
        return None if first is None else self.plan(first, consumer)

    def run(self, data: Iterable[Batch], consumer: Consumer) -> None:
        """Feed ``consumer`` the pieces of every chunk of every batch, in order."""
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:  # the loader does not know its length
            total = None
        batches = progress_bar(data, self.progress, f"{consumer.what}: batches", total=total)
        for batch in self.joined(batches, consumer):
            self.run_batch(batch, consumer)

    def joined(self, batches: Iterable[Batch], consumer: Consumer) -> Iterator[Batch]:
        """``batches``, consecutive ones run together where that saves per-batch host work.

        On a GPU, each batch costs host work (planning, the producer's hooks and ``vmap``, the
        coupling check, kernel launches) comparable to its device work for small models. There,
        consecutive batches of one input signature are concatenated as long as their rows still
        run as one chunk of the memory budget (at most :data:`JOINED_EXAMPLES` examples). The sums
        are the same, up to rounding. Monte Carlo rows are drawn per batch and are not joined.
        A CPU takes its batches as they come: it wants cache-sized chunks.
        """
        if not joins_batches(self.fm.device) or self.kind.kind == "mc":
            yield from batches
            return
        group: list[Batch] = []
        room = 0
        for batch in batches:
            B = batch.inputs.batch_size
            if group and (room < B or not _joinable(group[0], batch)):
                yield _joined(group)
                group = []
            if not group:
                room = min(JOINED_EXAMPLES, self._examples_per_chunk(batch, consumer))
            group.append(batch)
            room -= B
        if group:
            yield _joined(group)

    def _examples_per_chunk(self, batch: Batch, consumer: Consumer) -> int:
        """The examples whose rows the memory budget takes as one chunk, by ``batch``'s plan."""
        p = self.plan(batch, consumer)
        return _chunk_rows(p.budget, p.per_row, p.per_example, p.rows, p.held) // max(p.rows, 1)

    def run_batch(self, batch: Batch, consumer: Consumer, rows: Directions | None = None) -> None:
        """Feed ``consumer`` the pieces of every chunk of ``batch`` for ``rows``.

        ``rows`` defaults to the likelihood's rows of the batch.
        """
        settle_heap()
        fm = self.fm
        if self._params is None:
            self._params = fm.params(False)
        params = self._params
        dtype = accumulation_dtype(fm.dtype)  # sums over the data in float32 at least
        plan, inputs, structure, rows, generic = self._batch(batch, consumer, rows)
        plan.budget.require(plan.memory, consumer.what)
        for chunk in row_chunks(inputs.batch_size, rows.rows, plan.chunk):
            sub = inputs.slice(chunk.samples.start, chunk.samples.stop)
            try:
                with torch.no_grad():
                    pieces = produce(
                        fm,
                        structure,
                        params,
                        sub,
                        chunk,
                        rows,
                        generic=generic,
                        allow_unstructured=consumer.allow_unstructured,
                        squares=consumer.squares,
                    )
            except StructureError as err:
                raise StructureError(
                    f"{consumer.what} needs every example to run the traced layers: {err}"
                ) from err
            # the examples that ran together: do they interact? (a plain chain of linear layers
            # and elementwise activations in eval mode cannot: each example runs on its own row)
            if sub.batch_size > 1 and pieces.rung != "chain":
                fm.check_examples(sub, outputs=pieces.f)
            consumer.add(pieces.raised(dtype))
