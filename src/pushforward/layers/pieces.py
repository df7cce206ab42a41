"""The one producer of layer pieces: per chunk of examples, each layer's input and directions.

Per chunk of examples, :func:`produce` gives each layer's input ``a`` and output directions
``G``, and the rows of the parameters on no layer.

For a layer ``z = op(a, W, b)`` the Jacobian of example ``n``'s output in direction ``u`` w.r.t.
the layer's parameters is determined by ``a_n`` and ``G_n = J_z^T u``: every layer-aware
computation of the library — the functional variance's closed forms, the curvature's diagonal
and K-FAC — is written against these *pieces*, and :func:`produce` is the only code that makes
them. It takes a chunk of examples, the rows of its ``pushforward.layers.directions.Directions``
(one-hot rows for variances, a likelihood's rows for curvature), which layer calls need their
``G`` and which parameters need per-example rows (``generic``: those on no matched layer), and
runs the first rung of its ladder that can (one ``pushforward.core.fallback.Ladder``):

1. ``chain`` — a plain ``nn.Sequential`` of linear layers and elementwise activations is
   differentiated by hand (``pushforward.layers.chain``): one forward on the chunk, one
   product with each weight for all rows of all examples;
2. ``traced chain`` — the model's forward (any module) reads as a chain of its linear layers
   and elementwise activations in the autograd graph of the chunk's own forward
   (``pushforward.layers.traced_chain``): that forward, then the rows back by hand as for a
   chain;
3. ``batched`` — every matched call leads with the batch dimension: one plain batched forward
   with a zero *probe* on each layer's output, then one batched backward
   (``is_grads_batched``) for all rows of all examples: examples are independent (checked when
   the inputs are prepared), so example ``b``'s probe gradient is its own ``G_b``;
4. ``vmapped`` — the forward under ``vmap`` over examples (value reads in Python control flow
   answered per group of examples that agree, ``pushforward.core.branching.vmap_examples``):
   one batched backward when no per-example parameter rows are asked, else ``vjp`` per example
   with all its rows at once;
5. ``loop`` — example by example, one plain backward per row (no transform at all);
6. with ``allow_unstructured``: the per-example rows of *every* parameter (``vmapped``, then
   ``loop``), for consumers that accept them (a diagonal) when an example does not run the
   traced layers.

**The head.** When the model's output is a lined-up linear head's output (same memory), its
``G`` is the pass's own rows (a ``pushforward.layers.directions.OneHot`` for unit rows)
and the backward starts at the head's input with the rows times its weight — it never goes
through a vocabulary-sized head; when only the head's ``G`` is needed, no backward runs at all.
A *frozen* linear head (no posterior parameter: a LoRA language model's vocabulary projection)
whose output reaches the model's output through one-input operations only (the logits at chosen
positions and tokens) is crossed the same way on the batched rung: the rows are taken to the
head's output, multiplied by its weight only at the positions they touch, and the backward
starts at its input.

**Checked, never trusted.** Each rung proves what it relies on (the tap raises when a matched
layer runs twice, not at all, or its parameter is used elsewhere; the head shortcut checks the
output is the head's), and every shape a rung returns is checked against what one example's
trace says: a transform whose batching rule hands back a wrong lead (PyTorch's ``prelu``
backward under nested ``vmap``) is a failure of that rung, and the next one runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from torch.func import vjp, vmap

from pushforward.core.branching import vmap_examples
from pushforward.core.chunking import RowChunk
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel, module_lock
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import transform_kernels
from pushforward.core.precision import accumulation_dtype, upcast
from pushforward.layers.chain import Chain, find_chain, rows_back, square_sums_back
from pushforward.layers.directions import Directions, OneHot, RowSquares
from pushforward.layers.structure import LayerStructure
from pushforward.layers.traced_chain import read_chain
from pushforward.layers.tracing import (
    LayerCall,
    LayerTap,
    LinearCall,
    StructureError,
    is_same_memory,
)

__all__ = [
    "BY_HAND",
    "RUNGS",
    "SQUARES_GROUP_BYTES",
    "Pieces",
    "first_rung",
    "produce",
    "rungs",
    "squares_apply",
    "unit_rows",
]

#: The rungs, fastest first (see the module docstring), and what each is (for plans).
RUNGS = {
    "chain": "a plain chain of linear layers and activations, differentiated by hand",
    "traced chain": "the forward read as a chain of linear layers and activations in its autograd "
    "graph, differentiated by hand",
    "batched": "one batched forward and one batched backward for all directions",
    "vmapped": "vmap over examples (a layer does not lead with the batch dimension, or "
    "parameters on no layer need per-example rows)",
    "loop": "a loop over examples",
    "vmapped (all rows)": "per-example rows of every parameter (vmap over examples)",
    "loop (all rows)": "per-example rows of every parameter (a loop over examples)",
}
#: The rungs that take the rows back by hand (no autograd backward).
BY_HAND = frozenset({"chain", "traced chain"})
#: On a CPU, directions reduced to their row squares go back in groups of whole examples whose
#: rows take at most this many bytes at the widest layer (half of a server core's 1 MiB L2 cache:
#: a group, the activations' saved values and the sums stay near it); elsewhere all rows at once.
SQUARES_GROUP_BYTES = 512 * 2**10


@dataclass
class Pieces:
    """One chunk's pieces.

    Attributes:
        chunk: the examples (``chunk.samples`` of the batch) and rows.
        f: outputs ``(b, *f_b)``.
        calls: the layer calls whose pieces are here (none from an unstructured rung).
        a: per call, its input ``(b, *a_n)``.
        G: per call, its output directions ``(b, r, *z_n)`` (a :class:`OneHot` for unit rows
            at the head, :class:`RowSquares` where only their squares were asked for and a rung
            formed them on the way), ``None`` where not asked for.
        rows: per-example rows ``(b, r, *shape)`` of the parameters on no layer call.
        rung: the rung that made them.
    """

    chunk: RowChunk
    f: Tensor
    calls: tuple[LayerCall, ...]
    a: list[Tensor]
    G: list[Tensor | OneHot | RowSquares | None]
    rows: dict[str, Tensor] = field(default_factory=dict)
    rung: str = ""

    @property
    def first(self) -> bool:
        """The chunk holds its examples' first rows (per-example sums are counted once)."""
        return self.chunk.rows.start == 0

    @property
    def examples(self) -> int:
        """The number of examples ``b`` in the chunk."""
        return self.chunk.samples.stop - self.chunk.samples.start

    def layers(self):
        """``(call, a, G)`` of every call whose ``G`` is here."""
        return [
            (c, a, G) for c, a, G in zip(self.calls, self.a, self.G, strict=True) if G is not None
        ]

    def raised(self, dtype: torch.dtype) -> Pieces:
        """The pieces in the accumulation dtype ``dtype`` (``pushforward.core.precision``).

        Floating inputs, directions and rows are raised, token ids kept as they are; ``self``
        when nothing changes.
        """
        G = [G.values if isinstance(G, RowSquares) else G for G in self.G if G is not None]
        pieces = [*self.a, *G, *self.rows.values()]
        if all(p.dtype == dtype or not p.dtype.is_floating_point for p in pieces):
            return self
        return replace(
            self,
            a=[_raised(a, dtype) for a in self.a],
            G=[None if G is None else _raised(G, dtype) for G in self.G],
            rows={n: _raised(r, dtype) for n, r in self.rows.items()},
        )


def _raised(
    piece: Tensor | OneHot | RowSquares, dtype: torch.dtype
) -> Tensor | OneHot | RowSquares:
    if isinstance(piece, OneHot):
        return piece if piece.dtype == dtype else OneHot(piece.index, piece.shape, dtype)
    if isinstance(piece, RowSquares):  # formed in the accumulation dtype (see produce)
        return piece
    return upcast(piece, dtype) if piece.dtype.is_floating_point else piece


@dataclass(frozen=True)
class _Job:
    """Everything one rung needs (see :func:`produce`)."""

    fm: FunctionalModel
    structure: LayerStructure | None
    params: dict[str, Tensor]
    inputs: Inputs
    chunk: RowChunk
    directions: Directions
    generic: tuple[str, ...]
    needed: frozenset[int]
    differentiable: bool
    chain: Chain | None = None
    squares: bool = False  # the directions' row squares are asked for (see produce)

    @property
    def b(self) -> int:
        return self.inputs.batch_size

    @property
    def r(self) -> int:
        return self.chunk.rows.stop - self.chunk.rows.start

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def per(self) -> tuple[Tensor, ...]:
        return self.directions.per_example(self.chunk)

    def cotangents(self, f: Tensor, per: tuple[Tensor, ...]) -> Tensor:
        """``(b, r, *f_b)`` rows for outputs ``f (b, *f_b)``."""
        return self.directions.dense(f, self.chunk.rows, *per)

    def head(self) -> LayerCall | None:
        s = self.structure
        return None if s is None else s.head

    def square_group(self) -> int | None:
        """Rows per group (of whole examples) for directions reduced to their squares, else ``None``.

        On a CPU the groups fit :data:`SQUARES_GROUP_BYTES` at the widest layer; elsewhere
        (a GPU wants large kernels) all rows go at once.
        """
        if not self.squares:
            return None
        if self.inputs.device.type != "cpu":
            return max(self.b * self.r, 1)
        row = self.structure.widest() * self.dtype.itemsize
        return max(1, SQUARES_GROUP_BYTES // max(row, 1))


def produce(
    fm: FunctionalModel,
    structure: LayerStructure | None,
    params: dict[str, Tensor],
    inputs: Inputs,
    chunk: RowChunk,
    directions: Directions,
    *,
    generic: tuple[str, ...] = (),
    needed: frozenset[int] | None = None,
    differentiable: bool = False,
    allow_unstructured: bool = False,
    squares: bool = False,
    only: str | None = None,
) -> Pieces:
    """The pieces of a chunk's examples for its rows of ``directions`` (see the module docstring).

    Args:
        fm: the model.
        structure: the layer structure of the inputs' signature (``None``: no layer call; every
            parameter in ``generic``).
        params: the model's selected parameters (requiring grad only when ``differentiable``).
        inputs: the chunk's examples (``chunk.samples`` of the batch).
        chunk: the chunk: its examples and its rows ``chunk.rows`` of ``directions``.
        directions: the cotangent rows the pass takes back.
        generic: parameters whose per-example rows are asked (on no matched layer call).
        needed: the layer calls whose ``G`` is asked (default: all).
        differentiable: keep the autograd graph (to the inputs, parameters and rows).
        allow_unstructured: when an example does not run the traced layers, give every
            parameter's rows instead (the consumer accepts them).
        squares: the consumer needs only the squares of each layer call's directions summed
            over the rows: the rungs that take the rows back by hand give them as
            :class:`RowSquares`, formed a group of examples at a time (cache-sized on a CPU), when
            the parameters are in their accumulation dtype (:func:`squares_apply`) and the rows
            are not unit rows; the others give the directions.
        only: run this rung alone (a key of :data:`RUNGS`; it must apply), without the ladder
            (tests compare the rungs).

    Returns:
        The chunk's :class:`Pieces`: ``f (b, *f_b)``, per layer call its input and output
        directions, and the generic parameters' rows ``(b, r, *shape)``.

    Raises:
        StructureError: an example does not run the traced layers (and the rows of every
            parameter are not allowed).
        ValueError: ``only`` names a rung that does not apply.
    """
    calls = () if structure is None else structure.calls
    needed = frozenset(range(len(calls))) if needed is None else needed
    chain = None
    if structure is not None and not generic and not differentiable:
        # recognized again at every call: hooks, modules or modes may change
        chain = find_chain(fm, structure.calls, inputs)
    job = _Job(
        fm, structure, params, inputs, chunk, directions, generic, needed, differentiable, chain
    )
    if squares and not differentiable and squares_apply(job.dtype):
        job = replace(job, squares=True)
    names = rungs(
        job.structure,
        bool(generic),
        job.chain is not None,
        allow_unstructured,
        differentiable=differentiable,
    )
    if only is not None:
        if only not in names:
            raise ValueError(f"rung {only!r} does not apply here; these do: {list(names)}")
        return _RUNG_FUNCTIONS[only](job)
    ladder = _LADDERS.get(names)
    if ladder is None:
        ladder = _LADDERS[names] = Ladder(
            "layer pieces", [(RUNGS[n], _RUNG_FUNCTIONS[n]) for n in names]
        )
    return ladder(fm, job)


def squares_apply(dtype: torch.dtype) -> bool:
    """Whether the hand-differentiated rungs give :class:`RowSquares` for parameters of ``dtype``.

    When asked, and in the parameters' accumulation dtype only: no sum is rounded to a lower
    precision than the consumer's.
    """
    return accumulation_dtype(dtype) == dtype


def first_rung(
    fm: FunctionalModel,
    structure: LayerStructure | None,
    inputs: Inputs,
    *,
    generic: bool = False,
    differentiable: bool = False,
    allow_unstructured: bool = False,
) -> str:
    """The rung :func:`produce` tries first for these arguments.

    Its name, a key of :data:`RUNGS`.
    """
    chain = structure is not None and not generic and not differentiable
    chain = chain and find_chain(fm, structure.calls, inputs) is not None
    return rungs(structure, generic, chain, allow_unstructured, differentiable=differentiable)[0]


def rungs(
    structure: LayerStructure | None,
    generic: bool,
    chain: bool,
    allow_unstructured: bool,
    *,
    differentiable: bool = False,
) -> tuple[str, ...]:
    """The rungs that apply, in ladder order (keys of :data:`RUNGS`).

    The chain for a plain chain, the traced chain when the traced forward read as one (not for
    a ``differentiable`` pass: the rows go back by hand), one batched backward when no parameter
    needs per-example rows and every layer leads with the batch dimension, ``vmap`` and a loop
    over examples, and the rows of every parameter when allowed (or when there is no layer
    structure).
    """
    names: list[str] = []
    if structure is not None:
        if chain:
            names.append("chain")
        if structure.traced_chain and not generic and not differentiable:
            names.append("traced chain")
        if not generic and structure.batch_first:
            names.append("batched")
        names += ["vmapped", "loop"]
    if structure is None or allow_unstructured:
        names += ["vmapped (all rows)", "loop (all rows)"]
    return tuple(names)


# -- the rungs ---------------------------------------------------------------------------------
def _chain(job: _Job) -> Pieces:
    chain = job.chain
    per = job.per()
    unit = job.directions.index(*per)
    at_head = None
    if unit is not None and chain.ends_with_linear:
        at_head = functools.partial(unit_rows, unit)
    lock = module_lock(job.fm.module)
    group = job.square_group() if unit is None else None  # unit rows: a variance's, not squared
    f, a, G = chain.pieces(
        job.params,
        job.inputs.args[0],
        lambda out: job.cotangents(out, per),
        lock,
        job.needed,
        at_head,
        squares=group,
    )
    calls = job.structure.calls
    G = [g if i in job.needed else None for i, g in enumerate(G)]
    if group is not None:
        G = [None if g is None else RowSquares(g) for g in G]
    head = chain.output_call if at_head is not None else None
    if head is not None and head in job.needed:
        G[head] = OneHot(unit, torch.Size((job.b, job.r, *calls[head].output_shape)), f.dtype)
    return _checked(job, Pieces(job.chunk, f, calls, a, G, rung="chain"))


def unit_rows(unit: Tensor, weight: Tensor) -> Tensor:
    """Unit rows ``e_k`` times a head's weight ``(K, in)``: ``W[k]`` ``(b, r, in)``.

    A view when every example has the same rows (all outputs, in order).
    """
    if unit.stride(0) == 0:
        return weight[unit[0]].unsqueeze(0).expand(unit.shape[0], -1, -1)
    return weight[unit]


def _traced_chain(job: _Job) -> Pieces:
    """The chunk's forward read as a chain, its rows back by hand (module docstring, rung 2)."""
    s = job.structure
    calls, head = s.calls, s.head
    f, tap, backwards = read_chain(job.fm, s.analysis, job.params, job.inputs)
    f = f.detach()
    unit, rows = _rows(job, job.per(), f)
    G: list[Tensor | OneHot | RowSquares | None] = [None] * len(calls)
    weight = head.weight(job.params)
    steps: list = []  # from the head's input back
    for i in range(head.index, 0, -1):
        steps.append(backwards[i])
        steps.append((i - 1, calls[i - 1].weight(job.params)))
    group = job.square_group() if unit is None else None  # unit rows: a variance's, not squared
    if group is not None:  # as the chain: the head is a step (a plain linear layer)
        head_step = (head.index, head.geometry.matrix(weight))
        g = rows.reshape(job.b, job.r, -1)
        sums = square_sums_back(g, False, [head_step, *steps], set(job.needed), group)
        for i, sums_i in sums.items():  # the calls asked
            G[i] = RowSquares(sums_i.unsqueeze(1))
    else:
        if head.index in job.needed:
            G[head.index] = _head_directions(job, f, unit, rows)
        left = set(job.needed) - {head.index}
        if left:
            if unit is not None:
                g = unit_rows(unit, weight)  # (b, r, in), maybe a view
            else:
                g = s.head_cotangents(rows, weight).reshape(job.b, job.r, -1)
            for i, g_i in rows_back(g, unit is None, steps, left):  # every call is a step
                G[i] = g_i.unsqueeze(2)
    a = [t.detach().unsqueeze(1) for t in tap.inputs]
    return _checked(job, Pieces(job.chunk, f, calls, a, G, rung="traced chain"))


def _batched(job: _Job) -> Pieces:
    """One plain batched forward, one batched backward (module docstring, rung 3)."""
    s = job.structure
    calls, head = s.calls, s.head
    b, r = job.b, job.r
    tap = LayerTap(s.analysis, job.params)
    per = job.per()
    with torch.enable_grad():
        probes = [
            torch.zeros(
                b, *c.output_shape[1:], dtype=job.dtype, device=job.inputs.device
            ).requires_grad_()
            if c.index in job.needed
            else None
            for c in calls
        ]
        with transform_kernels(safe_attention=True), tap.active(probes):
            f = job.fm.call(job.params, job.inputs.args, job.inputs.kwargs)
        tap.check_complete()
        if any(
            p is not None and o.shape != p.shape for o, p in zip(tap.outputs, probes, strict=True)
        ):
            raise StructureError("a matched layer's batched output is not (batch, ...)")
        G: list[Tensor | OneHot | None] = [None] * len(calls)
        shortcut = head is not None and is_same_memory(tap.outputs[head.index], f)
        backward = [
            c.index for c in calls if c.index in job.needed and not (shortcut and c is head)
        ]
        unit, rows = _rows(job, per, f)
        if shortcut:
            G[head.index] = _head_directions(job, f, unit, rows)
        if backward:
            frozen = None if shortcut or job.differentiable else _frozen_head(tap.last_linear, f)
            if frozen is not None:
                start, cot = _frozen_head_start(job, f, frozen, _dense_rows(job, per, f, rows))
            elif shortcut:
                start = tap.inputs[head.index]
                cot = _start_cotangents(job, per, f, True, unit, rows).reshape(job.r, *start.shape)
            else:
                start, cot = f, _start_cotangents(job, per, f, False, unit, rows)
            grads = torch.autograd.grad(
                start,
                [probes[i] for i in backward],
                cot if r > 1 else cot[0],
                create_graph=job.differentiable,
                allow_unused=True,
                is_grads_batched=r > 1,
            )
            for i, g in zip(backward, grads, strict=True):
                g = torch.zeros_like(probes[i]).expand(r, *probes[i].shape) if g is None else g
                G[i] = (g if r > 1 else g.unsqueeze(0)).transpose(0, 1).unsqueeze(2)
    a = [t.unsqueeze(1) for t in tap.inputs]
    pieces = Pieces(job.chunk, f, calls, a, G, rung="batched")
    return _checked(job, pieces if job.differentiable else _detached(pieces))


def _rows(job: _Job, per, f: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(unit, rows)``: the rows' indices when they are unit rows, else the rows ``(b, r, *f_b)``.

    Formed once per chunk, for the head's ``G`` and the backward's start alike.
    """
    unit = job.directions.index(*per)
    return (unit, None) if unit is not None else (None, job.cotangents(f.detach(), per))


def _dense_rows(job: _Job, per, f: Tensor, rows: Tensor | None) -> Tensor:
    """The rows ``(b, r, *f_b)`` of :func:`_rows`, dense."""
    return job.cotangents(f.detach(), per) if rows is None else rows


def _frozen_head(last: LinearCall | None, f: Tensor) -> LinearCall | None:
    """``last`` when the outputs ``f`` are a function of its output alone (else ``None``).

    A frozen linear head (no posterior parameter, nothing upstream in its weight or bias) whose
    output reaches ``f`` through a chain of one-input operations (indexing, views, a cast, a
    scale): a language model's logits at chosen positions and tokens. The autograd graph is
    walked from ``f`` to the head's output; any second differentiable input on the way
    (a skip connection around the head, a second use of its input) refuses.
    """
    if last is None or not (last.output.requires_grad and last.input.requires_grad):
        return None
    if last.weight.requires_grad or (last.bias is not None and last.bias.requires_grad):
        return None
    node, target = f.grad_fn, last.output.grad_fn
    for _ in range(_FROZEN_HEAD_DEPTH):
        if node is None:
            return None
        if node is target:
            return last
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


#: One-input operations allowed between a frozen head's output and the model's output.
_FROZEN_HEAD_DEPTH = 16


def _frozen_head_start(
    job: _Job, f: Tensor, head: LinearCall, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """``(head input, cotangents (r, *input))``: the rows taken back through a frozen head.

    The rows ``(b, r, *f_b)`` reach the head's output ``(r, *out)`` through the cheap operations
    after it; the product with the head's weight is made only for the positions where a row is
    nonzero (a language model's vocabulary projection at the one position a pass asks about, not
    at every token). A position whose row is all zero contributes exactly zero. The rows reach the
    head's output one at a time (one output-sized gradient alive, not ``r``), and the touched
    positions of all rows meet the weight in one product (the weight is read once).
    """
    W, start = head.weight, head.input
    positions = start.numel() // W.shape[1]
    at_in = start.new_zeros(job.r, positions, W.shape[1], dtype=W.dtype)
    hits, values = [], []
    for i, row in enumerate(rows.unbind(1)):  # one row at a time: one output-sized gradient
        (at_out,) = torch.autograd.grad(f, head.output, row, retain_graph=True)
        flat = at_out.reshape(positions, W.shape[0])
        hit = flat.ne(0).any(1).nonzero().squeeze(1)
        if 2 * hit.numel() < positions:
            hits.append(hit + i * positions)
            values.append(flat[hit])
        else:
            torch.mm(flat, W, out=at_in[i])
    if hits:  # one product with the weight for the touched positions of all rows
        at_in.view(-1, W.shape[1]).index_copy_(0, torch.cat(hits), torch.cat(values) @ W)
    return start, at_in.to(start.dtype).reshape(job.r, *start.shape)


def _head_directions(
    job: _Job, f: Tensor, unit: Tensor | None, rows: Tensor | None
) -> Tensor | OneHot:
    """The head's ``G``: the rows themselves (one-hot when they are unit rows ``unit``)."""
    head = job.structure.head
    shape = torch.Size((job.b, job.r, *head.output_shape))
    if unit is not None:
        return OneHot(unit, shape, f.dtype)
    return rows.reshape(shape).contiguous()


def _vmapped(job: _Job) -> Pieces:
    """The forward under ``vmap`` over examples (module docstring, rung 4)."""
    if job.generic or job.structure is None:
        return _per_example_vjp(job)
    s = job.structure
    calls, head = s.calls, s.head
    b, r = job.b, job.r
    per = job.per()
    needed = [c.index for c in calls if c.index in job.needed and c is not head]
    shapes = {c.index: c.output_shape for c in calls}

    def one(tensors, *probes):
        args, kwargs = job.inputs.with_tensors([t.unsqueeze(0) for t in tensors])
        tap = LayerTap(s.analysis, job.params)
        full: list[Tensor | None] = [None] * len(calls)
        for i, p in zip(needed, probes, strict=True):
            full[i] = p
        with tap.active(full):
            out = job.fm.call(job.params, args, kwargs).squeeze(0)
        tap.check_complete()
        z = tap.outputs[head.index] if head is not None else out
        start = tap.inputs[head.index] if head is not None else out
        return start, out, list(tap.inputs), z

    with transform_kernels(safe_attention=True), torch.enable_grad():
        probes = [
            torch.zeros(b, *shapes[i], dtype=job.dtype, device=job.inputs.device).requires_grad_()
            for i in needed
        ]
        start, f, a, z = vmap_examples(one, [job.inputs.tensors(), *probes])
        G: list[Tensor | OneHot | None] = [None] * len(calls)
        if head is not None and not torch.equal(f.detach(), z.detach().reshape(f.shape)):
            raise StructureError(
                "the model's output differs from its last linear layer's output for some "
                "examples (data-dependent control flow after the head?)"
            )
        unit, rows = _rows(job, per, f)
        if head is not None and head.index in job.needed:
            G[head.index] = _head_directions(job, f, unit, rows)
        if needed:
            cot = _start_cotangents(job, per, f, head is not None, unit, rows)
            grads = torch.autograd.grad(
                start,
                probes,
                cot if r > 1 else cot[0],
                create_graph=job.differentiable,
                allow_unused=True,
                is_grads_batched=r > 1,
            )
            for i, p, g in zip(needed, probes, grads, strict=True):
                g = torch.zeros_like(p).expand(r, *p.shape) if g is None else g
                G[i] = (g if r > 1 else g.unsqueeze(0)).transpose(0, 1)
    pieces = Pieces(job.chunk, f, calls, a, G, rung="vmapped")
    return _checked(job, pieces if job.differentiable else _detached(pieces))


def _start_cotangents(
    job: _Job, per, f: Tensor, at_head: bool, unit: Tensor | None, rows: Tensor | None
) -> Tensor:
    """``(r, b, ...)``: the rows (:func:`_rows`) at the output, or at the head's input.

    At the head's input (``at_head``) they are the rows times the head's weight. Formed in
    ``(r, b)`` order: the backward's batch of rows leads, with no copy to reorder.
    """
    if not at_head:
        return _dense_rows(job, per, f, rows).transpose(0, 1)
    s = job.structure
    weight = s.head.weight(job.params)
    if unit is not None:
        return s.head_unit_cotangents(unit.T, weight)
    return s.head_cotangents(rows.transpose(0, 1), weight)


def _per_example_vjp(job: _Job) -> Pieces:
    """``vjp`` per example (under ``vmap`` over examples), all its rows at once.

    It gives the layer directions and the generic parameters' rows.
    """
    s = job.structure
    calls = () if s is None else s.calls
    needed = [c.index for c in calls if c.index in job.needed]
    generic = {n: job.params[n] for n in job.generic}
    fixed = {n: t for n, t in job.params.items() if n not in generic}
    rows = job.chunk.rows

    def one(tensors, *per):
        args, kwargs = job.inputs.with_tensors([t.unsqueeze(0) for t in tensors])
        tap = LayerTap(s.analysis, job.params) if s is not None else None
        probes = [
            torch.zeros(calls[i].output_shape, dtype=job.dtype, device=job.inputs.device)
            for i in needed
        ]

        def forward(probes, free):
            merged = {**fixed, **free}
            if tap is None:
                out = job.fm.call(merged, args, kwargs).squeeze(0)
                return out, (out, [])
            full: list[Tensor | None] = [None] * len(calls)
            for i, p in zip(needed, probes, strict=True):
                full[i] = p
            with tap.active(full):
                out = job.fm.call(merged, args, kwargs).squeeze(0)
            tap.check_complete()
            return out, (out, list(tap.inputs))

        _, pull, (out, a) = vjp(forward, probes, generic, has_aux=True)
        cot = job.directions.dense(out.unsqueeze(0), rows, *(p.unsqueeze(0) for p in per))[0]
        G, free_rows = vmap(pull)(cot)
        return out, a, G, free_rows

    with transform_kernels(safe_attention=True):
        f, a, G_needed, generic_rows = vmap_examples(one, [job.inputs.tensors(), *job.per()])
    G: list[Tensor | OneHot | None] = [None] * len(calls)
    for i, g in zip(needed, G_needed, strict=True):
        G[i] = g
    name = "vmapped" if s is not None else "vmapped (all rows)"
    pieces = Pieces(job.chunk, f, calls, list(a), G, dict(generic_rows), rung=name)
    return _checked(job, pieces if job.differentiable else _detached(pieces))


def _loop(job: _Job) -> Pieces:
    """Example by example, one plain backward per row: no transform at all.

    The fallback when ``vmap`` cannot run the model (e.g. data-dependent control flow) or a
    batching rule is wrong.
    """
    s = job.structure
    calls = () if s is None else s.calls
    needed = [c.index for c in calls if c.index in job.needed]
    per = job.per()
    outs, inputs, directions, generic_rows = [], [], [], []
    with transform_kernels(safe_attention=True), torch.enable_grad():
        leaves = {
            n: p if p.requires_grad else p.detach().requires_grad_(True)
            for n, p in job.params.items()
        }
        for b in range(job.b):
            one = job.inputs.slice(b, b + 1)
            probes: list[Tensor | None] = [None] * len(calls)
            for i in needed:
                probes[i] = torch.zeros(
                    calls[i].output_shape, dtype=job.dtype, device=job.inputs.device
                ).requires_grad_()
            if s is None:
                out = job.fm.call(leaves, one.args, one.kwargs)
                layer_inputs: list[Tensor] = []
            else:
                tap = LayerTap(s.analysis, leaves)
                with tap.active(probes):
                    out = job.fm.call(leaves, one.args, one.kwargs)
                tap.check_complete()
                layer_inputs = list(tap.inputs)
            cot = job.directions.dense(out.detach(), job.chunk.rows, *(p[b : b + 1] for p in per))
            targets = [probes[i] for i in needed] + [leaves[n] for n in job.generic]
            per_row = [
                torch.autograd.grad(
                    out[0],
                    targets,
                    c,
                    retain_graph=True,
                    create_graph=job.differentiable,
                    allow_unused=True,
                )
                for c in (cot[0] if targets else ())
            ]
            grads = [
                torch.stack([torch.zeros_like(t) if g[j] is None else g[j] for g in per_row])
                if per_row
                else targets[j].new_zeros(0, *targets[j].shape)
                for j, t in enumerate(targets)
            ]
            outs.append(out[0])
            inputs.append(layer_inputs)
            directions.append(grads[: len(needed)])
            generic_rows.append(grads[len(needed) :])
    f = torch.stack(outs)
    a = [torch.stack([x[i] for x in inputs]) for i in range(len(calls))]
    G: list[Tensor | OneHot | None] = [None] * len(calls)
    for j, i in enumerate(needed):
        G[i] = torch.stack([d[j] for d in directions])
    rows = {n: torch.stack([g[j] for g in generic_rows]) for j, n in enumerate(job.generic)}
    name = "loop" if s is not None else "loop (all rows)"
    pieces = Pieces(job.chunk, f, calls, a, G, rows, rung=name)
    return _checked(job, pieces if job.differentiable else _detached(pieces))


def _unstructured(rung: Callable[[_Job], Pieces]) -> Callable[[_Job], Pieces]:
    """``rung`` asked for the rows of every parameter (no layer structure)."""

    def run(job: _Job) -> Pieces:
        everything = tuple(job.params)
        return rung(
            _Job(
                job.fm,
                None,
                job.params,
                job.inputs,
                job.chunk,
                job.directions,
                everything,
                frozenset(),
                job.differentiable,
            )
        )

    return run


_RUNG_FUNCTIONS: dict[str, Callable[[_Job], Pieces]] = {
    "chain": _chain,
    "traced chain": _traced_chain,
    "batched": _batched,
    "vmapped": _vmapped,
    "loop": _loop,
    "vmapped (all rows)": _unstructured(_per_example_vjp),
    "loop (all rows)": _unstructured(_loop),
}
_LADDERS: dict[tuple[str, ...], Ladder] = {}


# -- checks -------------------------------------------------------------------------------------
def _detached(pieces: Pieces) -> Pieces:
    pieces.f = pieces.f.detach()
    pieces.a = [t.detach() for t in pieces.a]
    pieces.G = [g.detach() if isinstance(g, Tensor) else g for g in pieces.G]
    pieces.rows = {n: t.detach() for n, t in pieces.rows.items()}
    return pieces


def _checked(job: _Job, pieces: Pieces) -> Pieces:
    """``pieces`` after checking every shape against one example's trace.

    A mismatch (a transform's batching rule giving a wrong lead) raises ``RuntimeError`` (the
    next rung runs).
    """
    b, r = job.b, job.r

    def expect(what: str, t: Tensor, shape: tuple) -> None:
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(
                f"layer pieces: {what} came back with shape {tuple(t.shape)}, expected "
                f"{tuple(shape)} (a transform's batching rule for an op of the model?)"
            )

    for call, a, G in zip(pieces.calls, pieces.a, pieces.G, strict=True):
        expect(f"the input of layer call {call.index}", a, (b, *call.input_shape))
        if isinstance(G, Tensor):
            expect(f"the directions of layer call {call.index}", G, (b, r, *call.output_shape))
        elif isinstance(G, OneHot):
            expect(f"the unit directions of layer call {call.index}", G.index, (b, r))
        elif isinstance(G, RowSquares):
            expect(f"the row squares of layer call {call.index}", G.values, (b, *call.output_shape))
    shapes = job.fm.param_shapes
    for name, rows in pieces.rows.items():
        expect(f"the rows of {name}", rows, (b, r, *shapes[name]))
    if pieces.f.shape[0] != b:
        raise RuntimeError(f"layer pieces: outputs for {pieces.f.shape[0]} examples, expected {b}")
    return pieces
