"""A chain of linear layers and elementwise activations: its layer pieces by hand.

The most common model — an MLP written as ``nn.Sequential(Linear, ReLU, Linear, ...)``
— needs no tracing machinery at all: its forward pass is a fixed sequence of layers, every
example runs the same program on its own row of the batch, and the backward pass of a cotangent
row through it is a product with each weight and with each activation's derivative. Done by
hand, the forward runs once on the whole chunk (no ``vmap``, no autograd graph) and the backward
takes all rows of all examples through each weight in one matrix product, with the activations'
derivatives computed once per example (not once per row).

:func:`find_chain` recognizes such a model: an ``nn.Sequential`` (nested ones are flattened)
whose modules are exactly ``nn.Linear`` or one of the elementwise activations below (or
``nn.Identity``, or ``nn.Dropout`` in eval mode), without hooks, called on one ``(B, in)``
tensor — or on one ``(B, ...)`` tensor that an ``nn.Flatten()`` first in the chain flattens (an
MLP on images) — its output the last module's. Subclasses are not accepted (they may override
``forward``), nor anything else: those models take the general rungs of the producer
(``pushforward.layers.pieces``), which give the same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp
from torch.nn.modules import module as module_globals

from pushforward.core.chunking import spans
from pushforward.core.functional_model import FunctionalModel, default_output_fn
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import TRANSFORM_LOCK
from pushforward.layers.directions import add_row_squares
from pushforward.layers.tracing import (
    ALL,
    Backward,
    LayerCall,
    StructureError,
    derivative_backward,
    output_backward,
)

__all__ = ["BackStep", "Chain", "chain_intact", "find_chain", "rows_back", "square_sums_back"]

#: Activations whose Jacobian is diagonal (one output entry per input entry): the derivative
#: is one forward-mode product with a tangent of ones.
ELEMENTWISE: frozenset[type[nn.Module]] = frozenset(
    {
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.ELU,
        nn.CELU,
        nn.SELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Tanh,
        nn.Sigmoid,
        nn.Softplus,
        nn.Hardtanh,
        nn.Hardsigmoid,
        nn.Hardswish,
        nn.LogSigmoid,
        nn.Softsign,
        nn.Tanhshrink,
    }
)


@dataclass(frozen=True)
class _Linear:
    module: nn.Linear
    weight_name: str | None  # the posterior parameter's name (None: frozen)
    bias_name: str | None
    call: int | None  # its index among the traced layer calls (None: nothing selected)


@dataclass(frozen=True)
class Chain:
    """The recognized layers, in forward order (see the module docstring)."""

    steps: tuple[_Linear | nn.Module, ...]
    flatten: bool = False

    @functools.cached_property
    def calls(self) -> int:
        """The number of traced layer calls (linear layers with selected parameters)."""
        return sum(isinstance(s, _Linear) and s.call is not None for s in self.steps)

    @property
    def ends_with_linear(self) -> bool:
        """The chain's output is a linear layer's output (its last step)."""
        return bool(self.steps) and isinstance(self.steps[-1], _Linear)

    @property
    def output_call(self) -> int | None:
        """The traced layer call whose output is the chain's output (its last step), if any."""
        return self.steps[-1].call if self.ends_with_linear else None

    def pieces(
        self,
        params: dict[str, Tensor],
        x: Tensor,
        cotangents: Callable[[Tensor], Tensor],
        lock: AbstractContextManager,
        needed: frozenset[int] | None = None,
        at_head: Callable[[Tensor], Tensor] | None = None,
        flat: bool = False,
        squares: int | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """The chain's layer pieces by hand: one forward on the chunk, one backward of its rows.

        Args:
            params: the selected parameters by name (frozen weights are read from the modules).
            x: inputs ``(b, in)`` (``(b, ...)`` when the chain starts by flattening its input).
            cotangents: the cotangent rows ``cotangents(f) (b, r, K)`` of the outputs.
            lock: the module's lock, held while frozen weights are read from the modules.
            needed: the layer calls whose gradients are formed; the backward stops once they
                are (default: all; the others are ``None``).
            at_head: with the chain ending in a linear layer, start the backward at that
                layer's input with ``at_head(weight) (b, r, in)`` — the rows times its weight,
                formed by the caller — and leave the last layer's own gradients to the caller
                (they are its rows).
            flat: give the inputs ``(b, in)`` and the gradients ``(b, r, out)`` as they are (no
                layer layout).
            squares: give each call's gradients summed over the rows, squared (``(b, 1, out)``,
                flat ``(b, out)``), the rows taken back in groups of whole examples of about
                this many rows in all (:func:`square_sums_back`).

        Returns:
            ``(f (b, K), a, G)``: per traced layer call its input ``(b, 1, in)`` and its output
            gradients ``(b, r, 1, out)`` (the layout of one-example shapes inside the model).
        """
        needed = frozenset(range(self.calls)) if needed is None else needed
        a: list[Tensor | None] = [None] * self.calls
        G: list[Tensor | None] = [None] * self.calls
        saved: list = []  # per step: a linear layer's weight, an activation's backward
        if self.flatten:
            x = x.flatten(1)
        h = x
        fresh = False  # h is a linear layer's output that nothing else holds (may be overwritten)
        # the transform lock first, then the module's (the order every transform takes them in:
        # an activation's derivative is a forward-mode product)
        with TRANSFORM_LOCK, lock:
            for step in self.steps:
                if isinstance(step, _Linear):
                    weight, bias = _values(step, params)
                    if step.call is not None:
                        a[step.call] = h if flat else h.unsqueeze(1)
                    h, fresh = F.linear(h, weight, bias), True
                    saved.append(weight)
                else:
                    if h is x:  # an in-place activation must not change the caller's inputs
                        h = h.clone()
                    h, back = _activation(step, h, fresh)
                    fresh = False
                    saved.append(back)
        if any(v is None for v in a):
            raise StructureError("a traced layer call is not in the chain")
        left = set(needed)
        steps, head_weight = self.steps, saved[-1]
        if at_head is not None and self.ends_with_linear:
            left.discard(self.output_call)  # type: ignore[arg-type]
            steps, saved = steps[:-1], saved[:-1]
        if not left:
            return h, a, G  # type: ignore[return-value]
        if steps is self.steps:
            g = cotangents(h)  # (b, r, K)
            owned = False  # g is this function's own memory (safe to scale in place)
        else:
            g = at_head(head_weight)  # (b, r, in): the rows times the head's weight (maybe a view)
            owned = False
        back = [
            (step.call, t) if isinstance(step, _Linear) else t
            for step, t in zip(reversed(steps), reversed(saved), strict=True)
        ]
        if squares is None:
            for call, rows in rows_back(g, owned, back, left):
                G[call] = rows if flat else rows.unsqueeze(2)
        else:
            for call, sums in square_sums_back(g, owned, back, left, squares).items():
                G[call] = sums if flat else sums.unsqueeze(1)
        if left:
            raise StructureError("a traced layer call is not in the chain")
        return h, a, G  # type: ignore[return-value]


#: One step of a chain's backward: a linear layer's ``(call, weight)`` (``call``: its traced layer
#: call, ``None`` for a frozen layer) or an activation's backward.
BackStep = tuple[int | None, Tensor] | Backward


def rows_back(
    g: Tensor, owned: bool, steps: list[BackStep], left: set[int]
) -> Iterator[tuple[int, Tensor]]:
    """Rows ``g (b, r, out)`` taken back through ``steps`` (last layer first).

    Yields ``(call, rows at its output)`` for every traced layer call on the way, and stops once
    the calls in ``left`` (emptied on the way) are all reached. Each linear layer is one product
    with its weight for all rows of all examples; each activation is applied to rows this function
    owns in place (``owned``: ``g`` itself may be overwritten). A yielded tensor is never written
    to afterwards.
    """
    b, r = g.shape[:2]
    for step in steps:
        if callable(step):
            g = step(g, owned)
            owned = True
            continue
        call, weight = step
        if call is not None:
            yield call, g
            owned = False
            left.discard(call)
            if not left:  # nothing further back is needed
                return
        g = (g.reshape(b * r, -1) @ weight).reshape(b, r, -1)
        owned = True


class _AlternatingProducts:
    """Products of rows with weights written into two workspaces in turn (a group's products).

    A product's input is the previous product (in the other workspace) or not a workspace at all,
    so no input is overwritten; a product is overwritten two products later. For a caller done
    with each product's rows by then: :func:`square_sums_back`, whose groups of examples would
    otherwise each allocate their products anew (and, on a freshly trimmed heap, touch new pages).

    Args:
        size: the most entries of one product.
        like: a tensor of the products' dtype and device.
    """

    def __init__(self, size: int, like: Tensor) -> None:
        self.spaces = (like.new_empty(size), like.new_empty(size))
        self.turn = 0
        #: per workspace and product shape ``(b, r, in)``: its ``(b * r, in)`` and ``(b, r, in)``
        #: views (made once: a group's products repeat the previous group's shapes)
        self.views: dict[tuple[int, int, int, int], tuple[Tensor, Tensor]] = {}

    def ones(self, shape: torch.Size) -> Tensor:
        """Ones of ``shape`` for use after the products: in a workspace where they fit."""
        space = self.spaces[0]
        if shape.numel() > space.numel():
            return space.new_ones(shape)
        return space[: shape.numel()].view(shape).fill_(1)

    def __call__(self, rows: Tensor, weight: Tensor) -> Tensor:
        b, r = rows.shape[:2]
        key = (self.turn, b, r, weight.shape[1])
        self.turn ^= 1
        views = self.views.get(key)
        if views is None:
            flat = self.spaces[key[0]][: b * r * weight.shape[1]]
            views = self.views[key] = (flat.view(b * r, -1), flat.view(b, r, -1))
        torch.mm(rows.reshape(b * r, -1), weight, out=views[0])
        return views[1]


def square_sums_back(
    g: Tensor, owned: bool, steps: list[BackStep], left: set[int], group: int
) -> dict[int, Tensor]:
    """Per traced layer call, ``sum_r rows_r^2`` ``(b, out)`` of rows ``g (b, r, out)`` there.

    The rows go back through ``steps`` (last layer first) in groups of whole examples, about
    ``group`` rows in all (one example at least): what :func:`rows_back` yields, reduced on the
    way. Only one group's rows are alive at each layer, and a group that fits in a core's cache
    keeps the activations' backward and the squares there. The products of every group are
    written into the same two workspaces; a call's rows are squared (in place where they are this
    function's) once the product with its weight has read them, and summed straight into the
    group's slice of the call's sums. ``owned`` and ``left`` are as for :func:`rows_back` (the
    groups are disjoint slices of ``g``: each is overwritten at most once).

    Two steps are taken once instead of once per group. A call at the first step has the rows
    ``g`` themselves: their squares are summed at once, and the groups start at its weight. The
    elementwise activations right before the last call reached (its rows ``d * u_r``, ``d`` their
    derivative) scale that call's sums ``sum_r u_r^2`` by ``d^2``.
    """
    b, r = g.shape[:2]
    sums: dict[int, Tensor] = {}
    steps = list(steps)
    if steps and not callable(steps[0]) and steps[0][0] in left:
        call, weight = steps[0]
        sums[call] = add_row_squares(g)
        left.discard(call)
        steps[0] = (None, weight)  # the groups still go through its weight
    found = [i for i, step in enumerate(steps) if not callable(step) and step[0] in left]
    if not found:  # nothing asked is further back (else the caller raises on ``left``)
        return sums
    last = first = found[-1]
    while first > 0 and callable(steps[first - 1]):
        first -= 1
    final, tail, steps = steps[last][0], steps[first:last], steps[:first]
    # each call's sums, filled group by group: the rows at a call are as wide as its weight's
    # outputs, the last call's as the last product's inputs
    widths = [step[1].shape[1] for step in steps if not callable(step)]
    for i in found[:-1]:
        call, weight = steps[i]
        sums[call] = g.new_empty(b, weight.shape[0])
    sums[final] = g.new_empty(b, widths[-1] if widths else g.shape[2])
    left.difference_update(sums)
    groups = -(-b // max(1, group // max(r, 1)))  # of at most ``group`` rows (one example)
    examples = max(1, -(-b // max(groups, 1)))  # as many in each group
    product = _AlternatingProducts(min(examples, b) * r * max(widths), g) if widths else None
    for part in spans(b, examples):
        rows, mine = g[part], owned
        for step in steps:
            if callable(step):
                rows, mine = step(rows, mine, part), True
                continue
            call, weight = step
            after = product(rows, weight)  # type: ignore[misc]
            if call in sums:  # its rows are read: square them
                _sum_squares(rows, mine, sums[call][part])
            rows, mine = after, True
        _sum_squares(rows, mine, sums[final][part])
    if tail:
        scaled = sums[final]
        # the derivative: the activations' backward of ones (in a workspace when there is one)
        d = product.ones(scaled.shape) if product is not None else torch.ones_like(scaled)
        for step in tail:
            d = step(d.unsqueeze(1), True).squeeze(1)  # type: ignore[operator]
        scaled.mul_(d.square_())
    return sums


def _sum_squares(rows: Tensor, mine: bool, out: Tensor) -> None:
    """``out = sum_r rows_r^2`` ``(e, width)`` of rows ``(e, r, width)``, in place if ``mine``."""
    torch.sum(rows.square_() if mine else rows.square(), 1, out=out)


def _values(step: _Linear, params: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    m = step.module
    weight = params[step.weight_name] if step.weight_name else m.weight.detach()
    if step.bias_name:
        return weight, params[step.bias_name]
    return weight, None if m.bias is None else m.bias.detach()


_aten = torch.ops.aten
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

#: ``(module, input z, gradient g) -> g`` through the activation, by PyTorch's own backward
#: kernels (the very numbers autograd uses), for activations whose derivative reads the input.
_FROM_INPUT = {
    nn.GELU: lambda m, z, g: _aten.gelu_backward(g, z, approximate=m.approximate),
    nn.SiLU: lambda m, z, g: _aten.silu_backward(g, z),
    nn.Mish: lambda m, z, g: _aten.mish_backward(g, z),
    nn.ELU: lambda m, z, g: _aten.elu_backward(g, m.alpha, 1, 1, False, z),
    nn.CELU: lambda m, z, g: _aten.elu_backward(g, m.alpha, 1, 1 / m.alpha, False, z),
    nn.SELU: lambda m, z, g: _aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1, False, z),
    nn.Softplus: lambda m, z, g: _aten.softplus_backward(g, z, m.beta, m.threshold),
    nn.LeakyReLU: lambda m, z, g: _aten.leaky_relu_backward(g, z, m.negative_slope, False),
    nn.Hardtanh: lambda m, z, g: _aten.hardtanh_backward(g, z, m.min_val, m.max_val),
    nn.ReLU6: lambda m, z, g: _aten.hardtanh_backward(g, z, 0.0, 6.0),
    nn.Hardsigmoid: lambda m, z, g: _aten.hardsigmoid_backward(g, z),
    nn.Hardswish: lambda m, z, g: _aten.hardswish_backward(g, z),
}
#: The function and the ``(gradient g, output y) -> g`` kernel of activations whose derivative
#: reads the output (these kernels broadcast ``y`` over the rows; their ``grad_input`` variant
#: writes into ``g``). The function is called directly: a chain's modules have no hooks.
_FROM_OUTPUT = {
    nn.Tanh: (torch.tanh, _aten.tanh_backward),
    nn.Sigmoid: (torch.sigmoid, _aten.sigmoid_backward),
}


def _activation(module: nn.Module, z: Tensor, owned: bool = False) -> tuple[Tensor, Backward]:
    """``(module(z), backward)`` for an elementwise activation.

    ``owned``: ``z`` may be overwritten (a linear layer's output nothing else holds; the chain runs
    outside autograd): activations whose derivative reads their output then run in place.
    ``backward(g, owned)`` takes rows ``g (b, r, ...)`` of cotangents through the activation
    (``owned``: ``g`` may be overwritten). PyTorch's own backward kernels give the very numbers
    autograd does: applied to the rows directly when their shapes allow (one row per example, or
    kernels that broadcast), else the derivative (the kernel at a gradient of ones) times the
    rows; activations without a kernel here take a forward-mode product with ones (under the
    caller's transform lock).
    """
    kind = type(module)
    if kind is nn.ReLU:  # autograd's convention: derivative 0 at 0
        y = torch.relu_(z) if owned else torch.relu(z)
        return y, output_backward(_aten.threshold_backward, y, 0)
    if kind in _FROM_OUTPUT:
        function, kernel = _FROM_OUTPUT[kind]
        y = function(z, out=z) if owned else function(z)
        return y, output_backward(kernel, y)
    if kind in _FROM_INPUT and not getattr(module, "inplace", False):
        kernel = _FROM_INPUT[kind]

        @functools.cache
        def derivative() -> Backward:  # formed once, for the first call with several rows
            return derivative_backward(kernel(module, z, torch.ones_like(z)))

        def backward(g: Tensor, owned: bool, examples: slice = ALL) -> Tensor:
            ze = z[examples].unsqueeze(1)
            if g.shape == ze.shape:
                return kernel(module, ze, g)
            return derivative()(g, owned, examples)

        return module(z), backward
    if kind in _FROM_INPUT:  # in place: the derivative before z is overwritten
        backward = derivative_backward(_FROM_INPUT[kind](module, z, torch.ones_like(z)))
        return module(z), backward
    y, d = jvp(module, (z,), (torch.ones_like(z),))
    return y, derivative_backward(d)


def _flatten(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module._modules.items():
        if child is None:
            continue
        if type(child) is nn.Sequential and not _hooked(child):
            yield from _flatten(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}.", child


def _hooked(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def _global_hooks() -> bool:
    return bool(
        module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
        or module_globals._global_backward_hooks
        or module_globals._global_backward_pre_hooks
    )


def chain_intact(model: nn.Module, chain: Chain) -> Callable[[], bool]:
    """A check that ``model`` is still the ``chain`` found in it, cheap enough for every call.

    The check (called with no arguments, for every replayed call) holds while ``model`` has the
    same modules in its ``nn.Sequential`` containers, no hooks on them nor global ones, and its
    dropout layers still in eval mode.
    """
    containers = [m for m in model.modules() if type(m) is nn.Sequential]
    layout = [tuple(c._modules.values()) for c in containers]
    modules = [*containers, *(m for c in containers for m in c._modules.values())]
    dropouts = [m for m in modules if type(m) is nn.Dropout]

    def intact() -> bool:
        return (
            all(tuple(c._modules.values()) == v for c, v in zip(containers, layout, strict=True))
            and not _global_hooks()
            and not any(map(_hooked, modules))
            and not any(d.training for d in dropouts)
        )

    return intact


def find_chain(fm: FunctionalModel, calls: tuple[LayerCall, ...], inputs: Inputs) -> Chain | None:
    """The chain ``fm`` is, with its linear layers lined up with the traced layer ``calls``.

    Every selected parameter is a linear weight or bias, used once; ``None`` when ``fm`` or
    ``inputs`` is anything else. Checked for every batch (cheap): hooks or modules may change.
    """
    model = fm.module
    if (
        type(model) is not nn.Sequential
        or fm.output_fn is not default_output_fn
        or fm.output_dims != 1
        or inputs.kwargs
        or len(inputs.args) != 1
        or not isinstance(inputs.args[0], Tensor)
        or inputs.args[0].dim() < 2
        or _hooked(model)
        or _global_hooks()
    ):
        return None
    selected = fm.param_shapes
    steps: list[_Linear | nn.Module] = []
    seen: set[int] = set()
    next_call = 0
    flat = inputs.args[0].dim() == 2
    flatten = False
    for prefix, m in _flatten(model, ""):
        if _hooked(m):
            return None
        kind = type(m)
        if kind in (nn.Identity, nn.Dropout) and (kind is nn.Identity or not m.training):
            continue
        if kind is nn.Flatten and (m.start_dim, m.end_dim) == (1, -1):
            flatten = flatten or not flat  # on (B, features) it changes nothing
            flat = True
            continue
        if not flat:
            return None
        if kind in ELEMENTWISE:
            steps.append(m)
            continue
        if kind is not nn.Linear:
            return None
        weight = f"{prefix}weight" if f"{prefix}weight" in selected else None
        bias = f"{prefix}bias" if f"{prefix}bias" in selected else None
        call = None
        if weight or bias:
            if id(m) in seen or next_call >= len(calls):
                return None
            traced = calls[next_call]
            g = traced.geometry
            if (
                not g.plain
                or g.transposed
                or (traced.weight_name, traced.bias_name)
                != (
                    weight,
                    bias,
                )
            ):
                return None
            call, next_call = next_call, next_call + 1
            seen.add(id(m))
        steps.append(_Linear(m, weight, bias, call))
    if next_call != len(calls) or next_call == 0:
        return None
    return Chain(tuple(steps), flatten)
