"""Kernel choices that keep every ``torch.func`` transform working and exact.

* :func:`transform_safe_kernels` — the math attention backend and no fused
  ``MultiheadAttention``/``TransformerEncoderLayer`` fast path: the fused kernels have no
  forward-mode derivative and no ``vmap`` batching rule.
* :func:`decomposed_layer_norm` — ``layer_norm`` written in elementary ops. PyTorch's fused
  layer-norm forward-mode derivative is wrong when differentiated again (reverse-over-forward
  and forward-over-forward; pytorch/pytorch#196700), which would make ``differentiable=True``
  forward-mode results silently wrong for any model with LayerNorm.
* :func:`consistent_embedding` — ``embedding(ids, W, padding_idx=p)``: PyTorch's backward treats
  row ``p`` as constant (zero gradient) but its forward-mode derivative does not, so forward and
  reverse mode would disagree. Inside the block the padding positions' outputs are detached, so
  both modes give the reverse-mode (laplace-torch) Jacobian.

:func:`transform_kernels` also holds :data:`TRANSFORM_LOCK` for its duration: PyTorch's
forward-mode AD levels and its global kernel flags are shared by all threads, so two threads
running ``torch.func`` transforms at once corrupt each other's results ("forward AD level with an
invalid index", wrong values). The library's transformed computations therefore run one at a
time per process; plain autograd and everything else run concurrently.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: Held while a ``torch.func`` transform of this library runs (re-entrant: transforms nest).
TRANSFORM_LOCK = threading.RLock()

__all__ = [
    "TRANSFORM_LOCK",
    "consistent_embedding",
    "decomposed_layer_norm",
    "transform_kernels",
    "transform_safe_kernels",
]


class _SafeKernels:
    """The process-wide flags of :func:`transform_safe_kernels`, shared by all threads.

    They are set while any thread is inside the block and restored when the last one leaves
    (PyTorch's flags are global: two threads saving and restoring them independently would leave
    them switched off).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.fastpath = True
        self.sdpa: contextlib.AbstractContextManager | None = None

    def enter(self) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with self.lock:
            if self.users == 0:
                self.fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                self.sdpa = sdpa_kernel(SDPBackend.MATH)
                self.sdpa.__enter__()
            self.users += 1

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                assert self.sdpa is not None
                self.sdpa.__exit__(None, None, None)
                self.sdpa = None
                torch.backends.mha.set_fastpath_enabled(self.fastpath)


_SAFE = _SafeKernels()


@contextlib.contextmanager
def transform_safe_kernels() -> Iterator[None]:
    """Math attention backend and no ``MultiheadAttention`` fast path inside the block.

    Set process-wide while any thread is inside, restored when the last one leaves.
    """
    _SAFE.enter()
    try:
        yield
    finally:
        _SAFE.leave()


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    centered = x - x.mean(dims, keepdim=True)
    y = centered * torch.rsqrt(centered.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _embedding(input, weight, padding_idx=None, *args, **kwargs):
    out = F.embedding(input, weight, padding_idx, *args, **kwargs)
    if padding_idx is None:
        return out
    pad = padding_idx if padding_idx >= 0 else padding_idx + weight.shape[0]
    return torch.where((input == pad).unsqueeze(-1), out.detach(), out)


class _DecomposedLayerNorm(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm or func is torch.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


class _ConsistentEmbedding(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            return _embedding(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def consistent_embedding() -> Iterator[None]:
    """Embedding padding rows are constant in forward mode as in reverse mode (see module doc)."""
    with _ConsistentEmbedding():
        yield


@contextlib.contextmanager
def decomposed_layer_norm() -> Iterator[None]:
    """Compute ``layer_norm`` from elementary ops inside the block (exact higher derivatives)."""
    with _DecomposedLayerNorm():
        yield


def transform_kernels(safe_attention: bool) -> contextlib.ExitStack:
    """The kernel context for a transformed computation, under :data:`TRANSFORM_LOCK`.

    It enters :func:`consistent_embedding`, :func:`transform_safe_kernels` when ``safe_attention``,
    and :func:`decomposed_layer_norm` when grad mode is on (the result will be differentiated
    again).
    """
    stack = contextlib.ExitStack()
    stack.enter_context(TRANSFORM_LOCK)
    stack.enter_context(consistent_embedding())
    if safe_attention:
        stack.enter_context(transform_safe_kernels())
    if torch.is_grad_enabled():
        stack.enter_context(decomposed_layer_norm())
    return stack
