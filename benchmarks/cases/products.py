"""Cases for this library's existing products: explicit per-example Jacobians, and 100
linearized samples by forward-mode JVPs against 100 plain forward passes (W5)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from harness.registry import Context, register
from torch import Tensor

import pushforward as pf
from cases import workloads

#: Samples drawn / forward passes made in W5.
NUM_SAMPLES = 100


def _jacobian(ctx: Context, batch: int) -> Callable[[], object]:
    w = workloads.build(ctx, "jacobian-cnn", batch)
    return partial(pf.jacobian, pf.FunctionalModel(w.model), w.x)


for _b in workloads.JACOBIAN_BATCHES:
    register(
        f"jacobian-cnn/pushforward-jacobian/B={_b}",
        workload="jacobian-cnn",
        method="(B, K, P) by pushforward.products.jacobian (per-example rows, chunked)",
        library="pushforward",
        batch=_b,
    )(partial(_jacobian, batch=_b))


@register(
    "w5-samples/forward-passes",
    workload="w5-samples",
    method=f"{NUM_SAMPLES} forward passes of the batch (torch.no_grad)",
    library="torch",
    tags=("anchor",),
)
def _forward_passes(ctx: Context) -> Callable[[], object]:
    w = workloads.build(ctx, "w5-samples")

    @torch.no_grad()
    def run() -> Tensor:
        return torch.stack([w.model(w.x) for _ in range(NUM_SAMPLES)])

    return run


@register(
    "w5-samples/pushforward-batched-jvp",
    workload="w5-samples",
    method=f"{NUM_SAMPLES} samples f + J S^½ z: pushforward.batched_jvp (random diagonal S)",
    library="pushforward",
)
def _batched_jvp_samples(ctx: Context) -> Callable[[], object]:
    w = workloads.build(ctx, "w5-samples")
    fm = pf.FunctionalModel(w.model)
    scale = fm.flatten(workloads.random_diagonal(ctx, w)).sqrt()
    generator = torch.Generator(device=w.x.device)

    def run() -> Tensor:
        generator.manual_seed(ctx.seed)
        z = torch.randn(NUM_SAMPLES, fm.num_params, generator=generator, device=w.x.device)
        f, jv = pf.batched_jvp(fm, w.x, z * scale)
        return f + jv

    return run
