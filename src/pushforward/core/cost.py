"""The cost model: what one unit of work costs, and how many units fit in a chunk.

Every chunked loop of the library — forward-mode tangents, reverse-mode rows, samples, layer
directions, curvature sums — takes its chunk size from :meth:`Budget.chunk`, and every unit's
memory from the functions here, so that one set of formulas decides whether a computation fits
``memory_budget``:

* a model's per-example costs are *measured* once per input signature (:func:`measure_cost`:
  the bytes autograd saves in a one-example forward, the most bytes its tensors hold at once
  without gradients, the output's size, the FLOPs), not guessed from its modules;
* :func:`tangent_bytes` — one forward-mode tangent pushed through some examples;
  :func:`row_bytes` — one reverse-mode row (a P-vector ``J(x_b)^T u``);
  :func:`direction_bytes` — one output direction taken back to the layer outputs (the layer
  pieces of :mod:`pushforward.layers`); :func:`example_bytes` — one example's forward kept
  through a chunk; :func:`product_bytes` — one column of a curvature product through examples;
* :class:`Budget` — the budget, ``settings.chunk_target`` (a chunk uses at most that much even
  under a larger budget) and the caller's ``chunk_size`` cap, turned into chunk sizes; a need
  above the budget raises :class:`~pushforward.MemoryBudgetError`.

The estimates are deliberately on the safe side: the measured peak of a call stays under its
estimate (``tests/test_cost.py`` checks this with PyTorch's allocator statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pushforward.core.errors import MemoryBudgetError
from pushforward.core.inputs import Inputs
from pushforward.core.live_memory import live_peak_bytes
from pushforward.core.settings import settings
from pushforward.core.units import format_bytes

__all__ = [
    "Budget",
    "ChunkPlan",
    "ModelCost",
    "direction_bytes",
    "example_bytes",
    "measure_cost",
    "product_bytes",
    "row_bytes",
    "tangent_bytes",
]


@dataclass(frozen=True)
class ModelCost:
    """Measured per-example costs of one model on one input signature.

    Attributes:
        activation_bytes: bytes autograd saves for backward in a one-example forward, plus the
            output.
        live_bytes: the most bytes a one-example forward without gradients holds at one time
            (:func:`~pushforward.core.live_memory.live_peak_bytes`, the output included): what
            a forward-mode product keeps. At most ``activation_bytes``.
        output_shape: one batch element's output shape (without the batch dimension).
        output_dtype: the output's dtype.
        num_params: P, the selected parameters.
        itemsize: bytes per element of the parameters.
        forward_flops: floating-point operations of a one-example forward (matmuls,
            convolutions and attention as counted by ``torch.utils.flop_counter``; at least
            one operation per saved activation element).
    """

    activation_bytes: int
    output_shape: torch.Size
    output_dtype: torch.dtype
    num_params: int
    itemsize: int
    forward_flops: float
    live_bytes: int

    @property
    def output_numel(self) -> int:
        """Elements of one batch element's output (all its positions and outputs)."""
        return self.output_shape.numel()

    @property
    def output_bytes(self) -> int:
        """Bytes of one batch element's output."""
        return self.output_numel * self.itemsize

    @property
    def param_bytes(self) -> int:
        """Bytes of one flat parameter vector."""
        return self.num_params * self.itemsize


def measure_cost(fm, inputs: Inputs) -> ModelCost:
    """Measure ``fm``'s per-example cost (:class:`ModelCost`) on the first example of ``inputs``.

    The example runs with saved-tensor hooks and a FLOP counter; the result is cached per input
    signature in ``fm.cache``.
    """
    key = inputs.signature()
    found = fm.cache.costs.get(key)
    if found is None:
        found = fm.cache.costs[key] = _measure(fm, inputs)
    return found


def _measure(fm, inputs: Inputs) -> ModelCost:
    from torch.utils.flop_counter import FlopCounterMode

    saved = 0
    seen: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            saved += t.untyped_storage().nbytes()
        return t

    one = inputs.slice(0, 1).detach()
    params = {n: p.detach().requires_grad_(True) for n, p in fm.params(False).items()}
    # parameters, buffers and inputs are not per-example activations
    for t in [*params.values(), *fm.module_tensors(), *one.tensors()]:
        seen.add(t.untyped_storage().data_ptr())
    counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_FORMULAS)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
        out = fm.call(params, one.args, one.kwargs)
    fm.split_shape(out.shape)
    itemsize = next(iter(params.values())).element_size()
    activation_bytes = int(saved) + out.numel() * out.element_size()
    known = [*params.values(), *fm.module_tensors(), *one.tensors()]
    live = live_peak_bytes(lambda: fm.call(params, one.args, one.kwargs), known)
    return ModelCost(
        activation_bytes=activation_bytes,
        output_shape=out.shape[1:],
        output_dtype=out.dtype,
        num_params=fm.num_params,
        itemsize=itemsize,
        forward_flops=float(max(counter.get_total_flops(), activation_bytes // itemsize)),
        live_bytes=activation_bytes if live is None else min(live, activation_bytes),
    )


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of scaled dot-product attention ``softmax(Q K^T) V`` on ``(b, h, s, d)`` shapes.

    Fewer key/value heads than query heads are allowed (grouped-query attention: PyTorch's own
    formula refuses them in some versions).
    """
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (d_q + d_v)


#: The fused attention kernels' FLOP formulas used by :func:`_measure`.
_ATTENTION_FORMULAS = {
    getattr(torch.ops.aten, name): _attention_flops
    for name in (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
}


def tangent_bytes(cost: ModelCost, examples: int, outputs: int = 1, extra_numbers: int = 0) -> int:
    """Working bytes of one forward-mode tangent pushed through ``examples`` examples.

    They are the forward's live tensors with their tangents next to them and the operations'
    temporaries (three times the forward's live peak: a forward-mode product keeps no
    activations for a backward), ``outputs`` output-sized tensors per example (the tangent's
    output and what the caller keeps of it), the tangent itself as a flat vector and as
    per-parameter views copied by ``vmap`` (``2P``), and ``extra_numbers`` more (e.g. a random
    draw of ``r`` numbers).
    """
    per_example = 3 * cost.live_bytes + outputs * cost.output_bytes
    return examples * per_example + (2 * cost.num_params + extra_numbers) * cost.itemsize


def row_bytes(cost: ModelCost, extra: int = 0) -> int:
    """Working bytes of one reverse-mode row ``J(x_b)^T u``.

    They are a backward through one example's activations (their gradients next to them), its
    cotangent, and its P-vector three times (the per-parameter gradients, the flat row and what the
    caller makes of it), plus ``extra`` bytes.
    """
    return 2 * cost.activation_bytes + cost.output_bytes + 3 * cost.param_bytes + extra


def direction_bytes(
    cost: ModelCost, layer_outputs: int = 0, param_rows: int = 0, autograd: bool = True
) -> int:
    """Working bytes of one output direction taken back through one example to its layer outputs.

    They are a backward through the example's activations (their gradients, formed and freed step
    by step: at most about the activations' size at once; none without ``autograd``, a chain
    differentiated by hand), the direction itself twice (at the output and, for a head, at its
    input), the gradients of ``layer_outputs`` layer-output entries and the rows of ``param_rows``
    parameter entries (each twice: formed, then handed on).
    """
    through = cost.activation_bytes if autograd else 0
    return through + 2 * cost.output_bytes + 2 * (layer_outputs + param_rows) * cost.itemsize


def squared_direction_bytes(
    cost: ModelCost,
    layer_outputs: int,
    widest: int,
    group_bytes: int | None,
    rows: int,
    example_rows: int,
) -> tuple[int, int, int]:
    """Working bytes of directions taken back by hand and reduced to their squares.

    The directions' gradients are summed over the rows, squared, as they go back
    (``pushforward.layers.RowSquares``), all rows at once (``group_bytes=None``) or in groups of
    whole examples of about ``group_bytes`` at the widest layer (a CPU's cache; a group holds one
    example at least). At each layer the gradients of a group are alive twice (the one formed and
    the one it is formed from) and once more as a copy of the group, at most ``widest`` entries
    each.

    Args:
        cost: the model's measured cost.
        layer_outputs: entries of the layer outputs in one example (the sums).
        widest: the most entries of a direction's gradient on its way back.
        group_bytes: the groups' size, or ``None``.
        rows: the batch's rows (examples times rows per example): no group is larger.
        example_rows: the rows of one example: no group is smaller.

    Returns:
        ``(per direction, per example, fixed)``: the direction itself twice (as in
        :func:`direction_bytes`) and, all rows at once, its gradients; the sums, and an example's
        share of a group smaller than ``group_bytes`` (all ``rows`` in one); a full group's
        gradients. Either way an upper bound for any number of examples, equal for ``rows``.
    """
    entry = widest * cost.itemsize
    per_direction = 2 * cost.output_bytes
    if group_bytes is None:
        return per_direction + 3 * entry, layer_outputs * cost.itemsize, 0
    group = max(group_bytes, example_rows * entry)
    if rows * entry <= group:  # one group: as many as the examples (more examples, a larger one)
        return per_direction, (layer_outputs + 3 * example_rows * widest) * cost.itemsize, 0
    return per_direction, layer_outputs * cost.itemsize, 3 * group


def example_bytes(cost: ModelCost) -> int:
    """Bytes one example's forward keeps while its chunk's directions go back.

    They are its activations and two output-sized tensors (the outputs and what the directions are
    made from).
    """
    return cost.activation_bytes + 2 * cost.output_bytes


def product_bytes(cost: ModelCost) -> tuple[int, int]:
    """Bytes of one column of ``J^T H J v``: ``(per example and column, per column)``.

    Per example and column: its forward-mode activations next to the primal ones and the backward
    through them, three output-sized tensors; per column: the tangent, the gradient and the result
    (``P`` entries each).
    """
    per_pair = 3 * cost.activation_bytes + 3 * cost.output_bytes
    return per_pair, 3 * cost.param_bytes


@dataclass(frozen=True)
class ChunkPlan:
    """A chunked computation of ``units`` units.

    It records what the computation holds throughout, what one unit takes, and how many units go in
    a chunk.

    Attributes:
        held: bytes held through the computation (its result, its inputs' copies).
        per_unit: bytes of one unit of work.
        chunk: units per chunk.
        units: units in all.
    """

    held: int
    per_unit: int
    chunk: int
    units: int

    @property
    def memory(self) -> int:
        """The estimated peak: what is held and one chunk."""
        return self.held + min(self.chunk, max(self.units, 1)) * self.per_unit


@dataclass(frozen=True)
class Budget:
    """A memory budget, and the chunk sizes it allows.

    Attributes:
        total: the budget in bytes: the most a call may allocate, its result included.
        chunk_target: bytes one chunk may use even when the budget allows more (the current
            settings' target for the device: ``settings.chunk_target`` on a CPU,
            ``settings.gpu_chunk_target`` elsewhere); ``None``: only the budget limits chunks.
        cap: the caller's ``chunk_size`` (at most this many units per chunk), or ``None``.
        device: the device type the chunks run on.
    """

    total: int
    chunk_target: int | None
    cap: int | None = None
    device: str = "cpu"

    @classmethod
    def of(
        cls, total: int, cap: int | None = None, device: torch.device | str | None = None
    ) -> Budget:
        """A budget of ``total`` bytes with the current settings' chunk target for ``device``."""
        kind = "cpu" if device is None else torch.device(device).type
        return cls(total, settings.current().target_for(kind), cap, kind)

    def chunk(
        self,
        per_unit: int,
        held: int = 0,
        at_most: int | None = None,
        at_least: int | None = None,
    ) -> int:
        """Units per chunk: as many ``per_unit``-byte units as fit next to ``held`` bytes.

        The chunk also stays within the chunk target, the cap and ``at_most``; it is at least 1
        (:meth:`peak` tells whether even that fits), and at least ``at_least`` when the budget (not
        the target) allows them (one example's rows: fewer would repeat its forward pass).
        """
        room = self.total - held
        target = room if self.chunk_target is None else min(room, self.chunk_target)
        n = max(1, target // max(per_unit, 1))
        if at_least is not None:
            n = max(n, min(at_least, room // max(per_unit, 1)))
        for limit in (self.cap, at_most):
            if limit is not None:
                n = min(n, max(1, limit))
        return int(max(n, 1))

    def plan(self, per_unit: int, held: int, units: int, what: str) -> ChunkPlan:
        """The chunks of ``units`` units of ``per_unit`` bytes next to ``held`` bytes.

        Raises:
            pushforward.MemoryBudgetError: even the smallest chunks do not fit (:meth:`require`,
                naming ``what``).
        """
        plan = ChunkPlan(held, per_unit, self.chunk(per_unit, held, at_most=max(units, 1)), units)
        self.require(plan.memory, what)
        return plan

    @staticmethod
    def peak(held: int, chunk: int, per_unit: int) -> int:
        """Estimated peak of a chunked computation: what it holds plus one chunk."""
        return held + chunk * per_unit

    def require(self, need: int, what: str) -> None:
        """Raise :class:`MemoryBudgetError` when ``need`` bytes exceed the budget."""
        if need > self.total:
            raise MemoryBudgetError(
                f"{what} needs about {format_bytes(need)} even with its smallest chunks, over the "
                f"memory budget of {format_bytes(self.total)}; raise memory_budget",
                self.total,
                need,
            )

    def describe(self) -> str:
        """One line for ``print(plan)``: the budget and the chunk sizes it allows on its device."""
        cap = "" if self.cap is None else f", chunk_size <= {self.cap:,}"
        if self.chunk_target is None:
            chunks = f"chunks as large as it allows on {self.device}"
        else:
            size = format_bytes(min(self.total, self.chunk_target))
            chunks = f"chunks up to {size} on {self.device}"
        return f"memory budget {format_bytes(self.total)} ({chunks}{cap})"
