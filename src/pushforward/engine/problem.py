"""One functional-variance problem: the model, inputs, covariance, what is asked, and budgets.

Canonical layout used by every strategy (whatever the user's output shape):

* ``B`` batch elements (dim 0 of the inputs), ``T`` example positions per batch element (the
  product of the remaining example dimensions, e.g. tokens; 1 for plain classification);
* ``K`` outputs per example (the product of the trailing ``output_dims`` dimensions), of which
  ``S`` are asked for (all K, or ``outputs[..., :S]``);
* a *row* is one (batch element, position, selected output) triple; a batch element has
  ``T * S`` rows.

Results in canonical layout: variance ``(B, T, S)``, per-example covariance ``(B, T, S, S)``,
joint covariance ``(B*T*S, B*T*S)`` (batch-major, then position, then output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pushforward.api.sampling import check_generator, check_n_samples
from pushforward.core.budget import ModelCost, measure_cost, parse_memory
from pushforward.core.chunking import RowChunk
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.inputs import Inputs
from pushforward.covariance.operator import CovarianceOperator
from pushforward.products.vjp import example_output_shape, one_hot_cotangents

__all__ = ["Kind", "Problem"]

Kind = Literal["variance", "covariance", "joint"]


@dataclass
class Problem:
    fm: FunctionalModel
    inputs: Inputs
    cov: CovarianceOperator
    kind: Kind
    outputs: Tensor | None  # canonical (B, T, S) long, or None for all K outputs
    sample_shape: torch.Size  # one batch element's output shape (without the batch dim)
    example_shape: torch.Size  # user's example dims (B, ...)
    output_shape: torch.Size
    dtype: torch.dtype
    budget: int
    differentiable: bool
    progress: bool
    cost: ModelCost
    n_samples: int | None = None  # Monte Carlo strategies: samples to draw (None: their default)
    generator: torch.Generator | None = None  # Monte Carlo strategies: source of the draws

    @classmethod
    def build(
        cls,
        model: FunctionalModel | torch.nn.Module,
        x: Any,
        cov: CovarianceOperator,
        kind: Kind,
        outputs: Tensor | None = None,
        memory_budget: int | str | None = None,
        differentiable: bool = False,
        progress: bool = False,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Problem:
        fm = as_functional_model(model)
        inputs = fm.prepare(x)
        if n_samples is not None:
            n_samples = check_n_samples(n_samples)
        check_generator(generator, inputs.device)
        if not isinstance(cov, CovarianceOperator):
            raise TypeError(
                f"cov must be a pushforward covariance operator, got {type(cov).__name__}"
            )
        cov = cov.bind(fm.layout)
        sample_shape, dtype = example_output_shape(fm, inputs)
        example_shape, output_shape = fm.split_shape(torch.Size((inputs.batch_size, *sample_shape)))
        if cov.dtype != dtype or cov.device != inputs.device:
            cov = cov.to(dtype=dtype, device=inputs.device)  # differentiable, like Tensor.to
        K = math.prod(output_shape)
        canonical = None
        if outputs is not None:
            canonical = _check_outputs(outputs, example_shape, K, inputs.device)
        return cls(
            fm=fm,
            inputs=inputs,
            cov=cov,
            kind=kind,
            outputs=canonical,
            sample_shape=sample_shape,
            example_shape=example_shape,
            output_shape=output_shape,
            dtype=dtype,
            budget=parse_memory(memory_budget, inputs.device),
            differentiable=differentiable,
            progress=progress,
            cost=measure_cost(fm, inputs),
            n_samples=n_samples,
            generator=generator,
        )

    # -- sizes ----------------------------------------------------------------------------
    @property
    def B(self) -> int:
        return self.inputs.batch_size

    @property
    def T(self) -> int:
        return math.prod(self.example_shape[1:])

    @property
    def K(self) -> int:
        return math.prod(self.output_shape)

    @property
    def S(self) -> int:
        return self.K if self.outputs is None else self.outputs.shape[-1]

    @property
    def P(self) -> int:
        return self.fm.num_params

    @property
    def rows_per_sample(self) -> int:
        return self.T * self.S

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def result_bytes(self) -> int:
        n = self.B * self.T * self.S
        size = {"variance": n, "covariance": n * self.S, "joint": n * n}[self.kind]
        return size * self.itemsize

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
            return result
        lead = self.example_shape
        if self.kind == "variance":
            if self.outputs is None:
                return result.reshape(*lead, *self.output_shape)
            return result.reshape(*lead, self.S)
        return result.reshape(*lead, self.S, self.S)

    def describe(self) -> str:
        what = {
            "variance": "variance",
            "covariance": "per-example covariance",
            "joint": "joint covariance",
        }
        sel = f"{self.S} selected of {self.K}" if self.outputs is not None else f"{self.K}"
        return (
            f"{what[self.kind]} for {self.B} x {self.T} examples x {sel} outputs, "
            f"P={self.P:,}, {type(self.cov).__name__} covariance (sqrt columns r={self.cov.sqrt_cols:,})"
        )


def _check_outputs(outputs: Tensor, example_shape: torch.Size, K: int, device) -> Tensor:
    if not isinstance(outputs, Tensor) or outputs.dtype not in (torch.int32, torch.int64):
        raise TypeError("outputs must be an integer index tensor of shape (*example_dims, S)")
    if outputs.shape[:-1] != example_shape or outputs.dim() != len(example_shape) + 1:
        raise ValueError(
            f"outputs has shape {tuple(outputs.shape)}; expected (*example_dims, S) = "
            f"({', '.join(map(str, example_shape))}, S)"
        )
    if outputs.numel() and (outputs.min() < 0 or outputs.max() >= K):
        raise ValueError(f"outputs must index the {K} outputs (0 <= index < {K})")
    B = example_shape[0]
    return outputs.to(device=device, dtype=torch.long).reshape(B, -1, outputs.shape[-1])
