"""One pass over the data: per chunk of examples and rows, what every curvature is made of.

Every curvature here is a sum over examples ``n`` and cotangent rows ``u_nr`` in output space of
outer products of ``J_n^T u_nr``:

* exact GGN: ``u_n`` are the rows of a factor of the loss Hessian, position by position
  (:meth:`~pushforward.curvature.likelihoods.Likelihood.factor`);
* Monte Carlo GGN: ``mc`` sampled gradients per example, over ``sqrt(mc)``;
* empirical Fisher: the loss gradient, one row per example.

For parameters that are the weight or bias of a linear, convolution or embedding layer used
once (found by the structured strategy's tracing,
:func:`~pushforward.engine.structure.tracing.analyze`), ``J_n^T u`` never needs to be formed:
one forward pass per example with a zero *probe* added to each such layer's output
(:class:`~pushforward.engine.structure.tracing.LayerTap`) records the layer inputs ``a`` and one
backward per row to the probes gives the layer output gradients ``G = J_z^T u``; the consumers
contract ``(a, G)`` in closed form (diagonal ``sum G^2 ⊗ a^2``, K-FAC ``sum a a^T`` and
``sum G G^T``). Other parameters get their per-example rows from the same backward pass. All
examples of a chunk run at once (``vmap``), all rows of an example too; chunk sizes come from the
cost model within ``memory_budget``. When every parameter is on a matched layer, the forward is
recorded by plain autograd (under ``vmap`` over examples) and one batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``) takes all rows of all examples of the chunk
through it: each weight's products see ``rows x examples`` at once. A model that is a plain chain
of linear layers and elementwise activations (an ``nn.Sequential`` MLP) skips all of that: its
pieces are computed by hand (:mod:`pushforward.curvature.chain`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vjp, vmap

from pushforward.core.branching import vmap_examples
from pushforward.core.chunking import RowChunk, progress_bar, row_chunks
from pushforward.core.cost import Budget, ModelCost, measure_cost
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel, module_lock
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import transform_kernels
from pushforward.curvature.chain import Chain, find_chain
from pushforward.curvature.data import Batch, Batches
from pushforward.curvature.likelihoods import Likelihood
from pushforward.engine.structure.tracing import (
    Analysis,
    LayerCall,
    LayerTap,
    StructureError,
    analyze,
)

__all__ = ["Layers", "Piece", "RowKind", "Sweep"]


@dataclass(frozen=True)
class RowKind:
    """Which cotangent rows each example gets.

    Attributes:
        kind: ``"exact"`` (loss-Hessian factor rows, ``positions * r``), ``"mc"`` (``mc_samples``
            sampled gradients over ``sqrt(mc_samples)``) or ``"ef"`` (the loss gradient).
        mc_samples: samples per example for ``"mc"``.
        seed: seeds the samples (the same per batch on every pass over the data).
    """

    kind: str
    mc_samples: int = 1
    seed: int = 0

    def count(self, likelihood: Likelihood, positions: int, K: int) -> int:
        """Rows per example."""
        if self.kind == "exact":
            return positions * likelihood.rows_per_position(K)
        return self.mc_samples if self.kind == "mc" else 1


@dataclass(frozen=True)
class Layers:
    """Where the parameters sit, for one input signature.

    Attributes:
        analysis: the traced layer structure (``None``: everything generic).
        calls: the matched layer calls (forward order).
        generic: parameters whose per-example rows are formed (not on a matched layer).
        head: the linear layer call whose output is the model's output (same memory, its
            outputs lined up with the model's), if any.
    """

    analysis: Analysis | None
    calls: tuple[LayerCall, ...]
    generic: tuple[str, ...]
    head: LayerCall | None = None

    def z_numel(self) -> int:
        """Entries of all matched layers' outputs in one example."""
        return sum(math.prod(c.output_shape) for c in self.calls)


@dataclass
class Piece:
    """One chunk's pieces: examples ``chunk.samples`` of batch ``batch``, rows ``chunk.rows``.

    Attributes:
        f: outputs ``(b, n, K)`` (``n`` positions per example).
        y: targets of the chunk's examples.
        a: per matched layer call, its input ``(b, *a_n)`` (one example's shape inside the
            model, with its own singleton batch dimension).
        G: per matched layer call, output gradients ``(b, r, *z_n)``.
        rows: per generic parameter, rows ``J_n^T u_nr`` ``(b, r, *shape)``.
        layers: the layer structure of the batch.
    """

    batch: int
    chunk: RowChunk
    layers: Layers
    f: Tensor
    y: Tensor
    a: list[Tensor]
    G: list[Tensor]
    rows: dict[str, Tensor]

    @property
    def first(self) -> bool:
        """The chunk holds its examples' first rows (per-example sums are counted once)."""
        return self.chunk.rows.start == 0

    @property
    def examples(self) -> int:
        return self.chunk.samples.stop - self.chunk.samples.start


class Sweep:
    """Passes over ``data`` yielding :class:`Piece` s (see the module docstring).

    Args:
        fm: the model; the curvature is over its selected parameters.
        likelihood: the loss.
        rows: which rows each example gets.
        structured: trace the layer structure (``False``: every parameter's rows are formed,
            as for a dense curvature).
        budget: the memory budget in bytes.
        progress: a progress bar over the batches.
    An example that does not run the traced layers (data-dependent control flow: a matched
    layer skipped or run twice) raises
    :class:`~pushforward.engine.structure.tracing.StructureError`; a consumer whose result does
    not depend on the layer structure (the diagonal) can start again with ``structured=False``.
    """

    def __init__(
        self,
        fm: FunctionalModel,
        likelihood: Likelihood,
        rows: RowKind,
        *,
        structured: bool,
        budget: int,
        progress: bool,
    ) -> None:
        self.fm, self.likelihood, self.rows = fm, likelihood, rows
        self.structured, self.budget, self.progress = structured, budget, progress

    # -- structure ---------------------------------------------------------------------
    def layers(self, inputs: Inputs) -> Layers:
        """The layer structure for ``inputs``' signature (traced on one example, cached in the
        model's cache: every sweep over the same model and inputs shares it)."""
        key = ("curvature sweep", self.structured, inputs.signature())
        cache = self.fm.cache.structures
        found = cache.get(key)
        if found is None:
            found = cache[key] = self._trace(inputs)
        return found

    def _trace(self, inputs: Inputs) -> Layers:
        names = self.fm.param_names
        if not self.structured:
            return Layers(None, (), names)
        one = inputs.slice(0, 1).detach()
        params = self.fm.params(False)
        with transform_kernels(safe_attention=True):
            analysis = analyze(lambda q: self.fm.call(q, one.args, one.kwargs), params)
        generic = tuple(n for n in names if n not in analysis.matched)
        head = analysis.head
        if head is not None:
            out = head.weight_shape[-1] if head.kind == "addmm" else head.weight_shape[0]
            f_b = measure_cost(self.fm, inputs).output_shape
            if out != f_b[-1] or math.prod(head.output_shape) != f_b.numel():
                head = None
        return Layers(analysis, tuple(analysis.calls), generic, head)

    # -- shapes and costs ----------------------------------------------------------------
    def output_split(self, cost: ModelCost) -> tuple[int, int]:
        """``(n, K)``: positions and outputs per example."""
        shape = cost.output_shape
        K = math.prod(shape[len(shape) - self.fm.output_dims :])
        return shape.numel() // max(K, 1), K

    def row_bytes(self, layers: Layers, cost: ModelCost) -> int:
        """Working bytes of one row: a backward through one example, its cotangent, the
        matched layers' output gradients and the generic parameters' rows."""
        generic = sum(math.prod(self.fm.param_shapes[n]) for n in layers.generic)
        return (
            2 * cost.activation_bytes
            + 2 * cost.output_bytes
            + (2 * layers.z_numel() + 2 * generic) * cost.itemsize
        )

    # -- the pass --------------------------------------------------------------------------
    def pieces(
        self,
        data: Batches,
        held: int,
        extra_row_bytes: Callable[[Layers, ModelCost], int] = lambda layers, cost: 0,
        what: str = "the curvature",
    ) -> Iterator[Piece]:
        """Every chunk of every batch, in order.

        Args:
            data: the batches.
            held: bytes the consumer holds throughout (its result).
            extra_row_bytes: bytes the consumer allocates per row (e.g. layer rows it forms).
            what: names the computation in a :class:`~pushforward.MemoryBudgetError`.
        """
        params = self.fm.params(False)
        try:
            total = len(data)
        except TypeError:  # the loader does not know its length
            total = None
        batches = progress_bar(data, self.progress, "curvature: batches", total=total)
        for batch in batches:
            yield from self._batch(batch, params, held, extra_row_bytes, what)

    def _batch(self, batch: Batch, params, held, extra_row_bytes, what) -> Iterator[Piece]:
        fm, lik = self.fm, self.likelihood
        inputs = fm.prepare(batch.inputs).detach()
        cost = measure_cost(fm, inputs)
        layers = self.layers(inputs)
        n, K = self.output_split(cost)
        B = inputs.batch_size
        y = lik.prepare_targets(batch.y, torch.Size((B, n, K)))
        R = self.rows.count(lik, n, K)
        noise = self.noise(batch.index, B, n, K, cost.output_dtype, inputs.device)
        budget = Budget.of(self.budget)
        per_row = self.row_bytes(layers, cost) + extra_row_bytes(layers, cost)
        per_example = cost.activation_bytes + 2 * cost.output_bytes
        chunk_size = budget.chunk(per_row + per_example // max(R, 1), held, B * R)
        budget.require(budget.peak(held, chunk_size, per_row) + per_example, what)
        chain = find_chain(fm, layers.calls, inputs) if not layers.generic else None
        for chunk in row_chunks(B, R, chunk_size):
            s = chunk.samples
            sub = inputs.slice(s.start, s.stop)
            try:
                with torch.no_grad():
                    args = (layers, params, sub, y[s], _part(noise, s), chunk.rows, (n, K))
                    if chain is not None:
                        f, a, G, rows = _chained(self, chain, *args)
                    else:
                        f, a, G, rows = _TAPPED(fm, self, *args)
            except StructureError as err:
                raise StructureError(
                    f"{what} needs every example to run the traced layers: {err}"
                ) from err
            yield Piece(batch.index, chunk, layers, f.reshape(-1, n, K), y[s], a, G, rows)

    def noise(self, index: int, B: int, n: int, K: int, dtype, device) -> Tensor | None:
        """The random numbers of batch ``index``'s sampled targets ``(B, mc, ...)``."""
        if self.rows.kind != "mc":
            return None
        generator = torch.Generator(device=device).manual_seed(
            hash((self.rows.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF
        )
        shape = (B, self.rows.mc_samples, *self.likelihood.noise_shape(n, K))
        return self.likelihood.draw_noise(shape, generator, dtype, device)

    def chunk_cotangents(self, f: Tensor, y: Tensor, noise: Tensor | None, rows: slice) -> Tensor:
        """``(b, r, n, K)``: the cotangent rows ``rows`` of a chunk's examples ``f (b, n, K)``,
        in their own memory."""
        if self.likelihood.batched:
            cot = self.cotangents(f, y, noise, rows)
        else:
            in_dims = (0, 0, None if noise is None else 0)
            cot = vmap(lambda f_b, y_b, z_b: self.cotangents(f_b, y_b, z_b, rows), in_dims=in_dims)(
                f, y, noise
            )
        return cot.contiguous()

    def cotangents(self, f: Tensor, y: Tensor, noise: Tensor | None, rows: slice) -> Tensor:
        """``(..., r, n, K)``: the cotangent rows ``rows`` of examples ``f (..., n, K)`` — one
        example (under ``vmap``), or leading example dimensions for a batched likelihood."""
        lik, kind = self.likelihood, self.rows.kind
        if kind == "ef":
            return lik.gradient(f, y).unsqueeze(-3)
        if kind == "mc":
            scale = 1 / math.sqrt(self.rows.mc_samples)
            lead = f.dim() - 2
            draws = noise[(slice(None),) * lead + (rows,)]  # (..., r, *noise_shape)
            if lik.batched:
                return lik.sampled_gradient(f.unsqueeze(-3), y.unsqueeze(lead), draws) * scale
            return vmap(lambda z: lik.sampled_gradient(f, y, z))(draws) * scale
        factor = lik.factor(f, y)  # (..., n, r, K)
        n, r = factor.shape[-3:-1]
        if n == 1:  # one position: the rows are the factor's
            return factor[..., 0, rows, :].unsqueeze(-2)
        index = torch.arange(rows.start, rows.stop, device=f.device)
        t, k = index // r, index % r
        onehot = (t.unsqueeze(-1) == torch.arange(n, device=f.device)).to(f.dtype)  # (c, n)
        return onehot.unsqueeze(-1) * factor[..., t, k, :].unsqueeze(-2)


def _part(noise: Tensor | None, samples: slice) -> Tensor | None:
    return None if noise is None else noise[samples]


def _example(sweep: Sweep, layers: Layers, params, sub: Inputs, rows: slice, nK, tensors, y, noise):
    """One example (``tensors`` without their batch dimension): ``(f, [a], [G], {name: rows})``."""
    fm = sweep.fm
    generic = {n: params[n] for n in layers.generic}
    fixed = {n: t for n, t in params.items() if n not in generic}
    dtype = next(iter(params.values())).dtype
    args, kwargs = sub.with_tensors([t.unsqueeze(0) for t in tensors])
    tap = LayerTap(layers.analysis, params) if layers.analysis is not None else None

    def forward(probes, free):
        merged = {**fixed, **free}
        if tap is None:
            out = fm.call(merged, args, kwargs)[0]
            return out, (out, [])
        with tap.active(probes):
            out = fm.call(merged, args, kwargs)[0]
        tap.check_complete()
        return out, (out, list(tap.inputs))

    probes = [torch.zeros(c.output_shape, dtype=dtype, device=sub.device) for c in layers.calls]
    _, pull, (out, a) = vjp(forward, probes, generic, has_aux=True)
    cot = sweep.cotangents(out.reshape(nK), y, noise, rows).reshape(-1, *out.shape)
    G, free_rows = vmap(pull)(cot)
    return out, a, G, free_rows


def _chained(sweep: Sweep, chain: Chain, layers: Layers, params, sub: Inputs, y, noise, rows, nK):
    """A chain of linear layers and elementwise activations, by hand
    (:mod:`pushforward.curvature.chain`)."""

    def cotangents(f: Tensor) -> Tensor:
        return sweep.chunk_cotangents(f.reshape(-1, *nK), y, noise, rows).flatten(2, 3)

    f, a, G = chain.pieces(params, sub.args[0], cotangents, module_lock(sweep.fm.module))
    return f, a, G, {}


def _tapped_vmapped(sweep: Sweep, layers: Layers, params, sub: Inputs, y, noise, rows, nK):
    """All examples of a chunk at once (``vmap``)."""
    if not layers.generic:
        return _tapped_batched(sweep, layers, params, sub, y, noise, rows, nK)

    def one(tensors, y_b, *noise_b):
        return _example(sweep, layers, params, sub, rows, nK, tensors, y_b, *(noise_b or (None,)))

    # value reads in the model (Hugging Face's "is nothing padded?") are answered per group of
    # examples that agree
    batched = [sub.tensors(), y] + ([] if noise is None else [noise])
    with transform_kernels(safe_attention=True):
        return vmap_examples(one, batched)


def _tapped_batched(sweep: Sweep, layers: Layers, params, sub: Inputs, y, noise, rows, nK):
    """Every parameter on a matched layer: the forward runs under ``vmap`` over examples (so
    every example is proven to run the traced layers) with the probes ``(b, *z_n)`` requiring
    gradients, recorded by plain autograd; one batched backward (``is_grads_batched``) starts
    from the whole chunk, all rows at once (an example's output gradients at its own layer
    outputs are those of its own cotangent: examples are independent). The probes' gradients
    come back rows first, ``(r, b, *z_n)``, and are handed on as ``(b, r, *z_n)`` views.

    When the model's output is a matched linear layer's output (the *head*), its output
    gradients are the cotangent rows themselves and the backward starts at its input, with the
    rows times its weight (one ``(r * b * positions, K) x (K, in)`` product)."""
    fm = sweep.fm
    dtype = next(iter(params.values())).dtype
    b = sub.batch_size
    head = layers.head
    calls = [c for c in layers.calls if c is not head]

    def one(tensors, probes):
        args, kwargs = sub.with_tensors([t.unsqueeze(0) for t in tensors])
        tap = LayerTap(layers.analysis, params)
        full = list(probes)
        if head is not None:
            full.insert(head.index, torch.zeros(head.output_shape, dtype=dtype, device=sub.device))
        with tap.active(full):
            out = fm.call(params, args, kwargs)[0]
        tap.check_complete()
        if head is None:
            return out, (out, list(tap.inputs), out)
        return tap.inputs[head.index], (out, list(tap.inputs), tap.outputs[head.index])

    probes = [
        torch.zeros(b, *c.output_shape, dtype=dtype, device=sub.device, requires_grad=True)
        for c in calls
    ]
    with transform_kernels(safe_attention=True):
        with torch.enable_grad():
            # value reads in the model are answered per group of examples that agree
            start_at, (f, a, z) = vmap_examples(one, [sub.tensors(), probes])
        f, a, z = f.detach(), [t.detach() for t in a], z.detach()
        cot = sweep.chunk_cotangents(f.reshape(b, *nK), y, noise, rows)  # (b, r, n, K)
        r = cot.shape[1]
        G: list[Tensor | None] = [None] * len(layers.calls)
        if head is None:
            start = cot.transpose(0, 1).reshape(r, *f.shape)
        else:
            if not torch.equal(f, z.reshape(f.shape)):
                raise StructureError(
                    "the model's output differs from its last linear layer's output for some "
                    "examples (data-dependent control flow after the head?)"
                )
            weight = params[head.weight_name] if head.weight_name else head.weight_value
            rows_out = cot.reshape(b, r, *head.output_shape).contiguous()  # its own memory
            G[head.index] = rows_out
            # d<f, u>/d(head input) = u W (Linear, weight (K, in)) or u W^T (Conv1D, (in, K)),
            # rows first: the backward's matrix products then batch the rows of all examples
            # into one product with each weight (not one per row)
            W = weight.T if head.kind == "addmm" else weight
            u = rows_out.transpose(0, 1).reshape(-1, W.shape[0])  # (r * b * positions, K)
            start = (u @ W).reshape(r, *start_at.shape)
        # only the head's parameters: nothing to take further back
        Gs = torch.autograd.grad(start_at, probes, start, is_grads_batched=True) if probes else ()
    for call, g in zip(calls, Gs, strict=True):
        G[call.index] = g.transpose(0, 1)
    return f, a, G, {}


def _tapped_loop(sweep: Sweep, layers: Layers, params, sub: Inputs, y, noise, rows, nK):
    """Example by example (when ``vmap`` over examples cannot run the model, e.g. data-dependent
    control flow)."""
    results = []
    tensors = sub.tensors()
    with transform_kernels(safe_attention=True):
        for b in range(sub.batch_size):
            results.append(
                _example(
                    sweep,
                    layers,
                    params,
                    sub,
                    rows,
                    nK,
                    [t[b] for t in tensors],
                    y[b],
                    None if noise is None else noise[b],
                )
            )
    f = torch.stack([r[0] for r in results])
    a = [torch.stack([r[1][i] for r in results]) for i in range(len(layers.calls))]
    G = [torch.stack([r[2][i] for r in results]) for i in range(len(layers.calls))]
    rows_out = {n: torch.stack([r[3][n] for r in results]) for n in layers.generic}
    return f, a, G, rows_out


_TAPPED = Ladder(
    "curvature",
    [("vmap over examples", _tapped_vmapped), ("a loop over examples", _tapped_loop)],
)
