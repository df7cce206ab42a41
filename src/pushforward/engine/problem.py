"""One functional-covariance problem: the model, inputs, covariance, what is asked, the budget.

Canonical layout used by every strategy (whatever the user's output shape):

* ``B`` batch elements (dim 0 of the inputs), ``T`` example positions per batch element (the
  product of the remaining example dimensions, e.g. tokens; 1 for plain classification);
* ``K`` outputs per example (the product of the trailing ``output_dims`` dimensions), of which
  ``S`` are asked for (all K, or ``outputs[..., :S]``);
* a *row* is one (batch element, position, selected output) triple; a batch element has
  ``T * S`` rows.

Results in canonical layout: variance ``(B, T, S)``, per-example covariance ``(B, T, S, S)``,
joint covariance ``(G, q*T*S, q*T*S)`` over ``G = B / q`` groups of ``q = group_size``
consecutive batch elements (batch element, then position, then output); ``q = B`` is the
joint covariance across the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from pushforward.core.chunking import RowChunk
from pushforward.core.cost import Budget, ModelCost, measure_cost
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.core.options import Options
from pushforward.core.precision import accumulation_dtype
from pushforward.covariance.binding import bind_covariance
from pushforward.covariance.operator import CovarianceOperator
from pushforward.products.vjp import one_hot_cotangents

__all__ = ["Kind", "Problem", "canonical_outputs"]

Kind = Literal["variance", "covariance", "joint"]
KINDS = ("variance", "covariance", "joint")


def canonical_outputs(
    outputs: Any, example_shape: torch.Size, K: int, device: torch.device
) -> Tensor | None:
    """``outputs`` (``(*example_dims, S)`` indices into the K outputs) as ``(B, T, S)`` long."""
    if outputs is None:
        return None
    if not isinstance(outputs, Tensor) or outputs.dtype not in (torch.int32, torch.int64):
        raise TypeError("outputs must be an integer index tensor of shape (*example_dims, S)")
    if outputs.shape[:-1] != example_shape or outputs.dim() != len(example_shape) + 1:
        raise ValueError(
            f"outputs has shape {tuple(outputs.shape)}; expected (*example_dims, S) = "
            f"({', '.join(map(str, example_shape))}, S)"
        )
    if outputs.shape[-1] == 0:
        raise ValueError("outputs selects no output (its last dimension S is 0)")
    if outputs.min() < 0 or outputs.max() >= K:
        raise ValueError(f"outputs must index the {K} outputs (0 <= index < {K})")
    B = example_shape[0]
    return outputs.to(device=device, dtype=torch.long).reshape(B, -1, outputs.shape[-1])


@dataclass(frozen=True)
class Problem:
    """What is asked, with everything a strategy needs to estimate and run it.

    Attributes:
        fm: the model.
        inputs: the batch (detached unless ``options.differentiable``).
        cov: the covariance, bound to ``fm.layout``, on the inputs' device, in the
            accumulation dtype (``pushforward.core.precision``: the output's and the
            parameters' dtypes promoted, ``float32`` for half precision).
        kind: ``"variance"``, ``"covariance"`` (per example) or ``"joint"``.
        outputs: the selected outputs ``(B, T, S)`` or ``None`` for all K.
        example_shape: the user's example dimensions ``(B, ...)``.
        output_shape: the output dimensions (``output_dims`` of them).
        cost: the model's measured per-example costs.
        options: how to run (strategy, budget, differentiable, progress, chunk cap).
        budget: the memory budget and chunk rules.
        group_size: ``kind="joint"``: batch elements per group (``B``: the whole batch).
        n_samples: Monte Carlo strategies: samples to draw (``None``: their default).
        generator: Monte Carlo strategies: source of the draws.
        check_chunks: the call's examples are not checked yet: the strategy checks those it
            runs together against its own forward
            (:meth:`~pushforward.FunctionalModel.check_examples` with their outputs).
    """

    fm: FunctionalModel
    inputs: Inputs
    cov: CovarianceOperator
    kind: Kind
    outputs: Tensor | None
    example_shape: torch.Size
    output_shape: torch.Size
    cost: ModelCost
    options: Options
    budget: Budget
    group_size: int
    n_samples: int | None = None
    generator: torch.Generator | None = None
    check_chunks: bool = False

    @classmethod
    def build(
        cls,
        fm: FunctionalModel,
        inputs: Inputs,
        cov: CovarianceOperator,
        kind: Kind,
        options: Options,
        *,
        outputs: Tensor | None = None,
        group_size: int | None = None,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Problem:
        """A problem for prepared ``inputs`` (see :meth:`FunctionalModel.prepare`)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {list(KINDS)}")
        cost = measure_cost(fm, inputs)
        example_shape, output_shape = fm.split_shape(
            torch.Size((inputs.batch_size, *cost.output_shape))
        )
        B = inputs.batch_size
        q = _group_size(group_size, kind, B)
        dtype = accumulation_dtype(cost.output_dtype, fm.dtype)
        cov = bind_covariance(fm, cov, dtype, inputs.device)
        return cls(
            fm=fm,
            inputs=inputs if options.differentiable else inputs.detach(),
            cov=cov,
            kind=kind,
            outputs=canonical_outputs(outputs, example_shape, output_shape.numel(), inputs.device),
            example_shape=example_shape,
            output_shape=output_shape,
            cost=cost,
            options=options,
            budget=options.budget(inputs.device),
            group_size=q,
            n_samples=n_samples,
            generator=generator,
        )

    def with_call(
        self, inputs: Inputs, outputs: Tensor | None, generator: torch.Generator | None
    ) -> Problem:
        """The same problem for another call's inputs, selected outputs and generator.

        The call has the same shapes: this is what a cached plan runs on.
        """
        return replace(
            self,
            inputs=inputs if self.options.differentiable else inputs.detach(),
            outputs=canonical_outputs(outputs, self.example_shape, self.K, inputs.device),
            generator=generator,
        )

    def rebased(self, other: Problem) -> Problem:
        """This problem (of a sub-model) for the call of ``other``.

        It takes ``other``'s inputs, selected outputs and generator.
        """
        return replace(self, inputs=other.inputs, outputs=other.outputs, generator=other.generator)

    def restricted(self, fm: FunctionalModel, cov: CovarianceOperator) -> Problem:
        """The same question about a sub-model (some of the parameters) with its covariance."""
        return replace(self, fm=fm, cov=cov, cost=measure_cost(fm, self.inputs))

    # -- sizes ----------------------------------------------------------------------------
    @property
    def sample_shape(self) -> torch.Size:
        """One batch element's output shape (without the batch dimension)."""
        return self.cost.output_shape

    @property
    def dtype(self) -> torch.dtype:
        """The outputs' dtype (the cotangents')."""
        return self.cost.output_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype results are accumulated and returned in (the covariance's)."""
        return self.cov.dtype

    @property
    def differentiable(self) -> bool:
        """Whether the result keeps its graph (``options.differentiable``)."""
        return self.options.differentiable

    @property
    def progress(self) -> bool:
        """Whether a progress bar is shown over the chunks (``options.progress``)."""
        return self.options.progress

    @property
    def B(self) -> int:
        """The number of batch elements."""
        return self.inputs.batch_size

    @property
    def T(self) -> int:
        """Example positions per batch element (the product of its example dimensions)."""
        return math.prod(self.example_shape[1:])

    @property
    def K(self) -> int:
        """Outputs per example (the product of the output dimensions)."""
        return math.prod(self.output_shape)

    @property
    def S(self) -> int:
        """Selected outputs per example (``K`` when none are selected)."""
        return self.K if self.outputs is None else self.outputs.shape[-1]

    @property
    def P(self) -> int:
        """The number of scalar parameters of the model."""
        return self.fm.num_params

    @property
    def rows_per_sample(self) -> int:
        """Rows per batch element, ``T * S``."""
        return self.T * self.S

    @property
    def groups(self) -> int:
        """Joint covariance: the number of groups ``B / group_size``."""
        return self.B // self.group_size

    @property
    def itemsize(self) -> int:
        """Bytes per element of the model's parameters."""
        return self.cost.itemsize

    def result_bytes(self) -> int:
        """Bytes of the canonical result, at the parameters' element size.

        ``(B, T, S)`` for a variance, ``(B, T, S, S)`` for a per-example covariance and
        ``(groups, q*T*S, q*T*S)`` for a joint covariance.
        """
        n = self.B * self.T * self.S
        size = {
            "variance": n,
            "covariance": n * self.S,
            "joint": n * self.group_size * self.rows_per_sample,
        }[self.kind]
        return size * self.itemsize

    def outputs_bytes(self) -> int:
        """Bytes of the model outputs ``f`` of the whole batch."""
        return self.B * self.cost.output_bytes

    # -- rows -----------------------------------------------------------------------------
    def row_index(self, chunk: RowChunk) -> Tensor:
        """``(b, r)`` flat positions in one batch element's output of the chunk's rows."""
        device = self.inputs.device
        rows = torch.arange(chunk.rows.start, chunk.rows.stop, device=device)
        t, s = rows // self.S, rows % self.S
        if self.outputs is None:
            index = t * self.K + s
            return index.expand(chunk.samples.stop - chunk.samples.start, -1)
        k = self.outputs[chunk.samples][:, t, s]
        return t * self.K + k

    def cotangents(self, chunk: RowChunk) -> Tensor:
        """One-hot cotangents ``(b, r, *sample_shape)`` of the chunk's rows."""
        return one_hot_cotangents(self.row_index(chunk), self.sample_shape, self.dtype)

    def select(self, values: Tensor) -> Tensor:
        """``(..., B, T, K)`` -> ``(..., B, T, S)``: the asked-for outputs."""
        if self.outputs is None:
            return values
        index = self.outputs.expand(*values.shape[:-3], *self.outputs.shape)
        return values.gather(-1, index)

    def canonical(self, f: Tensor) -> Tensor:
        """``f`` in the user's shape -> ``(B, T, K)``."""
        return f.reshape(self.B, self.T, self.K)

    # -- results --------------------------------------------------------------------------
    def user_result(self, result: Tensor) -> Tensor:
        """Canonical result -> the user's shape."""
        if self.kind == "joint":
            return result[0] if self.group_size == self.B else result
        lead = self.example_shape
        if self.kind == "variance":
            if self.outputs is None:
                return result.reshape(*lead, *self.output_shape)
            return result.reshape(*lead, self.S)
        return result.reshape(*lead, self.S, self.S)

    def describe(self) -> str:
        """The problem in one line: what is asked, its sizes and the covariance's type."""
        if self.kind == "joint" and self.group_size < self.B:
            what = f"joint covariance within {self.groups} groups of {self.group_size}"
        else:
            what = {
                "variance": "variance",
                "covariance": "per-example covariance",
                "joint": "joint covariance",
            }[self.kind]
        sel = f"{self.S} selected of {self.K}" if self.outputs is not None else f"{self.K}"
        return (
            f"{what} for {self.B} x {self.T} examples x {sel} outputs, "
            f"P={self.P:,}, {type(self.cov).__name__} covariance (sqrt columns r={self.cov.sqrt_cols:,})"
        )


def _group_size(group_size: int | None, kind: Kind, B: int) -> int:
    if group_size is None:
        return B if kind == "joint" else 1
    if kind != "joint":
        raise ValueError("group_size applies to joint covariances (kind='joint') only")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if B % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the batch of {B} examples into groups"
        )
    return group_size
