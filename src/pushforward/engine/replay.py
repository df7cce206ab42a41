"""Replayed calls: a plan captured once and run again on new inputs of the same signature.

A call of :func:`~pushforward.functional_variance` on a model it has seen checks the model,
normalizes the inputs, looks its plan up in the plan cache, rebinds it and runs the strategy —
cheap next to a large model's passes, but on a small model or on a GPU (where the device
finishes its work long before the host has issued it) that host work is most of the call.
:class:`Compiled` does it once: the model is checked, the plan made and a *program* captured;
each later call with inputs of the same signature (shapes, dtypes, device, static arguments)
only runs the program:

* for a plain chain of linear layers and activations (an ``nn.Sequential`` MLP) under the
  layer-structured strategy, the program is the hand-differentiated chain and the layers'
  closed forms, nothing else (no tracing, no recognition, no plan lookup);
* otherwise it is the captured plan run directly on the new inputs (no checks, no lookup);
* on CUDA the program is captured once more into a CUDA graph (static input and output
  buffers): a call copies its inputs in, replays the graph and copies the results out. Where
  capture cannot be exact — an operation that waits for the host (a value read into Python,
  ``torch.equal``), a data-dependent branch — it is refused with the reason and the program runs
  eagerly.

The checks of a first call (the model's mode, the examples' independence) run when the plan is
made, and again whenever the signature changes; a compiled call does not repeat the per-call
probes of :meth:`~pushforward.FunctionalModel.check_examples`, but it refuses a model switched to
training mode (BatchNorm, Dropout) since. A new signature, a covariance changed in place, or a
parameter replaced by another tensor makes a new plan (transparently).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pushforward.core.errors import PushforwardFallbackWarning
from pushforward.core.fallback import first_line
from pushforward.core.functional_model import FunctionalModel, as_functional_model, module_lock
from pushforward.core.inputs import Inputs
from pushforward.core.options import Options
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.planner import Plan, make_plan
from pushforward.engine.problem import Kind
from pushforward.layers import Chain, OneHot, find_chain

__all__ = ["Compiled"]

Program = Callable[[Inputs], tuple[Tensor, ...]]


class Compiled:
    """A functional variance / covariance captured for repeated calls (module docstring).

    Made by :func:`pushforward.compile`; ``compiled(x)`` returns what the matching function
    returns for ``x`` (``(f, var)``, ``(f, cov)``).

    Attributes:
        plan: the plan the program was captured from (``print(compiled.plan)``).
        program: ``"chain"``, ``"plan"``, or either with ``" + CUDA graph"``.
    """

    def __init__(
        self,
        model: FunctionalModel | nn.Module,
        cov: CovarianceOperator,
        x: Any,
        *,
        kind: Kind = "variance",
        outputs: Tensor | None = None,
        group_size: int | None = None,
        options: Options | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        self.fm = as_functional_model(model)
        self.cov, self.kind, self.outputs = cov, kind, outputs
        self.group_size, self.options = group_size, options or Options()
        if self.options.differentiable:
            raise ValueError(
                "a compiled call returns detached results; differentiable=True runs eagerly "
                "(the plan cache already skips planning for repeated calls)"
            )
        self._cuda_graph = cuda_graph
        self._capture(Inputs.from_user(x))

    # -- capture ------------------------------------------------------------------------------
    def _capture(self, inputs: Inputs) -> None:
        fm = self.fm
        self.plan: Plan = make_plan(
            fm,
            inputs,
            self.cov,
            self.kind,
            self.options,
            outputs=self.outputs,
            group_size=self.group_size,
        )
        self._signature = inputs.signature(with_batch=True)
        tensors = inputs.tensors()
        # one tensor input: recognized by its shape, dtype and device alone
        self._tensor = (
            (tensors[0].shape, tensors[0].dtype, tensors[0].device)
            if len(inputs.args) == 1 and not inputs.kwargs and isinstance(inputs.args[0], Tensor)
            else None
        )
        self._cov_tensors = self.cov.tensors()
        self._cov_versions = [t._version for t in self._cov_tensors]
        self._slots = _parameter_slots(fm)
        self._coupling = [m for m in fm.module.modules() if _may_couple(m)]
        program, name = self._program()
        self.program = name
        self._run = program
        device = inputs.device
        wants_graph = device.type == "cuda" if self._cuda_graph is None else self._cuda_graph
        if wants_graph:
            self._run, self.program = _graphed(program, inputs, name)

    def _unchanged(self) -> bool:
        """The covariance's tensors and the selected parameters are those captured (in-place
        changes of their values are read at each call)."""
        if [t._version for t in self._cov_tensors] != self._cov_versions:
            return False
        return all(owner._parameters.get(attr) is p for owner, attr, p in self._slots)

    def _program(self) -> tuple[Program, str]:
        plan = self.plan
        chain = _chain_program(plan, self.outputs)
        if chain is not None:
            return chain, "chain"
        outputs = self.outputs

        def run(inputs: Inputs) -> tuple[Tensor, ...]:
            with torch.no_grad():
                return plan.with_call(inputs, outputs, None).execute()

        return run, "plan"

    # -- calls ----------------------------------------------------------------------------------
    def __call__(self, x: Any) -> tuple[Tensor, ...]:
        """What the compiled function returns for inputs ``x`` (a new signature, covariance
        version or parameter tensor captures a new program first)."""
        if self._tensor is not None and isinstance(x, Tensor):
            same = (x.shape, x.dtype, x.device) == self._tensor
            inputs = Inputs((x,), {}, x.shape[0]) if same else Inputs.from_user(x)
        else:
            inputs = x if isinstance(x, Inputs) else Inputs.from_user(x)
            same = inputs.signature(with_batch=True) == self._signature
        if any(m.training for m in self._coupling):
            self.fm.check_independent()  # raises, naming the module
        if not (same and self._unchanged()):
            self._capture(self.fm.prepare(inputs))
        return self._run(inputs)

    def __repr__(self) -> str:
        return f"Compiled({self.kind}, program={self.program!r}, {self.plan.problem.describe()})"


def _parameter_slots(fm: FunctionalModel) -> list[tuple[nn.Module, str, Tensor]]:
    """``(owner module, attribute, parameter)`` of every selected parameter."""
    slots = []
    for name, param in fm.params().items():
        owner, _, attr = name.rpartition(".")
        slots.append((fm.module.get_submodule(owner), attr, param))
    return slots


def _may_couple(module: nn.Module) -> bool:
    """Modules whose training mode couples examples or draws random numbers."""
    kinds = (
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.modules.dropout._DropoutNd,
        nn.MultiheadAttention,
    )
    return isinstance(module, kinds)


# -- the chain program ------------------------------------------------------------------------
def _chain_program(plan: Plan, outputs: Tensor | None) -> Program | None:
    """The hand-differentiated chain and the layers' closed forms of a layer-structured
    variance over all outputs of a plain chain (``None`` for any other plan)."""
    p = plan.problem
    split = plan.estimate.state
    if (
        plan.name not in ("structured", "last_layer")
        or p.kind != "variance"
        or outputs is not None
        or split.generic is not None
        or p.T != 1
    ):
        return None
    chain = find_chain(p.fm, split.structure.calls, p.inputs)
    if chain is None or not chain.ends_with_linear:
        return None
    return _ChainVariance(p.fm, chain, split, p.B, p.K, p.dtype, p.inputs.device, p)


class _ChainVariance:
    """A chain's variance over all K outputs: forward, the unit rows times the head, the
    backward by hand, and per layer one closed form with what depends on the covariance formed
    once (:class:`_LayerVariance`)."""

    def __init__(self, fm, chain: Chain, split, B, K, dtype, device, problem) -> None:
        self.fm, self.chain, self.problem = fm, chain, problem
        self.params = fm.params(False)  # views of the parameters: their current values
        self.head = chain.output_call
        by_call: dict[int, list] = {}
        for c in split.contractions:
            by_call.setdefault(c.call.index, []).append(c)
        self.unit = torch.arange(K, device=device).expand(B, K)
        calls = split.structure.calls
        self.layers = [
            (
                index,
                _LayerVariance(
                    group,
                    self.params,
                    OneHot(self.unit, (B, K, *calls[index].output_shape), dtype)
                    if index == self.head
                    else None,
                ),
            )
            for index, group in by_call.items()
        ]
        self.needed = frozenset(i for i, _ in self.layers if i != self.head)
        self.lock = module_lock(fm.module)

    def __call__(self, inputs: Inputs) -> tuple[Tensor, ...]:
        B = self.unit.shape[0]

        def at_head(weight: Tensor) -> Tensor:  # the unit rows of every output, in order: W
            return weight.unsqueeze(0).expand(B, -1, -1)

        with torch.no_grad():
            f, a, G = self.chain.pieces(
                self.params, inputs.args[0], _never, self.lock, self.needed, at_head
            )
            var = None
            for index, layer in self.layers:
                part = layer(a[index], G[index])
                var = part if var is None else var + part
        p = self.problem
        return f, var.reshape(*p.example_shape, *p.output_shape)


class _LayerVariance:
    """One layer's share of the variance: its groups' quadratic forms side by side — one
    product with their output-side factors for all of them, the groups whose scales do not
    depend on the layer's input (a bias) folded into their factor — or their kernels.

    At the head (``G`` the unit rows of all outputs in order), ``sum_j L_kj^2 s_j`` for every
    output ``k`` is one product ``s (L^2)^T`` plus a constant."""

    def __init__(self, group: list, params: dict[str, Tensor], unit: OneHot | None) -> None:
        forms = [c.quadratic_form() for c in group]
        self.kernels, self.unit, self.head = None, unit, unit is not None
        if any(form is None for form in forms):
            self.kernels = [c.variance_kernel(params) for c in group]
            return
        varying = [f for f in forms if f.scales is not None]
        fixed = [f for f in forms if f.scales is None]
        self.scales = [f.scales for f in varying]
        self.identity = all(f.factor is None for f in forms)
        if self.identity:  # sum_o G_o^2 (s_o + c_o): the scales add up
            self.constant = sum(f.constant for f in fixed) if fixed else None
            self.factor = self.head_factor = None
            return
        ref = next(f.factor for f in forms if f.factor is not None)
        eye = torch.eye(ref.shape[0], dtype=ref.dtype, device=ref.device)

        def factor(f) -> Tensor:
            return eye if f.factor is None else f.factor

        Lv = [factor(f) for f in varying]
        Lc = [factor(f) * f.constant.sqrt() for f in fixed]  # the constant scales folded in
        self.split = sum(L.shape[1] for L in Lv)
        self.factor = torch.cat(Lv + Lc, 1)
        self.constant = None
        if self.head:  # row k of every factor squared, weighted: (s (Lv^2)^T) + rowsum(Lc^2)
            self.head_factor = torch.cat(Lv, 1).square().T.contiguous() if Lv else None
            self.constant = torch.cat(Lc, 1).square().sum(1) if Lc else None

    def _scales(self, a: Tensor) -> Tensor | None:
        if not self.scales:
            return None
        if self.identity:
            total = None
            for fn in self.scales:
                total = fn(a) if total is None else total + fn(a)
            return total
        parts = [fn(a) for fn in self.scales]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def __call__(self, a: Tensor, G: Tensor | None) -> Tensor:
        if self.kernels is not None:
            var = None
            for kernel in self.kernels:
                part = kernel(a, self.unit if self.head else G)
                var = part if var is None else var + part
            return var
        s = self._scales(a)
        if self.identity:
            w = s if self.constant is None else (self.constant if s is None else s + self.constant)
            if self.head:  # the unit rows of every output, in order
                return w if w.dim() == 2 else w.expand(a.shape[0], -1)
            g = G.reshape(*G.shape[:2], -1)
            return (g * g * w.unsqueeze(-2)).sum(-1)
        if self.head:
            var = None if s is None else s @ self.head_factor
            if self.constant is not None:
                var = self.constant.expand(a.shape[0], -1) if var is None else var + self.constant
            return var
        g = G.reshape(*G.shape[:2], -1) @ self.factor
        g = g * g
        if s is None:
            return g.sum(-1)
        var = (g[..., : self.split] * s.unsqueeze(1)).sum(-1)
        return var if self.split == g.shape[-1] else var + g[..., self.split :].sum(-1)


def _never(out: Tensor) -> Tensor:
    raise AssertionError("the rows start at the head")  # pragma: no cover


# -- CUDA graphs ------------------------------------------------------------------------------
def _graphed(program: Program, inputs: Inputs, name: str) -> tuple[Program, str]:
    """``program`` captured into a CUDA graph with static input and output buffers, or the
    program itself (with a warning naming the reason) when capture fails."""
    static = inputs.map(lambda t: t.detach().clone())
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initializations happen outside the capture
                program(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = program(static)
    except Exception as err:  # any capture failure: run eagerly, say why
        warnings.warn(
            f"pushforward: the {name} program cannot be captured into a CUDA graph "
            f"({type(err).__name__}: {first_line(err)}); it runs eagerly",
            PushforwardFallbackWarning,
            stacklevel=4,
        )
        return program, name
    buffers = static.tensors()

    def replay(new: Inputs) -> tuple[Tensor, ...]:
        for buffer, t in zip(buffers, new.tensors(), strict=True):
            buffer.copy_(t)
        graph.replay()
        return tuple(t.clone() for t in outputs)

    return replay, f"{name} + CUDA graph"
