"""laplace-torch's GLM predictive, computed matrix-free: :func:`glm_predictive`, :func:`accelerate`.

For a fitted laplace-torch (0.3) weight-space Laplace approximation ``la`` (``FullLaplace``,
``DiagLaplace``, ``KronLaplace``, ``LowRankLaplace``, their last-layer variants
``FullLLLaplace``/``DiagLLLaplace``/``KronLLLaplace``, ``FullSubnetLaplace``/
``DiagSubnetLaplace``, and any of them over a trainable subset of the weights)::

    probs = glm_predictive(la, x, link_approx="probit")   # what la(x, pred_type="glm", ...) returns
    accelerate(la)                                         # from now on la(x, ...) computes it so

laplace-torch forms the Jacobian of the whole batch, ``B x K x P`` (``torch.func.jacrev``), and
contracts it with the posterior covariance. Here the covariance is converted once
(:func:`~pushforward.laplace_interop.from_laplace`, cached per object) and pushed through the
model by this library's engine (:func:`~pushforward.functional_variance` /
:func:`~pushforward.functional_covariance` / :func:`~pushforward.predictive`), which never holds
the Jacobian: the probit link needs only the diagonal of ``J S J^T``.

Semantics, argument by argument as ``la.__call__`` (laplace-torch 0.3, ``ParametricLaplace``):

* ``likelihood="classification"``: probabilities ``(B, K)``. ``link_approx="probit"``:
  ``softmax(f / sqrt(1 + π/8 diag(J S J^T)))``; ``"bridge"``/``"bridge_norm"``: the Laplace
  bridge on the per-example ``K x K`` covariance; ``"mc"``: the mean of ``softmax`` over
  ``n_samples`` Gaussian draws. ``joint`` is ignored, and ``diagonal_output`` applies to ``"mc"``
  only (the draws use the variances alone), as in laplace-torch.
* ``likelihood="regression"``: ``(f_mu, f_var)`` without observation noise (add
  ``la.sigma_noise ** 2`` for the predictive of ``y``): ``f_var`` ``(B, K, K)`` per example,
  ``(B, K)`` with ``diagonal_output=True``, and with ``joint=True`` ``f_mu`` flattened to
  ``(B*K,)`` and ``f_var`` the ``(B*K, B*K)`` covariance across the batch (example-major;
  ``joint`` takes precedence over ``diagonal_output``).
* ``likelihood="reward_modeling"``: regression, or classification with ``fitting=True``.
* ``la.enable_backprop``: the results keep their graph (to ``x`` and the parameters), else
  they are computed without one.
* Inputs: a tensor, or a mapping (a Hugging Face batch) passed to the model as one argument.

Beyond laplace-torch: models whose output has more than two dimensions, e.g. ``(B, T, C)``
(laplace-torch's predictive rejects them), are read as ``B x T`` examples (tokens) of ``C``
outputs each: classification gives ``(B, T, C)`` probabilities, a distribution over ``C`` per
token; regression gives ``f_mu (B, T, C)`` with ``f_var (B, T, C, C)`` per token, ``(B, T, C)``
with ``diagonal_output``, or with ``joint=True`` ``(B*T*C,)`` and ``(B*T*C, B*T*C)`` (batch,
then token, then output). Each token's covariance is ``J_t S J_t^T`` with ``J_t`` the Jacobian
of that token's outputs (tokens of one sequence may depend on each other).

What differs from laplace-torch, and why:

* ``link_approx="mc"`` with a ``generator``: laplace-torch 0.3 checks the generator but its GLM
  path does not pass it on and draws from the global generator; here the generator is used.
  With ``generator=None`` both draw the same numbers from the global generator, so the results
  agree for the same ``torch.manual_seed``. ``mc_sampling="weight"`` (an option of this
  library) draws weight-space samples instead: same expectation, other random numbers.
* ``"bridge"``/``"bridge_norm"`` are evaluated in log space: where laplace-torch's ``exp`` of the
  logits overflows (|logit| around 700 in float64, 88 in float32) it returns entries set to 1.0
  by ``nan_to_num``, which are not a distribution; here the result stays finite and normalized.
  Elsewhere the two agree to rounding.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import torch
from torch import Tensor

from pushforward.api.predictive import predictive
from pushforward.api.variance import functional_covariance, functional_variance
from pushforward.core.chunking import spans
from pushforward.core.cost import Budget, ChunkPlan
from pushforward.core.functional_model import FunctionalModel
from pushforward.core.options import Options, check_positive_int
from pushforward.covariance.kronecker import Kronecker
from pushforward.covariance.operator import CovarianceOperator
from pushforward.engine import STRATEGY_NAMES
from pushforward.laplace_interop.adapters import PREFIX, MappingInput
from pushforward.laplace_interop.convert import from_laplace

__all__ = ["accelerate", "glm_predictive", "restore"]

MCSampling = Literal["output", "weight"]
LINKS = ("probit", "bridge", "bridge_norm", "mc")
MC_SAMPLING = ("output", "weight")


@dataclass(frozen=True)
class _Options:
    """How the engine computes one predictive (see :func:`glm_predictive`)."""

    mc_sampling: MCSampling = "output"
    strategy: str = "auto"
    memory_budget: int | str | None = None
    progress: bool = False

    def check(self) -> _Options:
        if self.mc_sampling not in MC_SAMPLING:
            raise ValueError(
                f"unknown mc_sampling {self.mc_sampling!r}; choose from {list(MC_SAMPLING)}"
            )
        names = ["auto", *STRATEGY_NAMES]
        if self.strategy not in names:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {names}")
        self.engine(False)  # validates the memory budget now
        return self

    def engine(self, differentiable: bool) -> Options:
        """How the engine runs this predictive's variances and covariances."""
        return Options(self.strategy, self.memory_budget, differentiable, self.progress)


def glm_predictive(
    la: Any,
    x: Tensor | MutableMapping[str, Any],
    pred_type: str = "glm",
    joint: bool = False,
    link_approx: str = "probit",
    n_samples: int = 100,
    diagonal_output: bool = False,
    generator: torch.Generator | None = None,
    fitting: bool = False,
    *,
    mc_sampling: MCSampling = "output",
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``la(x, pred_type="glm", ...)`` of a fitted laplace-torch Laplace approximation.

    Computed by this library's engine, never forming the ``B x K x P`` Jacobian.

    The positional arguments are ``la.__call__``'s, in its order; the module docstring gives the
    semantics and the (few, deliberate) differences from laplace-torch.

    Args:
        la: a fitted ``FullLaplace``, ``DiagLaplace``, ``KronLaplace``, ``LowRankLaplace``,
            ``FullLLLaplace``, ``DiagLLLaplace``, ``KronLLLaplace``, ``FullSubnetLaplace`` or
            ``DiagSubnetLaplace`` (over all, or the trainable subset of, the weights). Its
            converted posterior is cached and recomputed only when the posterior changes
            (``fit``, prior precision, observation noise, temperature).
        x: inputs ``(B, ...)``, or a mapping of them (passed to the model as one argument).
        pred_type: ``"glm"`` only (laplace-torch's ``"nn"`` samples weights and runs the
            network: call ``la(x, pred_type="nn", ...)`` for it).
        joint: regression: the ``(B*K, B*K)`` covariance across the batch.
        link_approx: classification: ``"probit"``, ``"bridge"``, ``"bridge_norm"`` or ``"mc"``.
        n_samples: draws for ``link_approx="mc"``.
        diagonal_output: regression: variances ``(B, K)`` instead of ``(B, K, K)``;
            ``link_approx="mc"``: draws from the per-output variances alone.
        generator: ``torch.Generator`` on ``la``'s device for the ``"mc"`` draws (default: the
            global generator).
        fitting: reward modeling: classification of preference pairs instead of regression.
        mc_sampling: how ``link_approx="mc"`` draws. ``"output"`` (laplace-torch's scheme, the
            same draws for the same seed): the per-example ``K x K`` covariance ``J S J^T`` is
            computed, and ``f + chol(J S J^T) z_i`` with ``z`` ``(K, n_samples)`` standard
            normal, shared by all examples. ``"weight"``: weight-space draws pushed through the
            linearized model, streamed (:func:`pushforward.predictive` with ``link="mc"``):
            no ``K x K`` matrix, so for large ``K`` (a vocabulary); not with
            ``diagonal_output``.
        strategy: how variances and covariances are computed: ``"auto"`` (the planner) or a
            strategy name (see :func:`pushforward.plan`); not used by ``mc_sampling="weight"``.
        memory_budget: bytes or a string like ``"2GB"`` for the engine's working memory
            (default: half of the available memory).
        progress: show a progress bar over the engine's chunks.

    Returns:
        Classification: probabilities of the model output's shape (``(B, K)``, or ``(B, T, K)``
        for sequence outputs). Regression and reward modeling: ``(f_mu, f_var)``, shapes as in
        the module docstring.

    Raises:
        ValueError: an unsupported ``pred_type``, ``link_approx``, ``mc_sampling`` or
            combination, an invalid generator, or an ``la`` that ``from_laplace`` finds unfitted.
        TypeError: ``la`` is not a weight-space laplace-torch Laplace approximation (e.g. the
            function-space ``FunctionalLaplace``, ``ELLA``, ``VaLLA``).
    """
    options = _Options(mc_sampling, strategy, memory_budget, progress).check()
    return _predict(
        la,
        x,
        pred_type,
        joint,
        link_approx,
        n_samples,
        diagonal_output,
        generator,
        fitting,
        options,
    )


def _predict(
    la: Any,
    x: Tensor | MutableMapping[str, Any],
    pred_type: str,
    joint: bool,
    link_approx: str,
    n_samples: int,
    diagonal_output: bool,
    generator: torch.Generator | None,
    fitting: bool,
    options: _Options,
) -> Tensor | tuple[Tensor, Tensor]:
    pred_type, link_approx = _value(pred_type), _value(link_approx)
    if pred_type != "glm":
        raise ValueError(
            f"glm_predictive computes laplace-torch's pred_type='glm' predictive, got "
            f"pred_type={pred_type!r}; for weight samples through the network call "
            "la(x, pred_type='nn', link_approx='mc')"
        )
    if link_approx not in LINKS:
        raise ValueError(f"unknown link_approx {link_approx!r}; choose from {list(LINKS)}")
    _check_generator(la, generator)
    likelihood = _value(la.likelihood)
    if likelihood == "reward_modeling":
        likelihood = "classification" if fitting else "regression"
    fm, cov = _converted(la, x)
    engine = options.engine(bool(la.enable_backprop))
    if likelihood == "regression":
        return _moments(fm, x, cov, joint, diagonal_output, engine)
    if link_approx != "mc":
        return predictive(fm, x, cov, link=link_approx, options=engine)
    n_samples = check_positive_int(n_samples, "n_samples")
    if options.mc_sampling == "weight":
        if diagonal_output:
            raise ValueError(
                "mc_sampling='weight' draws weights, whose outputs are correlated as J S J^T "
                "says; diagonal_output=True (independent outputs) needs mc_sampling='output'"
            )
        sampled = dataclasses.replace(engine, strategy="auto")
        return predictive(
            fm, x, cov, link="mc", n_samples=n_samples, generator=generator, options=sampled
        )
    return _output_space_mc(fm, x, cov, n_samples, diagonal_output, generator, engine)


def _value(v: Any) -> Any:
    """laplace-torch's enum members (``LinkApprox.PROBIT``, ...) as their string values."""
    return v.value if isinstance(v, Enum) else v


def _check_generator(la: Any, generator: torch.Generator | None) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device != la._device:
        raise ValueError(
            f"generator is on {generator.device} but la is on {la._device}; create it with "
            f"torch.Generator(device={str(la._device)!r})"
        )


def _moments(
    fm: FunctionalModel,
    x: Any,
    cov: CovarianceOperator,
    joint: bool,
    diagonal_output: bool,
    engine: Options,
) -> tuple[Tensor, Tensor]:
    """laplace-torch's ``(f_mu, f_var)``, shaped by ``joint`` and ``diagonal_output``.

    ``(f (B*K,), (B*K, B*K))`` for ``joint``, else ``(f, var)`` of the output's shape with
    ``diagonal_output``, else ``(f, (..., K, K))``.
    """
    if joint:
        f, C = functional_covariance(fm, x, cov, joint=True, options=engine)
        return f.flatten(), C
    if diagonal_output:
        return functional_variance(fm, x, cov, options=engine)
    return functional_covariance(fm, x, cov, options=engine)


def _output_space_mc(
    fm: FunctionalModel,
    x: Any,
    cov: CovarianceOperator,
    n_samples: int,
    diagonal_output: bool,
    generator: torch.Generator | None,
    engine: Options,
) -> Tensor:
    """laplace-torch's MC link: the mean over ``i`` of ``softmax(f + L z_i)``.

    ``L`` is the Cholesky factor of each example's ``K x K`` covariance (or the standard
    deviations), ``z`` ``(K, n_samples)`` drawn in one call and shared by every example; summed in
    chunks of samples bounded by the memory budget.
    """
    if diagonal_output:
        f, var = functional_variance(fm, x, cov, options=engine)
    else:
        f, var = functional_covariance(fm, x, cov, options=engine)
    K = f.shape[-1]
    if K < 2:
        raise ValueError(f"classification needs at least 2 outputs to take a softmax over, got {K}")
    if diagonal_output:
        scale = var.reshape(-1, K).sqrt().unsqueeze(-1)  # (N, K, 1)
    else:
        scale = torch.linalg.cholesky(var.reshape(-1, K, K))  # (N, K, K)
    mean = f.reshape(-1, K, 1)
    z = torch.randn((K, n_samples), generator=generator, dtype=f.dtype, device=f.device)
    budget = engine.budget(f.device)
    plan = output_mc_plan(f.numel(), var.numel(), K, n_samples, f.element_size(), budget)
    total = torch.zeros_like(mean[..., 0])
    for samples in spans(n_samples, plan.chunk):
        zc = z[:, samples]
        draws = mean + (scale * zc if diagonal_output else scale @ zc)  # (N, K, c)
        total = total + draws.softmax(dim=-2).sum(-1)
    return (total / n_samples).reshape(f.shape)


def output_mc_plan(
    outputs: int, moments: int, K: int, n_samples: int, itemsize: int, budget: Budget
) -> ChunkPlan:
    """The chunks of samples of :func:`_output_space_mc`.

    The running total, the draws ``z`` and the covariance factors are held; a sample makes a draw
    of every output, its softmax and the total's update.
    """
    held = (outputs + K * n_samples + moments) * itemsize
    return budget.plan(3 * outputs * itemsize, held, n_samples, "the Monte Carlo predictive")


# -- the conversion, cached per Laplace object ---------------------------------------------
@dataclass
class _Conversion:
    """``from_laplace(la)`` and what it was computed from."""

    state: _Snapshot
    fm: FunctionalModel
    cov: CovarianceOperator
    mapping: tuple[FunctionalModel, CovarianceOperator] | None = None


class _Snapshot:
    """The objects a conversion depends on, compared by identity.

    Tensors are also compared by their in-place version counter (weak references: a freed object
    never matches a new one).
    """

    def __init__(self, la: Any) -> None:
        self._items = [_watch(v) for v in _posterior_state(la)]

    def matches(self, la: Any) -> bool:
        current = list(_posterior_state(la))
        if len(current) != len(self._items):
            return False
        return all(_same(item, v) for item, v in zip(self._items, current, strict=True))


def _posterior_state(la: Any) -> Iterator[Any]:
    """Leaves of what laplace-torch's posterior covariance and the wrapped model depend on."""
    backend = getattr(la, "_backend", None)
    yield from _leaves(
        (
            la.model,
            getattr(la.model, "last_layer", None),
            getattr(backend, "subnetwork_indices", None),
            la.H,
            la.prior_precision,
            la.sigma_noise,
            la.temperature,
            bool(la.enable_backprop),
        )
    )


def _leaves(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _leaves(item)
    else:
        yield obj


def _watch(obj: Any) -> tuple[str, Any, int | None]:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("value", obj, None)
    version = obj._version if isinstance(obj, Tensor) else None
    try:
        return ("ref", weakref.ref(obj), version)
    except TypeError:  # no weak references to it: hold it
        return ("object", obj, version)


def _same(item: tuple[str, Any, int | None], obj: Any) -> bool:
    kind, held, version = item
    if kind == "value":
        return type(obj) is type(held) and obj == held
    target = held() if kind == "ref" else held
    return target is obj and version == (obj._version if isinstance(obj, Tensor) else None)


_CACHE: weakref.WeakKeyDictionary[Any, _Conversion] = weakref.WeakKeyDictionary()


def _converted(la: Any, x: Any) -> tuple[FunctionalModel, CovarianceOperator]:
    """``from_laplace(la)`` (cached), for a mapping ``x`` with the model called on one mapping."""
    entry = _CACHE.get(la)
    if entry is None or not entry.state.matches(la):
        fm, cov = from_laplace(la)
        entry = _CACHE[la] = _Conversion(_Snapshot(la), fm, cov)
    if not isinstance(x, MutableMapping):
        return entry.fm, entry.cov
    if entry.mapping is None:
        entry.mapping = _mapping_input(entry.fm, entry.cov)
    return entry.mapping


def _mapping_input(
    fm: FunctionalModel, cov: CovarianceOperator
) -> tuple[FunctionalModel, CovarianceOperator]:
    """The same posterior over the model wrapped in :class:`MappingInput`.

    :class:`MappingInput` takes the mapping's entries as keyword arguments, as the engine passes
    them, and hands the model one mapping, as laplace-torch does; its parameter names carry
    :data:`PREFIX`.
    """
    wrapped = FunctionalModel(
        MappingInput(fm.module),
        params=[PREFIX + n for n in fm.param_names],
        output_dims=fm.output_dims,
        output_fn=fm.output_fn,
    )
    if isinstance(cov, Kronecker):  # its blocks are keyed by parameter name
        cov = Kronecker([cov.blocks[n] for n in fm.param_names], check=False)
    return wrapped, cov.bind(wrapped.layout)


# -- accelerate: one object's la(x, ...) through glm_predictive ------------------------------
_OPTIONS: weakref.WeakKeyDictionary[Any, _Options] = weakref.WeakKeyDictionary()
_CLASSES: dict[type, type] = {}


class _Accelerated:
    """Placed before a laplace-torch class in an accelerated object's class.

    See :func:`accelerate`.
    """

    def __call__(
        self,
        x: Tensor | MutableMapping[str, Any],
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """laplace-torch's ``__call__``; ``pred_type="glm"`` goes to :func:`glm_predictive`.

        ``model_kwargs`` are unused there, as in laplace-torch's GLM path.
        """
        if _value(pred_type) == "glm":
            return _predict(
                self,
                x,
                pred_type,
                joint,
                link_approx,
                n_samples,
                diagonal_output,
                generator,
                fitting,
                _OPTIONS.get(self, _Options()),
            )
        return super().__call__(
            x,
            pred_type,
            joint,
            link_approx,
            n_samples,
            diagonal_output,
            generator,
            fitting,
            **model_kwargs,
        )

    def _glm_predictive_distribution(
        self,
        X: Tensor | MutableMapping[str, Any],
        joint: bool = False,
        diagonal_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """laplace-torch's GLM moments ``(f_mu, f_var)``, by the engine.

        Used by laplace-torch's ``functional_samples``, ``predictive_samples`` and
        ``_glm_forward_call``.
        """
        options = _OPTIONS.get(self, _Options())
        fm, cov = _converted(self, X)
        engine = options.engine(bool(self.enable_backprop))
        return _moments(fm, X, cov, joint, diagonal_output, engine)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Copies and pickles are of the plain laplace-torch class (not accelerated)."""
        _, _, *rest = super().__reduce_ex__(protocol)
        return (_new_instance, (_original(type(self)),), *rest)


def _new_instance(cls: type) -> Any:
    """An empty instance of ``cls`` (its state is set by pickle or ``copy``)."""
    return cls.__new__(cls)


def _original(cls: type) -> type:
    """The laplace-torch class under an accelerated class (or ``cls`` itself)."""
    return cls.__dict__.get("_laplace_class", cls)


def accelerate(
    la: Any,
    *,
    mc_sampling: MCSampling = "output",
    strategy: str = "auto",
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> Any:
    """Make this laplace-torch object's GLM predictive run through :func:`glm_predictive`.

    Only ``la`` changes (its class becomes a subclass of its laplace-torch class with the same
    name, so ``isinstance`` checks and ``state_dict``/``load_state_dict`` behave as before; no
    laplace-torch class or module is patched). Afterwards:

    * ``la(x, pred_type="glm", ...)`` and ``la.predictive(x, "glm", ...)`` return
      ``glm_predictive(la, x, ...)`` with the options given here; laplace-torch's own code
      calling ``la(...)`` (``optimize_prior_precision(method="gridsearch")``) does too;
    * ``la._glm_predictive_distribution`` — the GLM moments behind laplace-torch's
      ``functional_samples``, ``predictive_samples`` and ``_glm_forward_call`` — is computed by
      the engine; the sampling on top of it is laplace-torch's;
    * everything else is laplace-torch's own code: ``pred_type="nn"``, ``fit``,
      ``optimize_prior_precision``, ``log_marginal_likelihood``, ``sample``, ... .

    It can be called before ``fit`` (the posterior is converted at the first prediction and
    again whenever it changes) and again to change the options. :func:`restore` undoes it.
    ``copy.deepcopy`` and pickling give a plain laplace-torch object.

    Args:
        la: a laplace-torch weight-space Laplace approximation (see :func:`glm_predictive`).
        mc_sampling: how ``link_approx="mc"`` draws, as for :func:`glm_predictive`.
        strategy: how variances and covariances are computed, as for :func:`glm_predictive`.
        memory_budget: the engine's working memory, as for :func:`glm_predictive`.
        progress: show a progress bar over the engine's chunks.

    Returns:
        ``la`` itself.

    Raises:
        TypeError: ``la`` is not a weight-space laplace-torch Laplace approximation.
    """
    from laplace.baselaplace import ParametricLaplace

    if not isinstance(la, ParametricLaplace):
        raise TypeError(
            "accelerate applies to laplace-torch's weight-space Laplace approximations (Full, "
            "Diag, Kron, LowRank; all weights, last layer, subnetwork or trainable subset); got "
            f"{type(la).__name__}"
        )
    options = _Options(mc_sampling, strategy, memory_budget, progress).check()
    cls = _original(type(la))
    accelerated = _CLASSES.get(cls)
    if accelerated is None:
        accelerated = _CLASSES[cls] = type(
            cls.__name__,
            (_Accelerated, cls),
            {
                "__module__": __name__,
                "__qualname__": f"accelerated.{cls.__qualname__}",
                "_laplace_class": cls,
                # laplace-torch's Laplace(...) factory picks a class by ``_key`` among all
                # subclasses of its base class, this one included: a key of its own keeps the
                # factory from ever returning it (accelerate changes only the object given)
                "_key": ("pushforward.accelerate", getattr(cls, "_key", None)),
            },
        )
    la.__class__ = accelerated
    _OPTIONS[la] = options
    return la


def restore(la: Any) -> Any:
    """Undo :func:`accelerate`: ``la`` is of its laplace-torch class again.

    A no-op for an object that is not accelerated.

    Returns:
        ``la`` itself.
    """
    la.__class__ = _original(type(la))
    _OPTIONS.pop(la, None)
    return la
