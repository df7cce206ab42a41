"""The unfolded input patches of a traced 1-d/2-d convolution.

A convolution's weight gradient and its K-FAC input factor are both products with the input
patches ``(b, C_in * prod(kernel), L)`` (``L`` output positions), in the weight's
``(C_in, *kernel)`` order: what ``torch.nn.functional.unfold`` gives after the convolution's own
zero padding. A 1-d convolution is unfolded as a 2-d one of height 1.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from pushforward.engine.structure.tracing import LayerCall

__all__ = ["conv_patches"]


def conv_patches(call: LayerCall, a: Tensor) -> Tensor:
    """``a (b, ..., C_in, *spatial)`` -> ``(b, C_in * prod(kernel), L)`` for any stride, padding
    (numbers, ``"valid"``, ``"same"``) and dilation of ``call``."""
    spatial = len(call.weight_shape) - 2
    kernel = tuple(call.weight_shape[2:])
    stride, dilation = (_ntuple(call.static.get(k, 1), spatial) for k in ("stride", "dilation"))
    b = a.shape[0]
    x = a.reshape(b, -1, *a.shape[a.dim() - spatial :])  # (b, C_in, *spatial)
    pads = _paddings(call.static.get("padding", 0), kernel, dilation, spatial)
    if spatial == 1:  # as a 2-d convolution of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation, pads = (1, *kernel), (1, *stride), (1, *dilation), [(0, 0), *pads]
    x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


def _ntuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _paddings(padding, kernel, dilation, n: int) -> list[tuple[int, int]]:
    """``(before, after)`` zero padding per spatial dimension, as the convolution applies it."""
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":  # total d*(k-1), the extra one after (as PyTorch does)
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _ntuple(padding, n)]
