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
* otherwise it is the captured plan run directly on the new inputs (no checks, no lookup).

The programs run eagerly on every device: they are not captured into CUDA graphs (a capture of
the chain program reproduced its results on the captured inputs but not on later calls, so
graph replays are not offered).

The checks of a first call (the model's mode, the examples' independence) run when the plan is
made, and again whenever the signature changes; a compiled call does not repeat the per-call
probes of :meth:`~pushforward.FunctionalModel.check_examples`, but it refuses a model switched to
training mode (BatchNorm, Dropout) since. A new signature, a covariance changed in place, or a
parameter replaced by another tensor makes a new plan (transparently).

**Automatic replays.** :func:`~pushforward.functional_variance` replays by itself where that
needs no per-call checks at all: a :class:`~pushforward.FunctionalModel` that is a plain chain
(a model that cannot couple examples), one tensor input, detached results, the batch in one
chunk. The first call with a signature runs eagerly — checks, plan, execution — and keeps the
chain program (:func:`remember`); later calls with the same signature, covariance and options
run it (:func:`replayed`) as long as nothing it was captured from changed: the covariance's
tensors (in place or by assignment), the parameters (replaced, or ``.data`` assigned; in-place
updates such as an optimizer's are read at each call), the layers of the ``nn.Sequential``, hooks
(the module's or global) and the dropout layers' mode. Any change sends the call back to the
eager path, which captures anew. ``pushforward.settings(replay=False)`` turns it off.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pushforward.core.functional_model import FunctionalModel, as_functional_model, module_lock
from pushforward.core.inputs import Inputs
from pushforward.core.options import Options
from pushforward.core.precision import HALF
from pushforward.core.settings import settings
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine.planner import Plan, make_plan
from pushforward.engine.problem import Kind
from pushforward.layers import Chain, OneHot, chain_intact, find_chain

__all__ = ["Compiled", "executed"]

Program = Callable[[Inputs], tuple[Tensor, ...]]


class Compiled:
    """A functional variance / covariance captured for repeated calls (module docstring).

    Made by :func:`pushforward.compile`; ``compiled(x)`` returns what the matching function
    returns for ``x`` (``(f, var)``, ``(f, cov)``).

    Attributes:
        plan: the plan the program was captured from (``print(compiled.plan)``).
        program: ``"chain"`` or ``"plan"``.
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
    ) -> None:
        self.fm = as_functional_model(model)
        self.cov, self.kind, self.outputs = cov, kind, outputs
        self.group_size, self.options = group_size, options or Options()
        if self.options.differentiable:
            raise ValueError(
                "a compiled call returns detached results; differentiable=True runs eagerly "
                "(the plan cache already skips planning for repeated calls)"
            )
        self._capture(Inputs.from_user(x))

    @classmethod
    def automatic(cls, plan: Plan) -> Compiled | None:
        """The program of an eager call's ``plan`` for automatic replays (:func:`replayed`).

        ``None`` unless it is a chain program: the only one that needs no per-call checks (a
        plain chain of linear layers and elementwise activations cannot couple examples).
        """
        if _chain_program(plan, None) is None:
            return None
        self = cls.__new__(cls)
        p = plan.problem
        self.fm, self.cov, self.kind, self.outputs = p.fm, p.cov, p.kind, None
        self.group_size, self.options = None, plan.problem.options
        self._adopt(plan, plan.problem.inputs)
        return self

    # -- capture ------------------------------------------------------------------------------
    def _capture(self, inputs: Inputs) -> None:
        plan = make_plan(
            self.fm,
            inputs,
            self.cov,
            self.kind,
            self.options,
            outputs=self.outputs,
            group_size=self.group_size,
        )
        self._adopt(plan, inputs)

    def _adopt(self, plan: Plan, inputs: Inputs) -> None:
        fm = self.fm
        self.plan = plan
        self._signature = inputs.signature(with_batch=True)
        tensors = inputs.tensors()
        # one tensor input: recognized by its shape, dtype and device alone
        self._tensor = (
            (tensors[0].shape, tensors[0].dtype, tensors[0].device)
            if len(inputs.args) == 1 and not inputs.kwargs and isinstance(inputs.args[0], Tensor)
            else None
        )
        self._cov_tensors = self.cov.tensors()
        self._cov_versions = _versions(self._cov_tensors)
        self._slots = _parameter_slots(fm)
        self._coupling = [m for m in fm.module.modules() if _may_couple(m)]
        self._half = plan.problem.dtype in HALF or fm.dtype in HALF
        program, name = self._program()
        self.program = name
        self._run = program
        self._intact = program.intact if isinstance(program, _ChainMoments) else _always

    def _unchanged(self) -> bool:
        """Whether the covariance's tensors and the selected parameters are those captured.

        In-place changes of their values are read at each call; the chain program also checks
        its layers, hooks and dropout modes.
        """
        if _versions(self._cov_tensors) != self._cov_versions:
            return False
        if not all(
            owner._parameters.get(attr) is p and p.data_ptr() == ptr
            for owner, attr, p, ptr in self._slots
        ):
            return False
        return self._intact()

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
        """What the compiled function returns for inputs ``x``.

        A new signature, covariance version or parameter tensor captures a new program first.
        """
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

    def replay(self, x: Tensor) -> tuple[Tensor, ...] | None:
        """The program's result for a tensor ``x`` of the captured signature, or ``None``.

        The caller's key says the signature is the captured one. ``None`` when the model or
        covariance changed since (a module in training mode, a covariance changed in place, a
        parameter, layer or hook replaced, added or removed), or when a half-precision model's
        result is not finite where its outputs are: the caller then runs eagerly.
        """
        if any(m.training for m in self._coupling) or not self._unchanged():
            return None
        out = self._run(Inputs((x,), {}, x.shape[0]))
        if self._half and not (torch.isfinite(out[1]).all() or not torch.isfinite(out[0]).all()):
            return None  # derivatives out of a half-precision range: the eager plan falls through
        return out

    def __repr__(self) -> str:
        return f"Compiled({self.kind}, program={self.program!r}, {self.plan.problem.describe()})"


def executed(
    model: FunctionalModel | nn.Module,
    x: Any,
    cov: CovarianceOperator,
    kind: Kind,
    options: Options,
    eager_only: bool,
    plan: Callable[[], Plan],
) -> tuple[Tensor, Tensor]:
    """A call's ``(f, result)``: replayed when a program of it is kept, else run eagerly.

    The eager path executes ``plan()`` (the call's plan) and keeps its program for the next
    call with the same key (:func:`replay_key`; ``kind`` tells the functions apart).
    """
    key = replay_key(model, x, cov, options, eager_only)
    if key is not None:
        key = (kind, *key)
        result = replayed(model, key, cov, x)
        if result is not None:
            return result  # type: ignore[return-value]
    found = plan()
    f, result, *_ = found.execute()
    if key is not None:
        remember(model, key, cov, found)  # type: ignore[arg-type]
    return f, result


def replay_key(
    model: FunctionalModel | nn.Module,
    x: Any,
    cov: CovarianceOperator,
    options: Options,
    eager_only: bool,
) -> tuple | None:
    """The key under which a ``functional_variance`` call is replayed, or ``None``.

    ``None`` for calls that always run eagerly: ``eager_only`` (selected outputs, Monte Carlo
    arguments), a model given as an ``nn.Module`` (a new ``FunctionalModel`` per call has no
    memory), inputs other than one tensor, differentiable results, a progress bar, another
    strategy than the layer-structured one, or replays turned off (``settings(replay=False)``).
    """
    current = settings.current()
    if (
        eager_only
        or not (current.replay and current.plan_cache)
        or not isinstance(model, FunctionalModel)
        or type(x) is not Tensor
        or options.differentiable
        or options.progress
        or options.strategy not in _REPLAYED_STRATEGIES
    ):
        return None
    return (x.shape, x.dtype, x.device, id(cov), options, current)


_REPLAYED_STRATEGIES = ("auto", "structured", "last_layer")


def replayed(fm: FunctionalModel, key: tuple, cov: CovarianceOperator, x: Tensor):
    """``(f, var)`` replayed for the call of ``key``, or ``None`` (run eagerly)."""
    entry = fm.cache.replays.get(key)
    if entry is None or entry[0]() is not cov or entry[1] is None:
        return None
    result = entry[1].replay(x)
    if result is None:  # changed since: the eager call captures anew
        fm.cache.replays.pop(key, None)
    return result


def remember(fm: FunctionalModel, key: tuple, cov: CovarianceOperator, plan: Plan) -> None:
    """Keep the program of an eager call's ``plan`` under ``key`` (or that it has none)."""
    cache, size = fm.cache.replays, settings.current().plan_cache
    cache[key] = (weakref.ref(cov), Compiled.automatic(plan))
    with contextlib.suppress(KeyError):  # another thread may be trimming too
        while len(cache) > size:
            cache.popitem(last=False)


def _always() -> bool:
    return True


def _parameter_slots(fm: FunctionalModel) -> list[tuple[nn.Module, str, Tensor, int]]:
    """``(owner module, attribute, parameter, its data's address)`` of every selected parameter.

    An assignment to ``.data`` moves the address.
    """
    slots = []
    for name, param in fm.params().items():
        owner, _, attr = name.rpartition(".")
        slots.append((fm.module.get_submodule(owner), attr, param, param.data_ptr()))
    return slots


def _versions(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """In-place changes bump a tensor's version; an assignment to ``.data`` moves its data."""
    return [(t._version, t.data_ptr()) for t in tensors]


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
    """The chain program of a plan, or ``None``.

    The hand-differentiated chain and the layers' closed forms of a layer-structured variance
    or per-example covariance over all outputs of a plain chain, the batch in one chunk
    (``None`` for any other plan: a plan that chunks the batch keeps its chunks).
    """
    p = plan.problem
    split = plan.estimate.state
    if (
        plan.name not in ("structured", "last_layer")
        or p.kind not in ("variance", "covariance")
        or outputs is not None
        or split.generic is not None
        or p.T != 1
        or plan.estimate.chunk_size < p.B * p.rows_per_sample  # the plan chunks the batch
    ):
        return None
    if p.kind == "covariance" and any(c.quadratic_form() is None for c in split.contractions):
        return None
    chain = find_chain(p.fm, split.structure.calls, p.inputs)
    if chain is None or not chain.ends_with_linear:
        return None
    return _ChainMoments(p.fm, chain, split, p)


class _ChainMoments:
    """A chain's variance (or per-example covariance) over all K outputs.

    The forward, the unit rows times the head, the backward by hand, and per layer one closed
    form with what depends on the covariance formed once (``_LayerMoments``).
    """

    def __init__(self, fm, chain: Chain, split, problem) -> None:
        self.fm, self.chain = fm, chain
        self.params = fm.params(False)  # views of the parameters: their current values
        B, K, covariance = problem.B, problem.K, problem.kind == "covariance"
        head = chain.output_call
        by_call: dict[int, list] = {}
        for c in split.contractions:
            by_call.setdefault(c.call.index, []).append(c)
        calls = split.structure.calls
        index = torch.arange(K, device=problem.inputs.device).expand(B, K)
        self.layers = [
            (
                i,
                _LayerMoments(
                    group,
                    self.params,
                    OneHot(index, (B, K, *calls[i].output_shape), problem.compute_dtype)
                    if i == head
                    else None,
                    covariance,
                ),
            )
            for i, group in by_call.items()
        ]
        self.needed = frozenset(i for i, _ in self.layers if i != head)
        self.lock = module_lock(fm.module)
        shape = (*problem.example_shape, *problem.output_shape)
        self.shape = (*shape, *problem.output_shape) if covariance else shape
        self.intact = chain_intact(fm.module, chain)
        self.dtype = problem.compute_dtype

    def __call__(self, inputs: Inputs) -> tuple[Tensor, ...]:
        x = inputs.args[0]
        B = x.shape[0]

        def at_head(weight: Tensor) -> Tensor:  # the unit rows of every output, in order: W
            return weight.expand(B, -1, -1)

        with torch.no_grad():
            f, a, G = self.chain.pieces(
                self.params, x, _never, self.lock, self.needed, at_head, flat=True
            )
            out, dtype = None, self.dtype
            for index, layer in self.layers:
                x, g = a[index], G[index]
                if x.dtype != dtype:  # mixed precision: the pieces raised to the accumulation dtype
                    x, g = x.to(dtype), (None if g is None else g.to(dtype))
                part = layer(x, g)
                out = part if out is None else out + part
        return f, out.reshape(self.shape)


class _LayerMoments:
    """One layer's share of the variance or of the per-example covariance.

    The variance is ``sum_j (G L)_j^2 s_j`` over its groups'
    ``pushforward.engine.layer_contractions.QuadraticForm`` side by side (the covariance,
    ``(G L) diag(s) (G L)^T``): the factors ``L`` concatenated once, the scales
    ``s`` of the layer's input ``x`` one product ``((x F)^2) W + c`` when at most one group
    depends on the input (its weights widened with zeros for the others' columns, their
    constants in ``c``), else the groups' scales concatenated. At the head (the directions the
    unit rows of every output, in order) the variance of output ``k`` is ``sum_j L_kj^2 s_j``:
    one product ``s (L^2)^T``. Variance groups without a quadratic form keep their kernels (in
    the layers' layout).
    """

    def __init__(
        self, group: list, params: dict[str, Tensor], unit: OneHot | None, covariance: bool
    ) -> None:
        forms = [c.quadratic_form() for c in group]
        self.unit, self.head, self.covariance = unit, unit is not None, covariance
        self.kernels = None
        if any(form is None for form in forms):
            self.kernels = [c.variance_kernel(params) for c in group]
            return
        forms = [f for f in forms if f.varies] + [f for f in forms if not f.varies]
        widths = [_width(f) for f in forms]
        self.factor = None
        if any(f.factor is not None for f in forms):
            ref = next(f.factor for f in forms if f.factor is not None)
            eye = torch.eye(ref.shape[0], dtype=ref.dtype, device=ref.device)
            self.factor = torch.cat([eye if f.factor is None else f.factor for f in forms], 1)
        elif len(forms) > 1:  # identity factors side by side: their scales add up
            widths = [widths[0]] * len(forms)
        self.forms, self.sum_identity = forms, self.factor is None and len(forms) > 1
        self.weights = self.input_factor = self.constant = None
        varying = [f for f in forms if f.varies]
        self.generic = len(varying) > 1 or (varying and varying[0].weights is None)
        if not self.generic:
            ref = self.factor if self.factor is not None else forms[0].weights
            if ref is None:
                ref = forms[0].constant
            total = widths[0] if self.sum_identity else sum(widths)
            c = ref.new_zeros(total)
            at = 0
            for f, w in zip(forms, widths, strict=True):
                if f.constant is not None:
                    c[at : at + w] += f.constant
                at = 0 if self.sum_identity else at + w
            self.constant = c
            if varying:
                v = varying[0]
                W = v.weights.new_zeros(v.weights.shape[0], total)
                W[:, : widths[0]] = v.weights
                self.weights, self.input_factor = W, v.input_factor
        self.head_factor = None
        if self.head and self.factor is not None:
            self.head_factor = self.factor.square().T.contiguous()  # (m, K)

    def _scales(self, x: Tensor) -> Tensor:
        """``s (b, m)``, or ``(m,)`` when no group depends on the input."""
        if self.generic:
            parts = [f.scales_of(x) for f in self.forms]
            if self.sum_identity:
                return sum(parts[1:], parts[0])
            return torch.cat(parts, -1)
        if self.weights is None:
            return self.constant
        y = x if self.input_factor is None else x @ self.input_factor
        return torch.addmm(self.constant, y * y, self.weights)

    def __call__(self, x: Tensor, G: Tensor | None) -> Tensor:
        """The layer's share for inputs ``x (b, in)`` and directions ``G (b, r, out)``.

        The variance ``(b, K)`` at the head, else ``(b, r)`` (the covariance ``(b, K, K)``,
        ``(b, r, r)``).
        """
        if self.kernels is not None:
            a, G = x.unsqueeze(1), (self.unit if self.head else G.unsqueeze(2))
            var = None
            for kernel in self.kernels:
                part = kernel(a, G)
                var = part if var is None else var + part
            return var
        s = self._scales(x)
        b = x.shape[0]
        if self.covariance:
            if self.head and self.factor is None:
                return torch.diag_embed(s if s.dim() == 2 else s.expand(b, -1))
            if self.head:
                cov = (self.factor * s.unsqueeze(-2)) @ self.factor.T
                return cov if cov.dim() == 3 else cov.expand(b, -1, -1)
            g = G if self.factor is None else G @ self.factor
            return (g * s.unsqueeze(-2)) @ g.transpose(-1, -2)
        if self.head:
            var = s if self.head_factor is None else s @ self.head_factor
            return var if var.dim() == 2 else var.expand(b, -1)
        g = G if self.factor is None else G @ self.factor
        return torch.linalg.vecdot(g * s.unsqueeze(-2), g)


def _width(form) -> int:
    """The number of columns ``m`` of a quadratic form."""
    if form.factor is not None:
        return form.factor.shape[1]
    ref = form.weights if form.weights is not None else form.constant
    return ref.shape[-1]


def _never(out: Tensor) -> Tensor:
    raise AssertionError("the rows start at the head")  # pragma: no cover
