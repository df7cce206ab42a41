"""Weight-space draws ``L z`` and their pushforwards ``J(x) L z``: one JVP per draw for the batch.

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

import torch
from torch import Tensor

from pushforward.core.chunking import progress_bar
from pushforward.core.cost import ModelCost, tangent_bytes
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.covariance.operator import CovarianceOperator
from pushforward.products.jvp import push_tangents

__all__ = ["draw_perturbations", "perturbation_chunks", "sample_bytes", "sample_seeds"]


def sample_bytes(cost: ModelCost, examples: int, cov: CovarianceOperator) -> int:
    """Working bytes of one sample pushed through ``examples`` examples.

    Its draw (``r`` numbers) and tangent, the tangent activations, three output-sized tensors per
    example (``J L z``, the sample and what the caller makes of it, e.g. its softmax) and the
    covariance's temporaries for one row.
    """
    per = tangent_bytes(cost, examples, outputs=3, extra_numbers=cov.sqrt_cols)
    return per + cov.workspace_bytes(1)


def sample_seeds(n: int, generator: torch.Generator | None, device: torch.device) -> list[int]:
    """One seed per sample, drawn from ``generator`` (or torch's default generator)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(2**62, (n,), generator=generator, device=gen_device).tolist()


def draw_perturbations(seeds: list[int], cov: CovarianceOperator) -> Tensor:
    """``(n, P)`` weight-space perturbations ``L z_i``, ``z_i ~ N(0, I_r)`` seeded ``seeds[i]``.

    Each ``z_i`` comes from its own stream. Without autograd recording, the rows ``z_i`` are drawn
    on every CPU core at once (threads: PyTorch releases the GIL while it works), then mapped
    through ``L`` in one batched call (in place when ``r = P``).
    """
    n, r = len(seeds), cov.sqrt_cols
    kw = {"dtype": cov.dtype, "device": cov.device}

    def draw(i: int, z: Tensor) -> Tensor:
        return z.normal_(generator=torch.Generator(device=z.device).manual_seed(seeds[i]))

    if torch.is_grad_enabled():  # differentiable w.r.t. the covariance: no in-place writes
        Z = torch.stack([draw(i, torch.empty(r, **kw)) for i in range(n)])
        return cov.sqrt_rows(Z)
    out = torch.empty(n, cov.num_params, **kw)
    Z = out if r == cov.num_params else torch.empty(n, r, **kw)
    workers = torch.get_num_threads() if out.device.type == "cpu" else 1
    if workers > 1 and n > 1:
        with ThreadPoolExecutor(min(workers, n)) as pool:
            list(pool.map(lambda i: draw(i, Z[i]), range(n)))
    else:
        for i in range(n):
            draw(i, Z[i])
    cov.sqrt_rows_into(Z, out)
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
    """Yield ``(f, J L Z)`` chunk by chunk, ``n_samples`` perturbations in all.

    ``f`` has the output's shape ``(B, ...)`` and ``J L Z`` holds the chunk's output perturbations
    ``(c, B, ...)``, ``c <= chunk_size``.

    Internal primitive (no validation); differentiable iff grad mode is on.
    """
    seeds = sample_seeds(n_samples, generator, cov.device)
    starts = range(0, n_samples, chunk_size)
    for start in progress_bar(starts, progress, "function samples", total=len(starts)):
        tangents = draw_perturbations(seeds[start : start + chunk_size], cov)
        yield push_tangents(fm, params, inputs, fm.unflatten(tangents))
