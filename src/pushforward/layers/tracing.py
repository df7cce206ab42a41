"""Finding where each parameter is used, by tracing the forward pass at the torch-function level.

A ``TorchFunctionMode`` sees every torch call the model makes, whatever module, functional or
in-place op it comes from. :func:`analyze` runs a one-example forward and records every call
that touches a posterior parameter. A parameter is *matched* when it is used exactly once, as
the weight or bias of a supported layer operation:

* ``F.linear(a, W, b)`` and ``torch.addmm(b, a, W)`` (Hugging Face ``Conv1D``, weight stored
  ``(in, out)``);
* ``conv1d/2d/3d(a, W, b, stride, padding, dilation, groups)``, any stride/padding/dilation/
  groups;
* ``F.embedding(ids, W, padding_idx)`` without ``max_norm``/``scale_grad_by_freq``.

Everything else — LayerNorm, attention internals, custom ops, a module called twice, tied
weights, functional reuse — leaves the parameter unmatched and the generic methods handle it.
This module is the only place that knows the ops by name: each matched call gets its
``pushforward.layers.geometry.LayerGeometry`` here, and everything downstream is written
against that; and the autograd nodes of elementwise activations are recognized here
(:func:`activation_backward`, for ``pushforward.layers.traced_chain``).

:class:`LayerTap` then re-runs the forward and adds a *probe* to each matched layer's output
``z``: the gradient of the model output w.r.t. the probe is ``G = df/dz``, from which a layer's
Jacobian factors as ``G ⊗ a`` with the captured layer input ``a``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pushforward.core.derivatives import METADATA_CALLS
from pushforward.layers.geometry import LayerGeometry, patches_of, positions_of

__all__ = [
    "Analysis",
    "Backward",
    "LayerCall",
    "LayerTap",
    "LinearCall",
    "StructureError",
    "activation_backward",
    "analyze",
    "derivative_backward",
    "is_same_memory",
    "output_backward",
]


class StructureError(RuntimeError):
    """The layer structure found by :func:`analyze` does not hold for this forward pass.

    The caller steps down to a method that does not rely on it.
    """


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

#: Supported layer functions: kind and the names of their leading positional arguments.
_SIGNATURES: dict[Callable, tuple[str, tuple[str, ...]]] = {
    F.linear: ("linear", ("input", "weight", "bias")),
    torch.addmm: ("addmm", ("bias", "input", "weight")),
    torch.conv1d: ("conv", _CONV),
    torch.conv2d: ("conv", _CONV),
    torch.conv3d: ("conv", _CONV),
    F.embedding: (
        "embedding",
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    ),
}


def _bind(func: Callable, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Named arguments of a supported call (None if the call is not supported as a layer)."""
    kind, names = _SIGNATURES[func]
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    if kind == "addmm" and (bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1):
        return None
    if kind == "addmm" and (not isinstance(bound["input"], Tensor) or bound["input"].dim() != 2):
        return None
    if kind == "embedding" and (
        bound.get("max_norm") is not None or bound.get("scale_grad_by_freq")
    ):
        return None
    return bound


def _geometry(func: Callable, bound: dict[str, Any], out: Tensor) -> LayerGeometry:
    """The normalized geometry of one supported call (see ``pushforward.layers.geometry``)."""
    kind = _SIGNATURES[func][0]
    shape = bound["weight"].shape
    if kind == "embedding":
        vocab, width = shape
        pad = bound.get("padding_idx")
        pad = None if pad is None else (pad if pad >= 0 else pad + vocab)
        return LayerGeometry(
            lookup=True,
            weight_shape=shape,
            out_features=width,
            in_features=vocab,
            groups=1,
            transposed=False,
            feature_dim=-1,
            positions=positions_of(out.shape, width),
            padding_idx=pad,
        )
    if kind in ("linear", "addmm"):
        transposed = kind == "addmm"  # Conv1D: weight (in, out)
        out_features, in_features = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        return LayerGeometry(
            lookup=False,
            weight_shape=shape,
            out_features=out_features,
            in_features=in_features,
            groups=1,
            transposed=transposed,
            feature_dim=-1,
            positions=positions_of(out.shape, out_features),
        )
    spatial = len(shape) - 2
    channels_first = out.dim() == len(shape)  # (N, C, *spatial); an unbatched input: (C, ...)
    feature_dim = 1 if channels_first else 0
    return LayerGeometry(
        lookup=False,
        weight_shape=shape,
        out_features=shape[0],
        in_features=shape[1] * (torch.Size(shape[2:]).numel()),
        groups=int(bound.get("groups", 1)),
        transposed=False,
        feature_dim=feature_dim,
        positions=positions_of(out.shape, shape[0]),
        spatial=spatial,
        patches=patches_of(shape, bound, channels_first=True),
    )


@dataclass
class LayerCall:
    """One supported layer operation whose weight and/or bias is a posterior parameter.

    Attributes:
        index: position among the traced supported calls (forward order).
        geometry: how the weight maps inputs to outputs (op-independent).
        weight_name / bias_name: posterior parameter names in those slots (or None).
        output_shape: the layer output's shape in a one-example forward (the probe's shape).
        input_shape: the layer input's shape in a one-example forward.
        weight_value / bias_value: the weight/bias tensors when they are not posterior
            parameters (frozen weights, buffers), needed to re-run the operation.
    """

    index: int
    geometry: LayerGeometry
    weight_name: str | None
    bias_name: str | None
    output_shape: torch.Size
    input_shape: torch.Size
    weight_value: Tensor | None
    bias_value: Tensor | None
    func: Callable = field(repr=False)
    static: dict[str, Any] = field(repr=False)
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.names = tuple(n for n in (self.weight_name, self.bias_name) if n is not None)

    @property
    def weight_shape(self) -> torch.Size:
        """The weight's storage shape."""
        return self.geometry.weight_shape

    def apply(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Re-run the operation on ``input`` with ``weight`` and ``bias``."""
        tensors = {"input": input, "weight": weight, "bias": bias}
        names = _SIGNATURES[self.func][1]
        args = [tensors[n] for n in names if n in tensors]
        return self.func(*args, **self.static)

    def weight(self, params: dict[str, Tensor]) -> Tensor:
        """The weight (the posterior parameter, or the frozen value)."""
        return params[self.weight_name] if self.weight_name else self.weight_value

    def weight_rows(self, a: Tensor, G: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``(b, r, numel(W))``: per-example weight gradient rows (storage order).

        By the geometry's closed form, or (a 3-d convolution) by ``vmap`` of the op's own VJP.
        """
        if self.geometry.unfoldable:
            return self.geometry.weight_rows(a, G)
        from torch.func import vjp, vmap

        weight = self.weight(params).to(a.dtype)  # the pieces' dtype (mixed precision)
        bias = params[self.bias_name] if self.bias_name else self.bias_value
        bias = None if bias is None else bias.to(a.dtype)

        def grad(a1: Tensor, g1: Tensor) -> Tensor:
            return vjp(lambda w: self.apply(a1, w, bias), weight)[1](g1)[0]

        per = vmap(vmap(grad, in_dims=(None, 0)), in_dims=(0, 0))(a, G)
        return per.reshape(*G.shape[:2], -1)


@dataclass
class Analysis:
    """Where the posterior parameters are used.

    Attributes:
        calls: the layer calls whose posterior parameters are all matched.
        matched: parameter name -> its layer call.
        unmatched: parameter name -> why it is not handled by the layer-structured path.
        head: the plain linear call whose output *is* the model output (same memory, same
            element order), if any: backward passes can then start at its input.
        output_shape: the model output's shape in the one-example forward.
    """

    calls: list[LayerCall]
    matched: dict[str, LayerCall]
    unmatched: dict[str, str]
    head: LayerCall | None
    output_shape: torch.Size


class _UseRecorder(TorchFunctionMode):
    def __init__(self, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.by_id = {id(t): n for n, t in params.items()}
        self.uses: dict[str, list[str]] = {n: [] for n in params}
        self.layer_uses: dict[str, tuple[int, str]] = {}
        self.calls: list[tuple[Callable, dict[str, Any], Tensor, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in METADATA_CALLS:
            return out
        touched = [
            self.by_id[id(t)] for t in tree_flatten((args, kwargs))[0] if id(t) in self.by_id
        ]
        if not touched:
            return out
        bound = _bind(func, args, kwargs) if func in _SIGNATURES else None
        slots = {}
        if bound is not None and isinstance(out, Tensor):
            for slot in ("weight", "bias"):
                t = bound.get(slot)
                if isinstance(t, Tensor) and id(t) in self.by_id:
                    slots[self.by_id[id(t)]] = slot
            if id(bound.get("input")) in self.by_id:  # a parameter as the layer's input
                slots = {}
        name = getattr(func, "__name__", str(func))
        for param in touched:
            self.uses[param].append(name)
            if param in slots:
                self.layer_uses[param] = (len(self.calls), slots[param])
        if slots:
            self.calls.append((func, bound, out, out._version))
        return out


def analyze(
    call_model: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor]
) -> Analysis:
    """Trace ``call_model(params)`` (a one-example forward) and match parameters to layers."""
    recorder = _UseRecorder(params)
    with torch.no_grad(), recorder:
        output = call_model(params)
    matched: dict[str, LayerCall] = {}
    unmatched: dict[str, str] = {}
    layer_of: dict[str, int] = {}
    for name, uses in recorder.uses.items():
        if not uses:
            unmatched[name] = "not used in the forward pass"
        elif len(uses) > 1:
            unmatched[name] = f"used {len(uses)} times ({', '.join(uses[:4])})"
        elif name not in recorder.layer_uses:
            unmatched[name] = f"used by {uses[0]}, not a linear/conv/embedding weight or bias"
        else:
            layer_of[name] = recorder.layer_uses[name][0]
    calls: list[LayerCall] = []
    head = None
    for i, (func, bound, out, version) in enumerate(recorder.calls):
        names = {
            slot: n for n, (j, slot) in recorder.layer_uses.items() if j == i and n in layer_of
        }
        if not names:
            continue
        call = LayerCall(
            index=len(calls),
            geometry=_geometry(func, bound, out),
            weight_name=names.get("weight"),
            bias_name=names.get("bias"),
            output_shape=out.shape,
            input_shape=bound["input"].shape,
            weight_value=None if "weight" in names else bound["weight"],
            bias_value=None if "bias" in names else bound.get("bias"),
            func=func,
            static={} if func is torch.addmm else _static(bound),  # addmm: beta = alpha = 1
        )
        calls.append(call)
        for n in call.names:
            matched[n] = call
        unmodified = out._version == version  # no in-place op changed it afterwards
        if call.geometry.plain and unmodified and is_same_memory(out, output):
            head = call
    shape = output.shape if isinstance(output, Tensor) else torch.Size()
    return Analysis(calls, matched, unmatched, head, shape)


def _static(bound: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in bound.items() if k not in ("input", "weight", "bias")}


def is_same_memory(z: Tensor, output: Tensor) -> bool:
    """``output`` is ``z`` reinterpreted (same data, same row-major element order).

    That is, ``z`` itself or a view of it: a detached alias of the same memory (``z.detach()``,
    ``z.data``) has no derivative with respect to what ``z`` depends on, so it is not ``z``.
    """
    return (
        isinstance(output, Tensor)
        and (output is z or output._base is (z if z._base is None else z._base))
        and z.is_contiguous()
        and output.is_contiguous()
        and z.numel() == output.numel()
        and z.data_ptr() == output.data_ptr()
    )


@dataclass(frozen=True)
class LinearCall:
    """A ``F.linear`` call on no posterior parameter: ``output = input @ weight.T + bias``."""

    input: Tensor
    weight: Tensor
    bias: Tensor | None
    output: Tensor


class LayerTap(TorchFunctionMode):
    """Adds ``probes[i]`` to the output of matched layer call ``i``; records its input and output.

    The tap identifies a layer call by its posterior weight/bias tensors (the very tensors passed
    to the model), so it follows the model's own control flow; a matched parameter seen in any
    other call raises (the structure changed since :func:`analyze`). It also keeps the last
    ``F.linear`` call on no posterior parameter (``last_linear``: a frozen head, e.g. a language
    model's vocabulary projection), and per matched call the autograd nodes of its input and
    output and their versions at the call (``pushforward.layers.traced_chain`` reads the graph
    with them).
    """

    def __init__(self, analysis: Analysis, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.analysis = analysis
        self.slot_of = {id(params[n]): (call.index, n) for n, call in analysis.matched.items()}
        self.probes: Sequence[Tensor | None] = ()
        self.inputs: list[Tensor | None] = []
        self.outputs: list[Tensor | None] = []
        self.seen: list[int] = []
        self.last_linear: LinearCall | None = None
        #: per call, ``(input node, output node, input version, output version)`` at the call
        self.nodes: list[tuple[Any, Any, int, int] | None] = []

    @contextlib.contextmanager
    def active(self, probes: Sequence[Tensor | None]) -> Iterator[LayerTap]:
        """Tap the forward passes run inside the block.

        ``probes[i]`` is added to layer call ``i``'s output (``None``: nothing is added).
        """
        self.probes = probes
        self.inputs = [None] * len(self.analysis.calls)
        self.outputs = [None] * len(self.analysis.calls)
        self.seen = [0] * len(self.analysis.calls)
        self.last_linear = None
        self.nodes = [None] * len(self.analysis.calls)
        with self:
            yield self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_CALLS:
            return func(*args, **kwargs)
        hits = {
            self.slot_of[id(t)] for t in tree_flatten((args, kwargs))[0] if id(t) in self.slot_of
        }
        if not hits:
            out = func(*args, **kwargs)
            if func is F.linear and isinstance(out, Tensor):
                bound = _bind(func, args, kwargs)
                self.last_linear = LinearCall(
                    bound["input"], bound["weight"], bound.get("bias"), out
                )
            return out
        calls = {index for index, _ in hits}
        bound = _bind(func, args, kwargs) if func in _SIGNATURES else None
        if len(calls) != 1 or bound is None:
            raise StructureError(
                f"parameters {sorted(n for _, n in hits)} are used by {getattr(func, '__name__', func)} "
                "in a way the layer analysis did not see (data-dependent control flow?)"
            )
        (index,) = calls
        self.seen[index] += 1
        if self.seen[index] > 1:
            raise StructureError(
                "a matched layer ran twice in one forward pass (data-dependent control flow?)"
            )
        x = bound["input"]
        self.inputs[index] = x
        out = func(*args, **kwargs)
        probe = self.probes[index]
        if probe is not None:
            out = out + probe
        self.outputs[index] = out
        self.nodes[index] = (x.grad_fn, out.grad_fn, x._version, out._version)
        return out

    def check_complete(self) -> None:
        """Raise unless every matched layer ran (once) in the forward pass just made."""
        if any(t is None for t in self.inputs):
            raise StructureError("a matched layer did not run (data-dependent control flow?)")


# -- elementwise activations in an autograd graph (``pushforward.layers.traced_chain``) -------
#: All examples of a batch (a backward's default ``examples``).
ALL = slice(None)


class Backward(Protocol):
    """A backward through an elementwise activation: ``(rows g (e, r, out), owned) -> rows``.

    ``g`` holds the rows of the batch's ``examples`` (default: all of them); ``owned``: ``g`` may
    be overwritten.
    """

    def __call__(self, g: Tensor, owned: bool, examples: slice = ALL) -> Tensor: ...  # noqa: D102


_aten = torch.ops.aten


def output_backward(kernel, y: Tensor, *constants) -> Backward:
    """The backward by ``kernel(g, y, *constants)``, reading the activation's output ``y (b, out)``.

    The kernel broadcasts ``y`` over the rows; on rows the caller owns it runs in place (its
    ``grad_input`` variant): no second copy of the rows.
    """
    yr = y.unsqueeze(1)  # (b, 1, out): over the rows of (b, r, out)

    def backward(g: Tensor, owned: bool, examples: slice = ALL) -> Tensor:
        ye = yr[examples]
        if owned:
            return kernel.grad_input(g, ye, *constants, grad_input=g)
        return kernel(g, ye, *constants)

    return backward


def derivative_backward(d: Tensor) -> Backward:
    """The backward of an activation with derivative ``d (b, out)``: the rows times ``d``."""
    dr = d.unsqueeze(1)  # (b, 1, out): over the rows of (b, r, out)

    def backward(g: Tensor, owned: bool, examples: slice = ALL) -> Tensor:
        return g.mul_(dr[examples]) if owned else g * dr[examples]

    return backward


def _from_output(kernel, *constants) -> Callable[[Any], Backward]:
    """An activation whose derivative reads its output (saved by the node as ``result``)."""
    return lambda node: output_backward(kernel, node._saved_result, *constants)


def _from_input(kernel: Callable[..., Tensor], *saved: str) -> Callable[[Any], Backward]:
    """An activation whose derivative reads its input (saved by the node as ``self``).

    The derivative is formed once per example: the kernel at a gradient of ones, with the node's
    saved arguments ``saved``.
    """

    def make(node: Any) -> Backward:
        z = node._saved_self
        args = (getattr(node, f"_saved_{a}") for a in saved)
        return derivative_backward(kernel(torch.ones_like(z), z, *args))

    return make


def _gelu(g: Tensor, z: Tensor, approximate: str) -> Tensor:
    return _aten.gelu_backward(g, z, approximate=approximate)


def _leaky_relu(g: Tensor, z: Tensor, slope) -> Tensor:
    return _aten.leaky_relu_backward(g, z, slope, False)


def _elu(g: Tensor, z: Tensor, alpha, scale, input_scale) -> Tensor:
    return _aten.elu_backward(g, alpha, scale, input_scale, False, z)


#: Autograd node class names of the elementwise activations, and how each one's backward is made
#: from the node (the values it saved).
_ACTIVATION_NODES: dict[str, Callable[[Any], Backward]] = {
    "ReluBackward0": _from_output(_aten.threshold_backward, 0),  # autograd's: 0 at 0
    "TanhBackward0": _from_output(_aten.tanh_backward),
    "SigmoidBackward0": _from_output(_aten.sigmoid_backward),
    "GeluBackward0": _from_input(_gelu, "approximate"),
    "SiluBackward0": _from_input(_aten.silu_backward),
    "MishBackward0": _from_input(_aten.mish_backward),
    "LeakyReluBackward0": _from_input(_leaky_relu, "negative_slope"),
    "EluBackward0": _from_input(_elu, "alpha", "scale", "input_scale"),
    "SoftplusBackward0": _from_input(_aten.softplus_backward, "beta", "threshold"),
    "HardtanhBackward0": _from_input(_aten.hardtanh_backward, "min_val", "max_val"),
}


def activation_backward(node: Any) -> Backward | None:
    """The backward of an elementwise activation's autograd ``node``; ``None`` for any other node.

    It takes rows ``g (b, r, out)`` through the activation (``owned``: ``g`` may be overwritten)
    with PyTorch's own backward kernel on the values the node saved: the very numbers autograd
    gives. Reading a value an in-place operation changed since raises ``RuntimeError``.
    """
    make = _ACTIVATION_NODES.get(type(node).__name__)
    return None if make is None else make(node)
