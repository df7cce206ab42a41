"""References for testing code built on this library (and the library itself).

The way linear_operator ships its operator test case, this module ships what our own tests
check against, for your models and operators:

* :func:`brute_force_jacobian` — the per-example Jacobian by one ``torch.autograd.grad`` per
  output entry of a single full-batch forward (no ``torch.func``, no batch slicing): slow,
  obviously right, for small models in float64;
* :func:`check_covariance_operator` — every product of a covariance operator against its dense
  matrix (columns, rows, square-root factor, quadratic forms, diagonal, restrictions, copies);
* :func:`peak_memory` — the peak of PyTorch's allocations during a call (the allocator's own
  count: CPU through the profiler's memory events, CUDA through ``max_memory_allocated``), to
  check a ``memory_budget``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from pushforward.core.functional_model import FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.core.layout import ParamLayout
from pushforward.covariance.operator import CovarianceOperator

__all__ = ["brute_force_jacobian", "check_covariance_operator", "peak_memory"]

R = TypeVar("R")


def brute_force_jacobian(fm: FunctionalModel, x: Any) -> tuple[Tensor, Tensor]:
    """The per-example Jacobian by brute force: one ``torch.autograd.grad`` per output entry.

    All of a single full-batch forward (no ``torch.func``, no batch slicing): slow, obviously
    right, for small models in float64.

    Args:
        fm: the model (its selected parameters are the P).
        x: inputs (tensor, tuple of tensors, or mapping of keyword arguments).

    Returns:
        ``(f, J)`` with ``J.shape == f.shape + (P,)``.
    """
    inputs = Inputs.from_user(x)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in fm.params(False).items()}
    with torch.enable_grad():
        f = fm.call(params, inputs.args, inputs.kwargs)
        rows = []
        for entry in f.reshape(-1):
            grads = torch.autograd.grad(
                entry, list(params.values()), retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for g, p in zip(grads, params.values(), strict=True)
                    ]
                )
            )
    return f.detach(), torch.stack(rows).reshape(*f.shape, fm.num_params)


def _close(name: str, got: Tensor, want: Tensor, atol: float, rtol: float) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if err > atol + rtol * scale:
        raise AssertionError(f"{name}: max error {err:.3g} (reference scale {scale:.3g})")


def check_covariance_operator(
    op: CovarianceOperator,
    dense: Tensor,
    *,
    layout: ParamLayout | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    seed: int = 0,
) -> None:
    """Raise ``AssertionError`` unless ``op`` behaves as the dense covariance ``dense`` (P x P).

    Checks, against ``dense``: ``to_dense``, ``diagonal``, column products (``matmul``, ``@``,
    ``sqrt_matmul``, ``sqrt_t_matmul``), row products (``matmul_rows``, ``V @ op``,
    ``sqrt_rows``, ``sqrt_t_rows``, ``sqrt_rows_into``, ``quadratic_rows``), the square-root
    factor (``L L^T = Σ`` with ``sqrt_cols`` columns), ``marginal`` of a scrambled index set,
    ``.to(float32)``, sizes, and with ``layout`` (or ``op.layout``) ``block`` of every parameter
    and ``param_groups`` (a partition into mutually uncorrelated groups).

    Args:
        op: the operator under test.
        dense: its matrix, built independently.
        layout: the parameter layout to bind to (default: ``op.layout``, if any).
        rtol: relative tolerance, of the reference's largest entry (default ``1e3 * eps`` of
            ``dense.dtype``).
        atol: absolute tolerance.
        seed: seed of the random test vectors.
    """
    rtol = 1e3 * torch.finfo(dense.dtype).eps if rtol is None else rtol
    P = dense.shape[0]
    layout = layout if layout is not None else op.layout
    if layout is not None:
        op = op.bind(layout)
    if op.num_params != P:
        raise AssertionError(f"num_params {op.num_params}, expected {P}")
    g = torch.Generator().manual_seed(seed)
    kw = {"dtype": dense.dtype, "generator": g}

    def close(name: str, got: Tensor, want: Tensor) -> None:
        _close(name, got, want, atol, rtol)

    close("to_dense", op.to_dense(), dense)
    close("diagonal", op.diagonal(), dense.diagonal())
    v, V, rows = torch.randn(P, **kw), torch.randn(P, 3, **kw), torch.randn(4, P, **kw)
    close("matmul(vector)", op.matmul(v), dense @ v)
    close("matmul(columns)", op.matmul(V), dense @ V)
    close("op @ V", op @ V, dense @ V)
    close("matmul_rows", op.matmul_rows(rows), rows @ dense)
    close("V @ op", rows.reshape(2, 2, P) @ op, (rows @ dense).reshape(2, 2, P))
    close("quadratic_rows", op.quadratic_rows(rows), torch.einsum("np,pq,nq->n", rows, dense, rows))
    r = op.sqrt_cols
    L = op.sqrt_dense()
    if L.shape != (P, r):
        raise AssertionError(f"sqrt_dense has shape {tuple(L.shape)}, expected ({P}, {r})")
    close("sqrt factor L L^T", L @ L.T, dense)
    z, Z = torch.randn(r, **kw), torch.randn(5, r, **kw)
    close("sqrt_matmul", op.sqrt_matmul(z), L @ z)
    close("sqrt_rows", op.sqrt_rows(Z), Z @ L.T)
    out = torch.empty(5, P, dtype=dense.dtype)
    op.sqrt_rows_into(Z, out)
    close("sqrt_rows_into", out, Z @ L.T)
    close("sqrt_t_matmul", op.sqrt_t_matmul(V), L.T @ V)
    close("sqrt_t_rows", op.sqrt_t_rows(rows), rows @ L)
    index = torch.randperm(P, generator=g)[: max(1, P // 2)]
    sub = op.marginal(index)
    close("marginal", sub.to_dense(), dense[index[:, None], index[None, :]])
    Ls = sub.sqrt_dense()
    close("marginal's sqrt factor", Ls @ Ls.T, dense[index[:, None], index[None, :]])
    low = op.to(torch.float32)
    if low.dtype != torch.float32:
        raise AssertionError(f".to(float32) gave dtype {low.dtype}")
    single = 1e3 * torch.finfo(torch.float32).eps
    _close(".to(float32)", low.to_dense().to(dense.dtype), dense, atol, single)
    if layout is None:
        return
    label = torch.empty(P, dtype=torch.long)
    covered: list[str] = []
    for i, group in enumerate(op.param_groups()):
        idx = layout.index(group.names)
        label[idx] = i
        covered += group.names
        if group.operator.layout != layout.sub(group.names):
            raise AssertionError(f"param group {group.names} is not bound to its sub-layout")
        close(f"param group {group.names}", group.operator.to_dense(), dense[idx[:, None], idx])
    if sorted(covered) != sorted(layout.names):
        raise AssertionError(f"param_groups cover {covered}, not every parameter once")
    across = label[:, None] != label[None, :]
    if (dense[across] != 0).any():
        raise AssertionError("param_groups are not uncorrelated: Σ has entries across groups")
    for name in layout.names:
        block = op.block(name)
        sl = layout.slices[name]
        close(f"block({name!r})", block.to_dense(), dense[sl, sl])


def peak_memory(fn: Callable[[], R], device: torch.device | str = "cpu") -> tuple[R, int]:
    """``(fn(), peak)``: the most bytes PyTorch's allocator held at once during the call.

    Counted beyond what it held before (freed and reallocated memory counted once). CPU: from the
    profiler's memory events (``profile_memory=True``); CUDA: from
    ``torch.cuda.max_memory_allocated``. Allocations outside PyTorch's allocator (NumPy, Python
    objects) are not counted.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    total = peak = 0
    for e in sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    ):
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return result, int(peak)
