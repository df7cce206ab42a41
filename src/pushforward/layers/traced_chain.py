"""A chain of linear layers and elementwise activations, read from the forward's autograd graph.

Most models are not an ``nn.Sequential``: an MLP written as a module with its own ``forward``
(``self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))``) computes the same chain, but
its ``forward`` is Python that nothing can read ahead of time. Its forward can be *watched*
instead. The producer of layer pieces (``pushforward.layers.pieces``) runs the model once on the
chunk with its posterior parameters as fresh leaves requiring grad and the layer tap recording,
per traced call, the autograd nodes of its input and output at the moment of the call. Then
:func:`chain_backward` reads the graph of *this* forward:

* the model's output is the last traced call's output (or a view of it in the same element
  order: ``.squeeze(-1)`` of a one-output head), unchanged since the call;
* the first call's input depends on no posterior parameter;
* every other call's input is, unchanged since it was made, one elementwise activation
  (ReLU, tanh, sigmoid, GELU, SiLU, leaky ReLU, ELU, softplus, hardtanh, Mish) applied to the
  previous call's output, unchanged since that call: the activation's node has that call's node
  as its only input.

Each call's other inputs are its own weight and bias, leaves that depend on nothing, so these
facts leave no other path from a layer's output to the model's output: the rows go back by hand,
one product with each weight for all rows of all examples and the activations' derivatives by
PyTorch's own backward kernels on the values the graph saved — no batched backward, no probes.
A forward that is anything else (a skip connection, a normalization between layers, an in-place
change, a frozen layer in between) raises :class:`~pushforward.layers.tracing.StructureError`
naming what it found, and the next rung of the producer runs.

Since the graph is read on every chunk's own forward, data-dependent control flow cannot make the
pieces wrong: a forward that takes another path is read as that path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pushforward.core.functional_model import FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import TRANSFORM_LOCK
from pushforward.layers.tracing import (
    Analysis,
    Backward,
    LayerTap,
    StructureError,
    activation_backward,
    is_same_memory,
)

__all__ = ["chain_backward", "chain_shaped", "read_chain"]


def chain_shaped(calls) -> bool:
    """The traced calls could form a chain: plain linear layers on ``(1, in)`` inputs.

    (Checked once per layer structure; whether they do is read from each forward.)
    """
    return bool(calls) and all(
        c.geometry.plain
        and not c.geometry.transposed
        and len(c.input_shape) == 2
        and len(c.output_shape) == 2
        for c in calls
    )


def chain_backward(tap: LayerTap, f: Tensor) -> list[Backward]:
    """Per traced call ``i >= 1``, the backward of the activation before it (module docstring).

    Each takes rows ``(b, r, out)`` of the previous call's output (``owned``: they may be
    overwritten). Entry ``0`` is ``None`` (the first call's input is the model's own). Reads the
    graph of the forward ``tap`` recorded, whose output is ``f``; raises
    :class:`~pushforward.layers.tracing.StructureError` when it is not a chain.
    """
    nodes = tap.nodes
    if not nodes or any(n is None for n in nodes):
        raise StructureError("not every traced layer call ran")
    last_out = tap.outputs[-1]
    _, head_node, _, head_version = nodes[-1]
    if (
        not is_same_memory(last_out, f)  # the output itself, or a view of it (same order)
        or f.grad_fn is None  # no derivatives (made under torch.no_grad)
        or last_out.grad_fn is not head_node
        or f._version != head_version  # a view shares its base's version counter
    ):
        raise StructureError("the model's output is not its last linear layer's output")
    first = tap.inputs[0]
    if first.requires_grad:
        raise StructureError("the first linear layer's input depends on the posterior parameters")
    backwards: list[Backward | None] = [None]
    for i in range(1, len(nodes)):
        in_node, _, in_version, _ = nodes[i]
        a = tap.inputs[i]
        prev_node = nodes[i - 1][1]
        if a._version != in_version or a.grad_fn is not in_node or in_node is None:
            raise StructureError(f"the input of linear layer {i} is not an activation's output")
        backward = activation_backward(in_node)
        if backward is None:
            raise StructureError(
                f"the input of linear layer {i} comes from {type(in_node).__name__}, not an "
                "elementwise activation"
            )
        reads = in_node.next_functions
        if len(reads) != 1 or reads[0][0] is not prev_node or reads[0][1] != 0:
            raise StructureError(
                f"the activation before linear layer {i} does not read linear layer {i - 1}'s "
                "output alone"
            )
        backwards.append(backward)
    return backwards  # type: ignore[return-value]


def read_chain(
    fm: FunctionalModel, analysis: Analysis, params: dict[str, Tensor], inputs: Inputs
) -> tuple[Tensor, LayerTap, list[Backward | None]]:
    """The forward on ``inputs``, read as a chain: ``(f, tap, chain_backward(tap, f))``.

    The posterior parameters ``params`` enter as fresh leaves requiring grad; ``tap`` holds each
    traced call's input and output. No transform runs: only the transform lock is held (no
    other thread's transform has global kernels patched meanwhile), no kernel context entered.
    Raises :class:`~pushforward.layers.tracing.StructureError` when it is not a chain.
    """
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    tap = LayerTap(analysis, leaves)
    with TRANSFORM_LOCK, torch.enable_grad():
        with tap.active([None] * len(analysis.calls)):
            f = fm.call(leaves, inputs.args, inputs.kwargs)
        tap.check_complete()
        return f, tap, chain_backward(tap, f)
