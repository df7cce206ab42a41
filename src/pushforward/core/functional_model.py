"""A functional view of an ``nn.Module``: selected parameters as a flat vector of size P.

:class:`FunctionalModel` fixes which parameters the posterior is over (the *selection*), their
flat order (``param_names``: ``named_parameters()`` order restricted to the selection, tied
parameters once — the order laplace-torch uses), how inputs are passed, how the output tensor
is read off the model's return value, and which trailing output dimensions form the output
vector of size K. Everything else in the library is written against it.

The module's parameters are replaced only inside :meth:`FunctionalModel.call`, under the
module's lock (:func:`module_lock`), and every read of them (selection, :meth:`params`) takes the
same lock: another thread never sees a parameter swapped out. A module object reachable under
several names (a layer used twice in an ``nn.Sequential``, tied weights) has each of its
parameter attributes replaced once and restored exactly.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pushforward.core.cost import measure_cost
from pushforward.core.derivatives import check_derivatives, may_block_derivatives
from pushforward.core.errors import BatchCouplingError
from pushforward.core.inputs import Inputs
from pushforward.core.layout import ParamLayout, match_names
from pushforward.core.rnn import decomposed_rnn
from pushforward.core.settings import settings

__all__ = [
    "BatchCouplingError",
    "FunctionalModel",
    "ModelCache",
    "ParamSelection",
    "as_functional_model",
]

ParamSelection = str | Iterable[str] | Callable[[str, nn.Parameter], bool]


@dataclass
class ModelCache:
    """What the engine remembers about one model (one :class:`FunctionalModel`).

    Attributes:
        costs: measured per-example costs, per input signature
            (:func:`pushforward.core.cost.measure_cost`).
        structures: the layer analysis of the structured strategy and the curvature sweeps'
            layer structure, per input signature.
        independence: input signatures whose first check (the stronger one) of independent and
            deterministic examples passed (:meth:`FunctionalModel.check_examples`).
        derivatives: input signatures whose derivatives passed the check that forward and
            reverse mode agree (``pushforward.core.derivatives``: screened, and tested where the
            screening forward showed a sign).
        methods: per fallback ladder, the index of the first method that worked.
        plans: recent plans by their key (least recently used dropped first).
        failures: per plan key and strategy, why the strategy failed at run time.
        bound: covariance operators bound to this model's layout, by the identity and version
            of the operator the user passed.
        replays: captured programs of repeated calls (``pushforward.engine.replay``), by the
            call's key (least recently used dropped first).
    """

    costs: dict[Any, Any] = field(default_factory=dict)
    structures: dict[Any, Any] = field(default_factory=dict)
    independence: set[Any] = field(default_factory=set)
    derivatives: set[Any] = field(default_factory=set)
    methods: dict[str, int] = field(default_factory=dict)
    plans: OrderedDict[Any, Any] = field(default_factory=OrderedDict)
    failures: dict[Any, dict[str, str]] = field(default_factory=dict)
    bound: dict[Any, Any] = field(default_factory=dict)
    replays: OrderedDict[Any, Any] = field(default_factory=OrderedDict)


#: One lock per module: ``functional_call`` swaps a module's parameters in place while it runs,
#: so two threads calling the same module at once would leave it with each other's tensors.
_MODULE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def module_lock(module: nn.Module) -> threading.RLock:
    """The lock held while this library runs ``module`` (one per module object)."""
    with _LOCKS_GUARD:
        lock = _MODULE_LOCKS.get(module)
        if lock is None:
            lock = _MODULE_LOCKS[module] = threading.RLock()
        return lock


def default_output_fn(out: Any) -> Tensor:
    """Read the output tensor off a model's return value.

    A tensor is used as is; an object with ``.logits`` (Hugging Face ``ModelOutput``) or a
    mapping with key ``"logits"`` gives its logits; a tuple or list gives its first element.
    """
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"cannot read an output tensor from a model output of type {type(out).__name__}; "
        "pass output_fn=... to FunctionalModel to select it"
    )


class FunctionalModel:
    """Wrap ``model`` as a function of a flat vector of (selected) parameters.

    Args:
        model: any ``nn.Module`` that ``torch.func.functional_call`` can call.
        params: which parameters the posterior is over:

            * ``"trainable"`` (default): those with ``requires_grad`` (frozen backbones, LoRA);
            * ``"all"``: every parameter;
            * ``"last_layer"``: the parameters of the last module that owns parameters, in
              forward order (pass ``example_input`` to read the forward order right away;
              otherwise registration order is used and checked on the first call);
            * an iterable of parameter names or name prefixes (``"head"`` selects
              ``"head.weight"`` and ``"head.bias"``);
            * a predicate ``(name, param) -> bool``.
        output_dims: how many trailing dimensions of the output form one output vector of size
            K; the leading dimensions are example dimensions. ``(B, K)`` classification has one
            example dimension; a language model's ``(B, T, V)`` with ``output_dims=1`` has
            ``B*T`` examples (tokens) with ``V`` outputs each.
        output_fn: maps the model's return value to the output tensor; by default a tensor, an
            object's ``.logits``, a mapping's ``"logits"`` or a tuple's first element.
        example_input: optional input used to resolve ``params="last_layer"`` in forward order.

    Shapes: flat parameter vectors are ``(..., P)`` with ``P = num_params``; ``unflatten``
    gives ``{name: (..., *param_shapes[name])}``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSelection = "trainable",
        output_dims: int = 1,
        output_fn: Callable[[Any], Tensor] | None = None,
        example_input: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(output_dims, bool) or not isinstance(output_dims, int) or output_dims < 0:
            raise ValueError(f"output_dims must be an integer >= 0, got {output_dims!r}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
        self.module = model
        self.output_dims = output_dims
        self.output_fn = output_fn or default_output_fn
        self.cache = ModelCache()
        self._lock = module_lock(model)
        self._probe_rng = random.Random(0)
        self._last_layer_unverified = False
        # recurrent layers run decomposed on CUDA (cuDNN's backward refuses eval mode)
        self._recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
        with self._lock:  # another thread may be running the module (parameters swapped)
            names = self._select(params, example_input)
            if not names:
                raise ValueError(f"params={params!r} selects no parameter of the model")
            named = dict(model.named_parameters())
            self._slots = _parameter_slots(model, names)
        dtypes = {named[n].dtype for n in names}
        if len(dtypes) != 1:
            raise ValueError(
                f"selected parameters have mixed dtypes {dtypes}; cast the model first"
            )
        self.layout = ParamLayout(tuple(names), {n: named[n].shape for n in names})

    # -- copies ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without its cache and lock.

        A copy starts with a fresh cache and takes the lock of its own module.
        """
        state = dict(self.__dict__)
        del state["cache"], state["_lock"], state["_probe_rng"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.cache = ModelCache()
        self._lock = module_lock(self.module)
        self._probe_rng = random.Random(0)

    # -- parameter selection ---------------------------------------------------------
    def _select(self, params: ParamSelection, example_input: Any) -> list[str]:
        named = list(self.module.named_parameters())
        if isinstance(params, str):
            if params == "trainable":
                return [n for n, p in named if p.requires_grad]
            if params == "all":
                return [n for n, _ in named]
            if params == "last_layer":
                if example_input is None:
                    self._last_layer_unverified = True
                    return self._last_layer_names(self._registration_order())
                return self._last_layer_names(self._forward_order(Inputs.from_user(example_input)))
            params = [params]
        if callable(params):
            return [n for n, p in named if params(n, p)]
        if not isinstance(params, Iterable) or isinstance(params, (bytes, Mapping)):
            raise TypeError(
                "params must be 'trainable', 'all', 'last_layer', an iterable of parameter names "
                f"or prefixes, or a predicate (name, param) -> bool; got {type(params).__name__}"
            )
        wanted = list(params)
        bad = [w for w in wanted if not isinstance(w, str)]
        if bad:
            raise TypeError(f"params must list parameter names (strings), got {bad[:3]}")
        all_names = [n for n, _ in named]
        chosen, unknown = match_names(all_names, wanted)
        if unknown:
            raise ValueError(
                f"unknown parameter names or prefixes {unknown}; the model has "
                f"{all_names[:20]}{' ...' if len(all_names) > 20 else ''}"
            )
        return list(chosen)

    def _owners(self) -> list[nn.Module]:
        return [
            m for m in self.module.modules() if next(m.parameters(recurse=False), None) is not None
        ]

    def _registration_order(self) -> list[nn.Module]:
        return self._owners()

    def _forward_order(self, inputs: Inputs) -> list[nn.Module]:
        owners = set(map(id, self._owners()))
        order: list[nn.Module] = []
        hooks = [
            m.register_forward_hook(lambda mod, *_: order.append(mod))
            for m in self.module.modules()
            if id(m) in owners
        ]
        try:
            with torch.no_grad(), self._lock:
                one = inputs.slice(0, 1)
                with self._input_errors(inputs):
                    self.module(*one.args, **one.kwargs)
        finally:
            for h in hooks:
                h.remove()
        if not order:
            raise ValueError("no module with parameters ran in the forward pass")
        return order

    def _last_layer_names(self, order: list[nn.Module]) -> list[str]:
        last = order[-1]
        ids = {id(p) for p in last.parameters(recurse=False)}
        return [n for n, p in self.module.named_parameters() if id(p) in ids]

    def _verify_last_layer(self, inputs: Inputs) -> None:
        if not self._last_layer_unverified:
            return
        names = self._last_layer_names(self._forward_order(inputs))
        if tuple(names) != self.layout.names:
            raise ValueError(
                f"params='last_layer' resolved to {list(self.param_names)} by registration order, "
                f"but the last module run in forward order owns {names}; pass example_input=... "
                "to FunctionalModel (or name the parameters) so the forward order is used"
            )
        self._last_layer_unverified = False

    # -- flat <-> dict -------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first selected parameter."""
        return self._first_param().dtype

    @property
    def device(self) -> torch.device:
        """The device of the first selected parameter."""
        return self._first_param().device

    def _first_param(self) -> Tensor:
        """The first selected parameter, read under the module's lock (no walk over all)."""
        with self._lock:
            return self.module.get_parameter(self.param_names[0])

    def params(self, differentiable: bool = True) -> dict[str, Tensor]:
        """The selected parameters ``{name: tensor}`` (detached unless ``differentiable``).

        They are read under the module's lock, so never a tensor another thread swapped in.
        """
        with self._lock:
            named = dict(self.module.named_parameters())
        return {n: named[n] if differentiable else named[n].detach() for n in self.param_names}

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the selected parameters, in flat order."""
        return self.layout.names

    @property
    def param_shapes(self) -> dict[str, torch.Size]:
        """``{name: shape}`` of the selected parameters, in layout order."""
        return dict(self.layout.shapes)

    @property
    def num_params(self) -> int:
        """P, the size of the flat parameter vector."""
        return self.layout.num_params

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: (..., *shape)}`` -> ``(..., P)`` in ``param_names`` order."""
        return self.layout.join(tensors)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """``(..., P)`` -> ``{name: (..., *shape)}`` (views into ``vector`` where possible)."""
        return self.layout.split(vector)

    def as_dict(self, v: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A flat ``(..., P)`` vector or a dict, as a dict in ``param_names`` order."""
        if isinstance(v, Mapping):
            missing = [n for n in self.param_names if n not in v]
            extra = [n for n in v if n not in self.param_shapes]
            if missing or extra:
                raise KeyError(f"parameter dict mismatch: missing {missing}, unexpected {extra}")
            return {n: v[n] for n in self.param_names}
        return self.unflatten(v)

    # -- calling -------------------------------------------------------------------
    def call(self, params: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        """``model(*args, **kwargs)`` with the selected parameters replaced by ``params``.

        Every module attribute that holds a selected parameter (under any name: tied weights,
        a layer used twice) is replaced exactly once and restored afterwards; entries of
        ``params`` that are not selected parameters replace the tensor of that name. The
        module's lock is held meanwhile (``functional_call`` swaps its parameters). Recurrent
        layers on CUDA run in elementary operations (``pushforward.core.rnn``).
        """
        swap = {slot: params[name] for slot, name in self._slots if name in params}
        for name, value in params.items():
            if name not in self.layout.shapes:
                swap[name] = value
        with self._lock, decomposed_rnn() if self._recurrent else contextlib.nullcontext():
            out = functional_call(self.module, swap, args, kwargs, tie_weights=False, strict=False)
        return self.output_fn(out)

    def __call__(self, x: Any, params: Tensor | Mapping[str, Tensor] | None = None) -> Tensor:
        """Output ``f(x)`` at the current parameters, or at ``params`` (flat or dict)."""
        inputs = Inputs.from_user(x)
        p = self.params() if params is None else self.as_dict(params)
        return self.call(p, inputs.args, inputs.kwargs)

    def split_shape(self, shape: torch.Size) -> tuple[torch.Size, torch.Size]:
        """Split an output shape into ``(example_shape, output_shape)``."""
        if len(shape) < self.output_dims + 1:
            raise ValueError(
                f"model output of shape {tuple(shape)} has fewer than output_dims+1="
                f"{self.output_dims + 1} dimensions (a batch dimension is required)"
            )
        cut = len(shape) - self.output_dims
        return torch.Size(shape[:cut]), torch.Size(shape[cut:])

    # -- checks --------------------------------------------------------------------
    def check_independent(self) -> None:
        """Raise :class:`BatchCouplingError` when examples of a batch would interact."""
        problems = list(_coupling_modules(self.module))
        if problems:
            lines = "\n".join(f"  - {name or '<root>'} ({why})" for name, why in problems)
            raise BatchCouplingError(
                "the model's output for one example depends on the rest of the batch, so "
                "per-example Jacobians are not defined:\n" + lines + "\nCall model.eval() "
                "(BatchNorm then uses its running statistics and Dropout is off) before "
                "computing predictive quantities."
            )

    def check_examples(self, inputs: Inputs, outputs: Tensor | None = None) -> None:
        """Raise :class:`BatchCouplingError` when an output depends on the batch or on chance.

        That is, when the model's output for an example changes between two identical calls (random
        draws: a functional ``F.dropout(training=True)``) or with the other examples of the batch
        (batch statistics, ``h - h.mean(0)``, a normalisation, branch or depth chosen from a
        batch-wide value).

        What is checked, on every call (every public function runs it on its inputs), without
        gradients: the model runs on the batch, and *probe* examples run alone, each as a batch
        of one; each probe's output alone must equal its row of the batch's output (up to
        rounding: ``10 sqrt(eps)`` of the largest output). The probes are drawn without
        replacement by a pseudo-random generator of this object (seeded, so runs repeat; the
        global random state is untouched): 8 at the first call of an input signature (every
        example of a batch of at most 8), 2 at every later call. The first call also runs one
        probe twice (randomness). A batch of one is checked for randomness only, until a
        batch of two or more examples comes. At the first call of an input signature, one example
        also runs once with gradients: where that shows a sign of derivatives that forward and
        reverse mode may disagree on, the adjoint test decides
        (``pushforward.core.derivatives``; :class:`~pushforward.InconsistentDerivativesError`).

        What it costs: per later call, one forward of the batch and two of one example, at the
        module's own parameters (a small MLP's cached ``functional_variance``, itself a few
        forward and backward passes, takes about a third longer); per first call, one of the
        batch and nine of one example (ten, one with gradients; a jvp and a vjp of one more where
        the derivatives are tested). The batch's forward takes at most
        ``settings.chunk_target`` bytes of the model's measured per-example memory: a larger
        batch is represented by a pseudo-random subset of it (containing the probes).

        What it cannot see: a coupling that leaves every probe's output unchanged (e.g. one
        that shows in a few examples of a large batch only, or in the Jacobian but not the
        output) may pass a given call; as probes change from call to call, a coupling that
        persists is found. Failures of the model on the inputs (a dtype or shape it cannot
        take) are raised here with the inputs' shapes and dtypes and what the model takes.

        ``outputs``, when given, are the model's outputs for the whole of ``inputs`` run
        together at the module's parameters (a pass's own forward): they stand for the batch's
        forward, which is then not run again.
        """
        key = inputs.signature()
        first = key not in self.cache.independence
        B = inputs.batch_size
        if B < 2 and not first:
            return
        batch = inputs  # the forward passes run without gradients
        probes = self._probe_rng.sample(range(B), min(B, _FIRST_PROBES if first else _CALL_PROBES))
        versions = [t._version for t in batch.tensors()]
        with torch.no_grad():
            outs = [self._current(batch, [k]) for k in probes]
            _check_example_output(outs[0], batch, versions)
            alone = torch.cat(outs)
            if first and not _close(alone[:1], self._current(batch, probes[:1])):
                raise BatchCouplingError(_RANDOM)
        if key not in self.cache.derivatives:
            one = batch.slice(probes[0], probes[0] + 1).detach()
            if may_block_derivatives(lambda: self._current(one, [0]), self.params(True)):
                check_derivatives(lambda p: self.call(p, one.args, one.kwargs), self.params(False))
            self.cache.derivatives.add(key)
        with torch.no_grad():
            if B < 2:
                return
            if outputs is not None and outputs.shape[1:] == alone.shape[1:] and len(outputs) == B:
                context, together = list(range(B)), outputs.detach()
            else:
                context = self._context(batch, probes, key)
                together = self._current(batch, context)
            rows = together[[context.index(k) for k in probes]]
            if not _close(rows, alone):
                for j, k in enumerate(probes):
                    if _close(rows[j : j + 1], alone[j : j + 1]):
                        continue
                    if not _close(alone[j : j + 1], self._current(batch, [k])):
                        raise BatchCouplingError(_RANDOM)
                    raise BatchCouplingError(
                        "the model's output for an example depends on the other examples of the "
                        f"batch (example {k} alone gives another output than beside the other "
                        f"{len(context) - 1} examples{' of a subset' if len(context) < B else ''}"
                        f" of the batch of {B}): batch statistics (BatchNorm in training mode, "
                        "h - h.mean(0)) or a normalisation, branch or depth chosen from a "
                        "batch-wide value couple the examples, so per-example Jacobians are not "
                        "defined"
                    )
        self.cache.independence.add(key)

    def _current(self, batch: Inputs, examples: list[int]) -> Tensor:
        """The output for ``examples`` of ``batch``, run as one batch at the module's parameters.

        No parameter swap is needed; the forward runs under the module's lock, and a failure is
        re-raised naming the batch's shapes and dtypes (:meth:`_input_errors`).
        """
        if len(examples) == batch.batch_size:
            part = batch
        elif len(examples) == 1:
            part = batch.slice(examples[0], examples[0] + 1)
        else:
            part = batch.take(examples)
        with self._lock, self._input_errors(batch):
            return self.output_fn(self.module(*part.args, **part.kwargs))

    def _context(self, batch: Inputs, probes: list[int], key: Any) -> list[int]:
        """The examples run together with the probes (sorted).

        They are the whole batch, or a pseudo-random subset when the whole batch's forward would
        take more than ``settings.chunk_target`` bytes by the measured per-example memory (``key``:
        the inputs' signature).
        """
        B = batch.batch_size
        if max(len(probes), 2) >= B:
            return list(range(B))
        cost = self.cache.costs.get(key) or measure_cost(self, batch)
        per_example = max(cost.activation_bytes, 1)
        size = max(len(probes), 2, min(B, settings.current().chunk_target // per_example))
        if size >= B:
            return list(range(B))
        chosen = set(probes)
        rest = [i for i in range(B) if i not in chosen]
        chosen.update(self._probe_rng.sample(rest, size - len(chosen)))
        return sorted(chosen)

    def _input_errors(self, inputs: Inputs) -> _InputErrors:
        """Context in which a failure of the model's forward is re-raised naming its inputs.

        A failure on ``inputs`` (or part of them) is re-raised naming the inputs' shapes and dtypes
        and what the model takes (torch's error chained).
        """
        return _InputErrors(self, inputs)

    def prepare(self, x: Any, check: bool = True) -> Inputs:
        """Validate the model state and normalize the inputs of one call.

        Args:
            x: the call's inputs (a tensor, a tuple or a dict of them).
            check: run :meth:`check_examples` on them. A caller passing ``False`` must run it
                before anything evaluates several examples together (the planner defers it to
                the strategy that runs, and skips it at a signature's later calls for plans
                that evaluate every example by itself).
        """
        self.check_independent()
        inputs = Inputs.from_user(x)
        self._verify_last_layer(inputs)
        if check:
            self.check_examples(inputs)
        return inputs

    def module_tensors(self) -> list[Tensor]:
        """The module's own parameters and buffers, read under its lock.

        Another thread's call swaps its parameters while it runs; the lock keeps those out.
        """
        with self._lock:
            return [*self.module.parameters(), *self.module.buffers()]

    def checked_before(self, inputs: Inputs) -> bool:
        """Whether :meth:`check_examples` passed once on inputs of this signature.

        That is, whether its first call's full check, with the randomness test, is done.
        """
        return inputs.signature() in self.cache.independence

    def __repr__(self) -> str:
        return (
            f"FunctionalModel({type(self.module).__name__}, P={self.num_params}, "
            f"{len(self.param_names)} tensors, output_dims={self.output_dims})"
        )


#: Examples run alone by :meth:`FunctionalModel.check_examples` at the first call of an input
#: signature, and at every later call.
_FIRST_PROBES, _CALL_PROBES = 8, 2


def _check_example_output(out: Tensor, batch: Inputs, versions: list[int]) -> None:
    """Raise ``ValueError`` when the forward of one example went wrong in a way we can name.

    That is, when it changed the inputs in place (their versions moved from ``versions``), or
    when its output ``out`` does not lead with the batch dimension (``(1, ...)`` for a batch of
    one).
    """
    changed = [
        name
        for (name, t), v in zip(batch.named_tensors(), versions, strict=True)
        if t._version != v
    ]
    if changed:
        raise ValueError(
            f"the model's forward changes its inputs in place ({', '.join(map(str, changed))}): "
            "every evaluation would see other inputs; compute on a copy (x = x * 2, not x.mul_(2))"
        )
    if out.dim() == 0 or out.shape[0] != 1:
        raise ValueError(
            f"the model's output for one example has shape {tuple(out.shape)}: outputs must lead "
            "with the batch dimension, (1, ...) for a batch of one (a sequence-first model's "
            "output needs transposing to (batch, ...))"
        )


_RANDOM = (
    "the model's output changes between two identical calls: it draws random numbers in its "
    "forward pass (dropout in training mode, a functional F.dropout(..., training=True), ...), "
    "so its Jacobian is not defined; call model.eval() or remove the random operation"
)

#: Errors of a model's forward that are re-raised (same type) with the inputs described.
_WRAPPED = (RuntimeError, TypeError, ValueError, IndexError)


class _InputErrors:
    """Re-raise a failure of the model on ``inputs`` with a message naming what it takes.

    The failure is exactly one of :data:`_WRAPPED`. The message names the inputs and what the model
    takes: a ``TypeError`` when the inputs' dtypes do not match the model's, else an error of the
    same type.
    """

    def __init__(self, fm: FunctionalModel, inputs: Inputs) -> None:
        self.fm, self.inputs = fm, inputs

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or type(err) not in _WRAPPED:
            return False
        message, dtypes = _input_error_message(self.fm, self.inputs, err)
        raise (TypeError if dtypes else type(err))(message) from err


def _input_error_message(
    fm: FunctionalModel, inputs: Inputs, err: BaseException
) -> tuple[str, bool]:
    """The message, and whether the inputs' dtypes differ from what the model computes in."""
    dtype = fm.dtype
    described = inputs.describe()
    hints = []
    floats = sorted(
        {str(t.dtype).removeprefix("torch.") for t in inputs.tensors() if t.is_floating_point()}
        - {str(dtype).removeprefix("torch.")}
    )
    if floats and dtype.is_floating_point:
        want = str(dtype).removeprefix("torch.")
        hints.append(
            f"the inputs are {', '.join(floats)} but the model's parameters are {want}: cast the "
            f"inputs (x.to(torch.{want})) or the model"
        )
    integers = [t for t in inputs.tensors() if not t.is_floating_point() and not t.is_complex()]
    layer = _first_layer(fm.module)
    if integers and dtype.is_floating_point and not (layer and "Embedding" in layer):
        kinds = sorted({str(t.dtype).removeprefix("torch.") for t in integers})
        hints.append(
            f"the inputs hold integers ({', '.join(kinds)}) while the model's parameters are "
            f"{str(dtype).removeprefix('torch.')}; a float model usually needs x.float()"
        )
    takes = f"; its first layer {layer}" if layer else ""
    message = (
        f"the model cannot run on these inputs ({described}); its parameters are "
        f"{str(dtype).removeprefix('torch.')}{takes}. "
        + "".join(f"{h[0].upper()}{h[1:]}. " for h in hints)
        + f"The model raised {type(err).__name__}: {err}"
    )
    return message, bool(hints)


def _first_layer(module: nn.Module) -> str | None:
    """What the first registered layer takes, as a sentence (``None`` when unknown).

    E.g. ``"0 (Linear) takes inputs with 3 features (last dimension) of dtype float32"``; ``None``
    when it is not a linear, convolution or embedding layer.
    """
    for name, m in module.named_modules():
        label = f"{name or '<root>'} ({type(m).__name__})"
        if isinstance(m, nn.Linear):
            return (
                f"{label} takes inputs with {m.in_features} features (last dimension) of dtype "
                f"{str(m.weight.dtype).removeprefix('torch.')}"
            )
        if isinstance(m, nn.modules.conv._ConvNd):
            return (
                f"{label} takes inputs with {m.in_channels} channels (dimension 1) of dtype "
                f"{str(m.weight.dtype).removeprefix('torch.')}"
            )
        if isinstance(m, nn.Embedding):
            return f"{label} takes integer indices below {m.num_embeddings}"
        if next(m.parameters(recurse=False), None) is not None:
            return None
    return None


def _parameter_slots(module: nn.Module, names: list[str]) -> tuple[tuple[str, str], ...]:
    """``(path, name)`` for every module attribute that holds a selected parameter ``name``.

    One path per distinct (module object, attribute), however many names reach it (a layer used
    twice is reached under two names; replacing it twice would restore it wrongly).
    """
    selected = dict(module.named_parameters())
    by_id = {id(selected[n]): n for n in names}
    seen: set[tuple[int, str]] = set()
    slots = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is None or id(p) not in by_id or (id(m), attr) in seen:
                continue
            seen.add((id(m), attr))
            slots.append((f"{prefix}.{attr}" if prefix else attr, by_id[id(p)]))
    return tuple(slots)


def _coupling_modules(module: nn.Module):
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                yield name, f"{type(m).__name__} in training mode uses batch statistics"
            elif not m.track_running_stats or m.running_mean is None:
                yield (
                    name,
                    (
                        f"{type(m).__name__} with track_running_stats=False uses batch statistics "
                        "even in eval mode; rebuild it with running statistics"
                    ),
                )
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            if m.training and m.track_running_stats:
                yield name, f"{type(m).__name__} in training mode updates running statistics"
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            yield name, f"{type(m).__name__}(p={m.p}) in training mode draws random masks"
        elif isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0:
            yield name, f"MultiheadAttention(dropout={m.dropout}) in training mode"


def _close(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are equal up to rounding.

    A batched and an unbatched kernel may round differently: entries must agree within
    ``10 sqrt(eps)`` of ``a``'s largest finite magnitude, and non-finite entries must be equal.
    """
    if a.shape != b.shape:
        return False
    if not a.is_floating_point() or not a.numel():
        return torch.equal(a, b)
    scale = float(a.abs().amax())
    if not math.isfinite(scale):
        scale = float(a.abs().nan_to_num(0.0, 0.0, 0.0).amax())
    tol = 10 * torch.finfo(a.dtype).eps ** 0.5 * max(scale, 1e-30)
    if bool((a - b).abs().le(tol).all()):  # the usual case, in three kernels
        return True
    return torch.allclose(a, b, rtol=0.0, atol=tol, equal_nan=True)  # non-finite entries too


def as_functional_model(model: nn.Module | FunctionalModel) -> FunctionalModel:
    """``model`` itself if it is a :class:`FunctionalModel`, else one with the defaults."""
    if isinstance(model, FunctionalModel):
        return model
    return FunctionalModel(model)
