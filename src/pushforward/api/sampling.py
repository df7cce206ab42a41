"""Linearized function samples ``f(x) + J(x) L z``: one JVP per sample for the whole batch.

Each sample is one weight-space draw ``θ* + L z`` pushed through the model linearized at θ*
(see :mod:`pushforward.products.perturbations` for how the draws are made: one seed per sample,
independent of chunking), so the samples are joint across the inputs of a batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pushforward.core.cost import measure_cost
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.options import Options, check_generator, check_positive_int
from pushforward.covariance.binding import bind_covariance
from pushforward.covariance.operator import CovarianceOperator
from pushforward.products.perturbations import perturbation_chunks, sample_bytes

__all__ = ["functional_samples"]


def functional_samples(
    model: FunctionalModel | torch.nn.Module,
    x: Any,
    cov: CovarianceOperator,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    differentiable: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Joint samples of the linearized model's outputs: ``f(x) + J(x) L z_i``, ``z_i ~ N(0, I_r)``.

    Each sample is one weight-space perturbation pushed through the linearized model (one JVP
    serving the whole batch), so samples are correlated across the inputs of ``x`` as the joint
    covariance ``J S J^T`` says (function samples, e.g. for Thompson sampling or batch
    acquisition functions).

    Args:
        model: a :class:`FunctionalModel` or an ``nn.Module`` (trainable parameters).
        x: inputs (tensor, tuple of tensors or mapping of keyword arguments), batch first.
        cov: the weight-space covariance S, a :class:`~pushforward.covariance.CovarianceOperator`.
        n_samples: number of samples.
        generator: a ``torch.Generator`` on the inputs' device for reproducible draws: it gives
            one seed per sample and sample ``i`` draws its ``z_i`` (``r = cov.sqrt_cols``
            numbers) from a stream with that seed, so the samples do not depend on
            ``chunk_size`` (see the module docstring). Default: the global generator.
        differentiable: keep the graph (reparameterized samples): gradients flow to ``x``, the
            model's parameters and the covariance's tensors.
        chunk_size: at most this many samples pushed at once (default: as many as
            ``memory_budget`` allows).
        memory_budget: bytes or a string like ``"2GB"`` bounding what the call allocates, the
            returned samples included (default: half of the available memory).
        progress: show a tqdm bar over chunks.

    Returns:
        ``(n_samples, *f.shape)``.
    """
    options = Options(
        memory_budget=memory_budget,
        differentiable=differentiable,
        progress=progress,
        chunk_size=chunk_size,
    )
    n_samples = check_positive_int(n_samples, "n_samples")
    fm = as_functional_model(model)
    inputs = fm.prepare(x)
    check_generator(generator, inputs.device)
    cost = measure_cost(fm, inputs)
    cov = bind_covariance(fm, cov, cost.output_dtype, inputs.device)
    B = inputs.batch_size
    budget = options.budget(inputs.device)
    held = (n_samples + 1) * B * cost.output_bytes  # the samples and f
    per = sample_bytes(cost, B, cov)
    chunk = budget.chunk(per, held, at_most=n_samples)
    budget.require(budget.peak(held, chunk, per), f"{n_samples:,} function samples")
    with torch.set_grad_enabled(differentiable):
        inputs = inputs if differentiable else inputs.detach()
        params = fm.params(differentiable)
        out: Tensor | None = None
        parts = []
        start = 0
        for f, W in perturbation_chunks(
            fm, params, inputs, cov, n_samples, chunk, generator, progress
        ):
            if differentiable:
                parts.append(f + W)
                continue
            if out is None:
                out = f.new_empty(n_samples, *f.shape)
            out[start : start + W.shape[0]] = f + W
            start += W.shape[0]
    return torch.cat(parts) if differentiable else out
