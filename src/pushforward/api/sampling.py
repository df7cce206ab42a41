"""Linearized function samples ``f(x) + J(x) L z``: one JVP per sample for the whole batch.

A weight-space draw ``θ* + L z`` (``z ~ N(0, I_r)``, ``L L^T = S`` the covariance's square-root
factor with ``r = cov.sqrt_cols`` columns) pushed through the model linearized at θ* moves every
output by ``J(x) L z``. One Jacobian-vector product gives that for all inputs of the batch at
once, whatever the number of outputs K. Because one sample is one weight perturbation shared by
every input, the samples are joint *function* samples: across inputs their covariance is the
joint ``J S J^T``, not just its per-example blocks.

Draws are reproducible and independent of chunking: one call
``torch.randint(2**62, (n_samples,), generator=generator)`` gives a seed per sample, and sample
``i`` is ``torch.randn(r, generator=torch.Generator(device).manual_seed(seed_i))``, whatever
``chunk_size`` is. Per-sample streams let the draws of a chunk be generated on all CPU cores
at once (PyTorch's CPU generator is sequential; for a diagonal covariance the r = P normal
numbers per sample would otherwise dominate the cost).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from pushforward.core.budget import chunk_budget, measure_cost, parse_memory
from pushforward.core.chunking import progress_bar
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.inputs import Inputs
from pushforward.covariance.operator import CovarianceOperator
from pushforward.products.jvp import push_tangents

__all__ = [
    "bind_covariance",
    "check_generator",
    "check_n_samples",
    "functional_samples",
    "perturbation_chunks",
    "sample_bytes",
    "sample_chunk_size",
    "sample_seeds",
]


def check_n_samples(n_samples: Any, name: str = "n_samples") -> int:
    """``n_samples`` as an int, or ``TypeError``/``ValueError`` unless it is a positive integer."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TypeError(f"{name} must be a positive integer, got {n_samples!r}")
    if n_samples < 1:
        raise ValueError(f"{name} must be a positive integer, got {n_samples}")
    return n_samples


def check_generator(generator: Any, device: torch.device) -> None:
    """Raise unless ``generator`` is ``None`` or a ``torch.Generator`` on ``device``'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device.type != torch.device(device).type:
        raise ValueError(
            f"generator is on {generator.device} but the inputs are on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


def bind_covariance(
    fm: FunctionalModel, cov: Any, dtype: torch.dtype, device: torch.device
) -> CovarianceOperator:
    """``cov`` checked against ``fm``'s parameter layout and cast to ``dtype`` on ``device``."""
    if not isinstance(cov, CovarianceOperator):
        raise TypeError(f"cov must be a pushforward covariance operator, got {type(cov).__name__}")
    cov = cov.bind(fm.layout)
    if cov.dtype != dtype or cov.device != device:
        cov = cov.to(dtype=dtype, device=device)  # differentiable, like Tensor.to
    return cov


def sample_bytes(fm: FunctionalModel, inputs: Inputs, cov: CovarianceOperator) -> int:
    """Working bytes of one sample: its draw and tangent (``r + 2P`` numbers), the tangent
    activations of every example, and three output-sized tensors (``J L z``, the sample and
    what the caller makes of it, e.g. its softmax)."""
    cost = measure_cost(fm, inputs)
    itemsize = cost.param_bytes // max(fm.num_params, 1)
    per_batch = 2 * cost.activation_bytes + 3 * cost.output_numel * itemsize
    return inputs.batch_size * per_batch + (cov.sqrt_cols + 2 * fm.num_params) * itemsize


def sample_chunk_size(
    fm: FunctionalModel, inputs: Inputs, cov: CovarianceOperator, budget: int, held: int = 0
) -> int:
    """How many samples to push at once within ``budget`` bytes, ``held`` of which are taken."""
    return max(1, int(chunk_budget(budget, held) // max(sample_bytes(fm, inputs, cov), 1)))


def sample_seeds(n: int, generator: torch.Generator | None, device: torch.device) -> list[int]:
    """One seed per sample, drawn from ``generator`` (or torch's default generator)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(2**62, (n,), generator=generator, device=gen_device).tolist()


def _tangents(seeds: list[int], cov: CovarianceOperator) -> Tensor:
    """``(n, P)`` weight-space perturbations ``L z_i``, ``z_i ~ N(0, I_r)`` from its own stream
    seeded ``seeds[i]``. Without autograd recording, the rows ``z_i`` are drawn on every CPU core
    at once (threads: PyTorch releases the GIL while it works), then mapped through ``L`` in one
    batched call (in place when ``r = P``)."""
    n, r = len(seeds), cov.sqrt_cols
    kw = {"dtype": cov.dtype, "device": cov.device}

    def draw(i: int, z: Tensor) -> Tensor:
        return z.normal_(generator=torch.Generator(device=z.device).manual_seed(seeds[i]))

    if torch.is_grad_enabled():  # differentiable w.r.t. the covariance: no in-place writes
        Z = torch.stack([draw(i, torch.empty(r, **kw)) for i in range(n)])
        return cov._sqrt_rows(Z)
    out = torch.empty(n, cov.num_params, **kw)
    Z = out if r == cov.num_params else torch.empty(n, r, **kw)
    workers = torch.get_num_threads() if out.device.type == "cpu" else 1
    if workers > 1 and n > 1:
        with ThreadPoolExecutor(min(workers, n)) as pool:
            list(pool.map(lambda i: draw(i, Z[i]), range(n)))
    else:
        for i in range(n):
            draw(i, Z[i])
    cov._sqrt_rows_into(Z, out)
    return out


def perturbation_chunks(
    fm: FunctionalModel,
    params: dict[str, Tensor],
    inputs: Inputs,
    cov: CovarianceOperator,
    n_samples: int,
    chunk_size: int,
    generator: torch.Generator | None,
    progress: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(f, J L Z)`` chunk by chunk: ``f`` of the output's shape ``(B, ...)`` and the
    chunk's output perturbations ``(c, B, ...)``, ``c <= chunk_size``, ``n_samples`` in all.

    Internal primitive (no validation); differentiable iff grad mode is on.
    """
    seeds = sample_seeds(n_samples, generator, cov.device)
    starts = range(0, n_samples, chunk_size)
    for start in progress_bar(starts, progress, "function samples", total=len(starts)):
        tangents = _tangents(seeds[start : start + chunk_size], cov)
        yield push_tangents(fm, params, inputs, fm.unflatten(tangents))


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
        chunk_size: samples pushed at once (default: as many as ``memory_budget`` allows).
        memory_budget: bytes or a string like ``"2GB"`` for the working memory (default: half of
            the available memory); the returned samples themselves are not counted against it.
        progress: show a tqdm bar over chunks.

    Returns:
        ``(n_samples, *f.shape)``.
    """
    fm = as_functional_model(model)
    inputs = fm.prepare(x)
    n_samples = check_n_samples(n_samples)
    check_generator(generator, inputs.device)
    cov = bind_covariance(fm, cov, fm.dtype, inputs.device)
    if chunk_size is None:
        chunk_size = sample_chunk_size(fm, inputs, cov, parse_memory(memory_budget, inputs.device))
    else:
        chunk_size = check_n_samples(chunk_size, "chunk_size")
    with torch.set_grad_enabled(differentiable):
        inputs = inputs if differentiable else inputs.detach()
        params = fm.params(differentiable)
        out: Tensor | None = None
        start = 0
        for f, W in perturbation_chunks(
            fm, params, inputs, cov, n_samples, chunk_size, generator, progress
        ):
            if out is None:
                out = f.new_empty(n_samples, *f.shape)
            out[start : start + W.shape[0]] = f + W
            start += W.shape[0]
    assert out is not None
    return out
