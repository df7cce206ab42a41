"""Recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) written in elementary operations.

On CUDA, PyTorch runs these layers with cuDNN, whose backward refuses to run outside training
mode ("cudnn RNN backward can only be called in training mode") and which has no forward-mode
derivative: every Jacobian product of an eval-mode recurrent model would fail. Switching the
model to training mode is not an answer (dropout would draw, BatchNorm would couple examples),
and neither is switching cuDNN off for the process (convolutions would slow down). Inside
:func:`decomposed_rnn` the library's own calls of such a model compute each recurrent layer from
its definition — per time step a matrix product, the gates, the state update (PyTorch's gate
order and formulas) — which every transform (``vjp``, ``jvp``, ``vmap``) differentiates exactly,
in any mode, on any device. Nothing global changes: the model's mode and cuDNN's flags are left
as they are.

It applies to CUDA inputs (on the CPU PyTorch's own kernels already work under every
transform), to the padded-tensor form (a ``PackedSequence`` takes PyTorch's kernels) and to
evaluation (``train=False``: inter-layer dropout off).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["decomposed_rnn", "gru", "lstm", "rnn_relu", "rnn_tanh"]

Cell = Callable[[Tensor, tuple[Tensor, ...], Sequence[Tensor]], tuple[Tensor, ...]]


def _gates(x: Tensor, h: Tensor, w: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(W_ih x + b_ih, W_hh h + b_hh)`` for a layer's weights ``w`` (biases optional)."""
    gi = x @ w[0].T
    gh = h @ w[1].T
    if len(w) >= 4:
        gi, gh = gi + w[2], gh + w[3]
    return gi, gh


def _rnn_cell(nonlinearity: Callable[[Tensor], Tensor]) -> Cell:
    def cell(x: Tensor, state: tuple[Tensor, ...], w: Sequence[Tensor]) -> tuple[Tensor, ...]:
        gi, gh = _gates(x, state[0], w)
        return (nonlinearity(gi + gh),)

    return cell


def _gru_cell(x: Tensor, state: tuple[Tensor, ...], w: Sequence[Tensor]) -> tuple[Tensor, ...]:
    h = state[0]
    gi, gh = _gates(x, h, w)
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h,)


def _lstm_cell(x: Tensor, state: tuple[Tensor, ...], w: Sequence[Tensor]) -> tuple[Tensor, ...]:
    h, c = state
    gi, gh = _gates(x, h, w)
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if len(w) in (3, 5):  # a projection: h = W_hr h
        h = h @ w[-1].T
    return h, c


def _run(
    cell: Cell,
    x: Tensor,
    states: tuple[Tensor, ...],
    params: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    bidirectional: bool,
    batch_first: bool,
    per_layer: int,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The stacked (bidirectional) recurrence in elementary operations.

    Returns ``(output, final states)`` as PyTorch returns them; ``states`` are
    ``(layers * directions, N, H)`` each, ``params`` in ``_flat_weights`` order (``per_layer``
    tensors per layer and direction).
    """
    if batch_first:
        x = x.transpose(0, 1)  # (L, N, H_in)
    directions = 2 if bidirectional else 1
    finals: list[list[Tensor]] = [[] for _ in states]
    for layer in range(num_layers):
        outputs = []
        for d in range(directions):
            k = layer * directions + d
            w = params[k * per_layer : (k + 1) * per_layer]
            state = tuple(s[k] for s in states)
            steps = range(x.shape[0] - 1, -1, -1) if d == 1 else range(x.shape[0])
            hs: list[Tensor] = [None] * x.shape[0]  # type: ignore[list-item]
            for t in steps:
                state = cell(x[t], state, w)
                hs[t] = state[0]
            outputs.append(torch.stack(hs))
            for i, s in enumerate(state):
                finals[i].append(s)
        x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
    out = x.transpose(0, 1) if batch_first else x
    return out, tuple(torch.stack(f) for f in finals)


def _per_layer(params: Sequence[Tensor], layers: int, bidirectional: bool) -> int:
    """Weight tensors per layer and direction."""
    return len(params) // (layers * (2 if bidirectional else 1))


def _simple(nonlinearity: Callable[[Tensor], Tensor], name: str):
    """``torch.rnn_<name>`` (the padded-tensor form) in elementary operations."""

    def run(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
        per = _per_layer(params, num_layers, bidirectional)
        cell = _rnn_cell(nonlinearity)
        out, (h,) = _run(
            cell, x, (hx,), params, has_biases, num_layers, bidirectional, batch_first, per
        )
        return out, h

    run.__name__ = run.__qualname__ = f"rnn_{name}"
    run.__doc__ = f"``torch.rnn_{name}`` (the padded-tensor form) in elementary operations."
    return run


rnn_tanh = _simple(torch.tanh, "tanh")
rnn_relu = _simple(torch.relu, "relu")


def gru(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """``torch.gru`` (the padded-tensor form) in elementary operations."""
    per = _per_layer(params, num_layers, bidirectional)
    out, (h,) = _run(
        _gru_cell, x, (hx,), params, has_biases, num_layers, bidirectional, batch_first, per
    )
    return out, h


def lstm(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """``torch.lstm`` (the padded-tensor form) in elementary operations."""
    per = _per_layer(params, num_layers, bidirectional)
    out, (h, c) = _run(
        _lstm_cell, x, tuple(hx), params, has_biases, num_layers, bidirectional, batch_first, per
    )
    return out, h, c


_DECOMPOSED = {torch.rnn_tanh: rnn_tanh, torch.rnn_relu: rnn_relu, torch.gru: gru, torch.lstm: lstm}


class _DecomposedRNN(TorchFunctionMode):
    def __init__(self, everywhere: bool) -> None:
        super().__init__()
        self.everywhere = everywhere

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        own = _DECOMPOSED.get(func)
        if (
            own is not None
            and not kwargs
            and len(args) == 9  # the padded-tensor overload: (x, hx, params, has_biases, ...);
            and isinstance(args[2], (list, tuple))  # a PackedSequence's is (data, batch_sizes,
            and isinstance(args[3], bool)  # hx, params, has_biases, ...)
            and not args[6]  # evaluation: no inter-layer dropout
            and (self.everywhere or args[0].is_cuda)
        ):
            return own(*args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def decomposed_rnn(everywhere: bool = False) -> Iterator[None]:
    """Recurrent layers on CUDA computed in elementary operations inside the block.

    See the module docstring; ``everywhere``: on every device (the CPU included: for tests).
    """
    with _DecomposedRNN(everywhere):
        yield
