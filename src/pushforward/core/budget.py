"""Memory budgets: parsing ``"2GB"``, reading what is available, and measuring a model's cost.

The engine sizes its chunks so that its own working memory stays under a budget. The budget
is given in bytes or as a string (``"512MB"``, ``"2GiB"``); by default it is a safe fraction of
the memory available on the device. A model's activation memory per example is *measured* (the
bytes autograd saves for backward in a one-example forward), not guessed from its modules, so it
works for any architecture.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from pushforward.core.inputs import Inputs

__all__ = [
    "CHUNK_TARGET",
    "ModelCost",
    "available_memory",
    "chunk_budget",
    "format_bytes",
    "measure_cost",
    "parse_memory",
]

DEFAULT_FRACTION = 0.5
#: Chunks are sized to use at most this much working memory even under a larger budget:
#: beyond it larger chunks stop paying off and only raise the peak.
CHUNK_TARGET = 128 * 2**20
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
}


def parse_memory(budget: int | float | str | None, device: torch.device | None = None) -> int:
    """Bytes from ``budget``: a number of bytes, a string like ``"2GB"``/``"512 MiB"``, or
    ``None`` for the default (half of the memory available on ``device``)."""
    if budget is None:
        return int(DEFAULT_FRACTION * available_memory(device))
    if isinstance(budget, bool):
        raise TypeError("memory_budget must be a number of bytes or a string like '2GB'")
    if isinstance(budget, (int, float)):
        value = float(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read memory budget {budget!r}; use bytes or e.g. '2GB'")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory budget must be positive and finite, got {budget!r}")
    return int(value)


def chunk_budget(budget: int, held: int = 0) -> int:
    """Bytes a strategy may spend on one chunk: the budget left after ``held`` bytes, capped at
    :data:`CHUNK_TARGET`."""
    return max(0, min(budget - held, CHUNK_TARGET))


def available_memory(device: torch.device | None = None) -> int:
    """Bytes available for new allocations on ``device`` (CPU: ``MemAvailable``)."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 10**9


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass(frozen=True)
class ModelCost:
    """Measured per-example costs of one model on one input signature.

    Attributes:
        activation_bytes: bytes autograd saves for backward in a one-example forward.
        output_numel: elements of one example's output (all its tokens and outputs).
        param_bytes: bytes of one flat parameter vector (``P * itemsize``).
        forward_flops: floating-point operations of a one-example forward (matmuls,
            convolutions and attention as counted by ``torch.utils.flop_counter``; at least
            one operation per saved activation element).
    """

    activation_bytes: int
    output_numel: int
    param_bytes: int
    forward_flops: float


def measure_cost(fm, inputs: Inputs) -> ModelCost:
    """Run ``fm`` on the first example with saved-tensor hooks and a FLOP counter.

    The result is cached on ``fm`` per input signature (shapes and dtypes of one example).
    """
    signature = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs.tensors())
    cache = fm.__dict__.setdefault("_cost_cache", {})
    if signature not in cache:
        cache[signature] = _measure(fm, inputs)
    return cache[signature]


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
    for t in [*params.values(), *fm.module.parameters(), *fm.module.buffers(), *one.tensors()]:
        seen.add(t.untyped_storage().data_ptr())
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
        out = fm.call(params, one.args, one.kwargs)
    itemsize = next(iter(params.values())).element_size()
    activation_bytes = int(saved) + out.numel() * out.element_size()
    return ModelCost(
        activation_bytes=activation_bytes,
        output_numel=int(out.numel()),
        param_bytes=fm.num_params * itemsize,
        forward_flops=float(max(counter.get_total_flops(), activation_bytes // itemsize)),
    )
