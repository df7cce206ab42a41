"""Typed curvature results: what ``GGN(...).diagonal()/dense()/lowrank()/kfac()`` return.

A curvature ``H`` (``P x P``, summed over the data for unit observation noise) becomes a Laplace
posterior through its precision ``s H + diag(δ)``, ``s = scale / temperature``. Each type knows
its own closed forms:

=========================  ==========================================  ==========================
type                        what it is (old access kept)                 posterior covariance
=========================  ==========================================  ==========================
:class:`DiagonalCurvature`  a ``(P,)`` tensor (it *is* one)               :class:`~pushforward.Diagonal`
:class:`DenseCurvature`     a ``(P, P)`` tensor (it *is* one)             :class:`~pushforward.Dense`
:class:`LowRankCurvature`   ``(eigenvalues (k,), eigenvectors (P, k))``   :class:`~pushforward.LowRankPrecision`
:class:`KroneckerCurvature` a :class:`~pushforward.Kronecker` operator    :class:`~pushforward.Kronecker`
=========================  ==========================================  ==========================

Every type has ``.covariance(prior_precision, *, scale, temperature, damping)`` (the posterior
covariance operator), ``.logdet(...)`` (``log det`` of the same precision, differentiable in
``δ`` and ``scale``), ``.matvec(v)`` and ``prior_structures`` (which prior precisions it
accepts: a scalar, one per parameter tensor — ``"layerwise"`` — or one per parameter —
``"diagonal"``, not for K-FAC, whose blocks need one value per tensor). The prior precision
is checked (finite, positive) and read in the curvature's own dtype (a Python ``0.1`` is the
float64 ``0.1`` for a float64 curvature, not a float32 rounding of it). Half-precision
curvatures are factorized in float32 and the results cast back (PyTorch has no half-precision
Cholesky or eigendecomposition).

For K-FAC each factor is eigendecomposed once (kept on the object): a weight's block ``G ⊗ A``
gets precision eigenvalues ``s λ_G λ_A^T + δ`` (``damping=True``: ``(sqrt(s) λ_G + sqrt(δ))
(sqrt(s) λ_A + sqrt(δ))``), a bias's ``G``, a generic dense or diagonal block, ``s λ + δ`` —
by :meth:`Kronecker.from_precision_eigen <pushforward.Kronecker.from_precision_eigen>`, the
same code that reads laplace-torch's ``KronDecomposed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pushforward.core.layout import ParamLayout
from pushforward.covariance.dense import Dense
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.kronecker import Kronecker
from pushforward.covariance.kronecker_blocks import KroneckerFactors
from pushforward.covariance.lowrank_precision import LowRankPrecision
from pushforward.covariance.operator import CovarianceOperator

__all__ = [
    "Curvature",
    "DenseCurvature",
    "DiagonalCurvature",
    "KroneckerCurvature",
    "LowRankCurvature",
    "PriorPrecision",
    "as_curvature",
]

PriorPrecision = float | Tensor | Sequence[float] | Mapping[str, float]

ALL_PRIORS = ("scalar", "layerwise", "diagonal")


class Curvature:
    """What every curvature type provides.

    A curvature ``H`` (``P x P``, summed over the data for unit observation noise) becomes a
    Laplace posterior through its precision ``s H + diag(δ)``, ``s = scale / temperature``; each
    type computes the covariance and log-determinant of that precision in its own closed form.
    """

    #: The prior precision structures :meth:`covariance` accepts.
    prior_structures: tuple[str, ...] = ALL_PRIORS
    #: The parameter layout the curvature is over (``None``: not known).
    param_layout: ParamLayout | None
    #: The likelihood's kind (``"classification"``, ``"regression"``, ...) of the curvature
    #: operator it came from (``None``: a plain tensor given by the user). A regression
    #: curvature is for unit noise: its posterior needs the observation noise σ.
    likelihood: str | None = None

    @property
    def size(self) -> int:
        """P."""
        raise NotImplementedError

    def reference(self) -> Tensor:
        """A tensor of the curvature's dtype and device."""
        raise NotImplementedError

    def covariance(
        self,
        prior_precision: PriorPrecision,
        *,
        scale: float | Tensor = 1.0,
        temperature: float | Tensor = 1.0,
        damping: bool = False,
    ) -> CovarianceOperator:
        """The posterior covariance ``(s H + diag(δ))^{-1}``, ``s = scale / temperature``.

        Args:
            prior_precision: δ: a scalar, one value per parameter tensor (``(L,)`` in the layout's
                order, or a mapping by name) or one per parameter ``(P,)`` (as
                :attr:`prior_structures` allows); finite and positive.
            scale: multiplies the curvature (e.g. ``n_data / σ²``).
            temperature: divides the curvature.
            damping: laplace-torch's damped Kronecker form (K-FAC only).

        Returns:
            A covariance operator, bound to the curvature's layout when it has one.
        """
        raise NotImplementedError

    def logdet(
        self,
        prior_precision: PriorPrecision,
        *,
        scale: float | Tensor = 1.0,
        temperature: float | Tensor = 1.0,
        damping: bool = False,
    ) -> Tensor:
        """``log det (s H + diag(δ))``, differentiable in ``δ`` and ``scale``.

        The arguments are those of :meth:`covariance`.
        """
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v (P,)``."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def _s(self, scale: float | Tensor, temperature: float | Tensor) -> Tensor:
        ref = self.reference()
        s = _positive(scale, "scale", ref) / _positive(temperature, "temperature", ref)
        return s

    def _undamped(self, damping: bool) -> None:
        if damping:
            raise ValueError("damping applies to Kronecker (K-FAC) posteriors only")

    def prior_diagonal(self, delta: PriorPrecision) -> Tensor:
        """``(P,)``: the prior precision of every parameter."""
        d = self._prior(delta)
        if d.dim() == 0:
            return d.expand(self.size)
        if d.shape[0] == self.size:
            return d
        sizes = torch.tensor(self._layout().sizes(), device=d.device)
        return torch.repeat_interleave(d, sizes)

    def prior_per_tensor(self, delta: PriorPrecision) -> Tensor:
        """``(L,)``: one prior precision per parameter tensor."""
        d = self._prior(delta)
        layout = self._layout()
        if d.dim() == 0:
            return d.expand(len(layout.names))
        if d.shape[0] == len(layout.names):
            return d
        raise ValueError(
            f"a K-FAC posterior needs a scalar prior precision or one per parameter tensor "
            f"({len(layout.names)}), got shape {tuple(d.shape)} (per-parameter values do not "
            "keep the Kronecker structure)"
        )

    def _prior(self, delta: PriorPrecision) -> Tensor:
        ref = self.reference()
        if isinstance(delta, Mapping):
            layout = self._layout()
            missing = [n for n in layout.names if n not in delta]
            if missing:
                raise ValueError(f"prior precision mapping lacks parameters {missing}")
            delta = torch.stack(
                [torch.as_tensor(delta[n], dtype=ref.dtype).reshape(()) for n in layout.names]
            )
        d = torch.as_tensor(delta, dtype=ref.dtype, device=ref.device)
        if d.dim() == 1 and d.shape[0] == 1:
            d = d[0]
        names = () if self.param_layout is None else self.param_layout.names
        if d.dim() > 1 or (d.dim() == 1 and d.shape[0] not in (self.size, len(names))):
            raise ValueError(
                f"prior precision must be a scalar, one value per parameter tensor or one per "
                f"parameter ({self.size}); got shape {tuple(d.shape)}"
            )
        with torch.no_grad():
            bad = ~torch.isfinite(d) | (d <= 0)
            if bool(bad.any()):
                raise ValueError(
                    f"prior precision must be finite and positive, got {d.detach().reshape(-1)[bad.reshape(-1)][:3].tolist()}"
                )
        return d

    def _layout(self) -> ParamLayout:
        if self.param_layout is None:
            raise ValueError(
                "a prior precision per parameter tensor needs the layout: pass layout= (e.g. "
                "the curvature operator or its FunctionalModel)"
            )
        return self.param_layout


def _positive(value: float | Tensor, name: str, like: Tensor) -> Tensor:
    """``value`` as a tensor like ``like``, checked finite and positive."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError(f"{name} must be finite and positive, got {t.detach().tolist()}")
    return t


def _working(t: Tensor) -> Tensor:
    """``t`` in a dtype PyTorch factorizes (float32 for half precision)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _cholesky(M: Tensor, what: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if int(info.max() if info.dim() else info) != 0:
        raise ValueError(
            f"{what} is not positive definite (Cholesky failed at column {int(info)}): the "
            "curvature is not positive semi-definite, or the prior precision is too small"
        )
    return L


class _TensorCurvature(Tensor, Curvature):
    """A curvature that is a tensor (operations on it give plain tensors)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    param_layout: ParamLayout | None

    @staticmethod
    def __new__(cls, values: Tensor, layout: ParamLayout | None = None):
        out = Tensor._make_subclass(cls, values.detach(), False)
        out.param_layout = layout
        return out

    def __init__(self, values: Tensor, layout: ParamLayout | None = None) -> None:
        pass

    @property
    def values(self) -> Tensor:
        """The curvature as a plain tensor."""
        return self.as_subclass(Tensor)

    def reference(self) -> Tensor:
        return self.values

    def __reduce_ex__(self, protocol: Any) -> Any:
        return type(self), (self.values.clone(), self.param_layout)

    # -- saving (pushforward.save / pushforward.load) -------------------------------------
    def _to_state(self) -> dict[str, Any]:
        """The values, the layout and the likelihood's kind (what :func:`pushforward.save` writes)."""
        return {"values": self.values, "layout": self.param_layout, "likelihood": self.likelihood}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> _TensorCurvature:
        """The curvature of a saved state, exactly as saved."""
        out = cls(state["values"], state["layout"])
        out.likelihood = state["likelihood"]
        return out

    def __deepcopy__(self, memo: dict) -> Any:
        return type(self)(self.values.clone(), self.param_layout)

    def __repr__(self, *args: Any, **kwargs: Any) -> str:
        return f"{type(self).__name__}({self.values!r})"


class DiagonalCurvature(_TensorCurvature):
    """The diagonal of a curvature, ``(P,)``: a tensor with the curvature methods."""

    @property
    def size(self) -> int:
        """P."""
        return self.shape[0]

    def _precision(self, prior_precision, scale, temperature, damping) -> Tensor:
        self._undamped(damping)
        return self._s(scale, temperature) * self.values + self.prior_diagonal(prior_precision)

    def covariance(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """The posterior covariance ``diag(1 / (s h + δ))``, a :class:`~pushforward.Diagonal`.

        The arguments are those of :meth:`Curvature.covariance`; ``damping`` must be False.
        """
        precision = self._precision(prior_precision, scale, temperature, damping)
        return _bound(Diagonal(precision.reciprocal(), check=False), self.param_layout)

    def logdet(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """``sum log (s h + δ)``, differentiable in ``δ`` and ``scale``."""
        return self._precision(prior_precision, scale, temperature, damping).log().sum()

    def matvec(self, v: Tensor) -> Tensor:
        """``h * v`` for ``v (P,)``."""
        return self.values * v


class DenseCurvature(_TensorCurvature):
    """A curvature as the ``(P, P)`` matrix: a tensor with the curvature methods."""

    @property
    def size(self) -> int:
        """P."""
        return self.shape[0]

    def _factor(self, prior_precision, scale, temperature, damping) -> Tensor:
        """The lower Cholesky factor of the precision (in float32 for half precision)."""
        self._undamped(damping)
        H = _working(self.values)
        s = self._s(scale, temperature).to(H.dtype)
        precision = s * H + torch.diag(self.prior_diagonal(prior_precision).to(H.dtype))
        return _cholesky(precision, "the posterior precision s H + diag(prior precision)")

    def covariance(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """The posterior covariance, a :class:`~pushforward.Dense` with square root ``L^{-T}``.

        ``L`` is the Cholesky factor of the precision ``s H + diag(δ)``. The arguments are those of
        :meth:`Curvature.covariance`; ``damping`` must be False.

        Raises:
            ValueError: the precision is not positive definite.
        """
        L = self._factor(prior_precision, scale, temperature, damping)
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        factor = torch.linalg.solve_triangular(L, eye, upper=False).T  # L^{-T}
        return _bound(Dense.from_factor(factor.to(self.dtype), check=False), self.param_layout)

    def logdet(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """``log det (s H + diag(δ))`` from the precision's Cholesky factor."""
        L = self._factor(prior_precision, scale, temperature, damping)
        return (2 * L.diagonal().log().sum()).to(self.dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v (P,)``."""
        return self.values @ v


class LowRankCurvature(tuple, Curvature):
    """The leading eigenpairs of a curvature, ``H ≈ U diag(λ) U^T``.

    A tuple ``(eigenvalues (k,), eigenvectors (P, k))`` (it unpacks as a pair) with the curvature
    methods.
    """

    param_layout: ParamLayout | None

    def __new__(cls, eigenvalues: Tensor, eigenvectors: Tensor, layout: ParamLayout | None = None):
        """The pair, checked: ``eigenvalues (k,)`` and ``eigenvectors (P, k)``.

        Raises:
            ValueError: the shapes do not form such a pair.
        """
        if eigenvalues.dim() != 1 or eigenvectors.dim() != 2:
            raise ValueError(
                f"a low-rank curvature is (eigenvalues (k,), eigenvectors (P, k)); got shapes "
                f"{tuple(eigenvalues.shape)} and {tuple(eigenvectors.shape)}"
            )
        if eigenvectors.shape[1] != eigenvalues.shape[0]:
            raise ValueError(
                f"{eigenvalues.shape[0]} eigenvalues for {eigenvectors.shape[1]} eigenvectors"
            )
        out = super().__new__(cls, (eigenvalues, eigenvectors))
        out.param_layout = layout
        return out

    def __getnewargs__(self):
        return (self[0], self[1], self.param_layout)

    def _to_state(self) -> dict[str, Any]:
        """The eigenpairs, the layout and the likelihood's kind (see :func:`pushforward.save`)."""
        return {
            "eigenvalues": self.eigenvalues,
            "eigenvectors": self.eigenvectors,
            "layout": self.param_layout,
            "likelihood": self.likelihood,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> LowRankCurvature:
        """The curvature of a saved state, exactly as saved."""
        out = cls(state["eigenvalues"], state["eigenvectors"], state["layout"])
        out.likelihood = state["likelihood"]
        return out

    @property
    def eigenvalues(self) -> Tensor:
        """λ, ``(k,)``."""
        return self[0]

    @property
    def eigenvectors(self) -> Tensor:
        """U, ``(P, k)``."""
        return self[1]

    @property
    def size(self) -> int:
        """P."""
        return self[1].shape[0]

    def reference(self) -> Tensor:
        """The eigenvectors (for the dtype and device)."""
        return self.eigenvectors

    def _parts(self, prior_precision, scale, temperature, damping) -> tuple[Tensor, Tensor]:
        self._undamped(damping)
        s = self._s(scale, temperature)
        return s * self.eigenvalues.clamp_min(0), self.prior_diagonal(prior_precision)

    def covariance(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """The posterior covariance, a :class:`~pushforward.LowRankPrecision`.

        Its precision is ``U diag(s λ) U^T + diag(δ)`` (negative eigenvalues clamped to 0). The
        arguments are those of :meth:`Curvature.covariance`; ``damping`` must be False.
        """
        values, d = self._parts(prior_precision, scale, temperature, damping)
        return _bound(LowRankPrecision(self.eigenvectors, values, d), self.param_layout)

    def logdet(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """``log det (U diag(s λ) U^T + diag(δ))`` by the matrix determinant lemma (k x k)."""
        values, d = self._parts(prior_precision, scale, temperature, damping)
        U = _working(self.eigenvectors)
        W = U * values.to(U.dtype).sqrt() / d.to(U.dtype).sqrt().unsqueeze(-1)
        core = torch.eye(W.shape[1], dtype=W.dtype, device=W.device) + W.T @ W
        return (d.log().sum() + torch.logdet(core)).to(self.eigenvectors.dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """``U diag(λ) U^T v`` for ``v (P,)``."""
        return self.eigenvectors @ (self.eigenvalues * (self.eigenvectors.T @ v))


class KroneckerCurvature(Kronecker, Curvature):
    """K-FAC: a :class:`~pushforward.Kronecker` operator with the curvature methods.

    Its ``to_dense()`` is the curvature. The factors' eigendecompositions are made once, at the
    first :meth:`covariance` or :meth:`logdet`.
    """

    prior_structures = ("scalar", "layerwise")

    @property
    def param_layout(self) -> ParamLayout | None:  # type: ignore[override]
        """The bound layout (the operator's ``layout``)."""
        return self.layout

    @property
    def size(self) -> int:
        """P."""
        return self.num_params

    def reference(self) -> Tensor:
        """The first defining tensor (for the dtype and device)."""
        return self.tensors()[0]

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v (P,)``, block by block."""
        return self.matmul(v)

    def _to_state(self) -> dict[str, Any]:
        """The blocks, the layout and the likelihood's kind (see :func:`pushforward.save`)."""
        return {**super()._to_state(), "likelihood": self.likelihood}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> KroneckerCurvature:
        """The curvature of a saved state, exactly as saved.

        Its eigendecompositions are made again when first needed.
        """
        out = super()._from_state(state)
        out.likelihood = state["likelihood"]
        return out

    def _spectrum(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        """Per block ``(eigenvectors, eigenvalues)``, the form ``from_precision_eigen`` reads.

        A diagonal block has no eigenvectors (see :meth:`Kronecker.from_precision_eigen`).
        """
        found = self.__dict__.get("_eigen")
        if found is None:
            found = self._eigen = [_decompose(n, b) for n, b in self.blocks.items()]
        return found

    def covariance(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """The posterior covariance, a :class:`~pushforward.Kronecker` in eigen form.

        Per weight, precision eigenvalues ``s λ_G λ_A^T + δ`` (``damping=True``:
        ``(sqrt(s) λ_G + sqrt(δ)) (sqrt(s) λ_A + sqrt(δ))^T``), per other block ``s λ + δ``. The
        arguments are those of :meth:`Curvature.covariance`; the prior precision is a scalar or one
        value per parameter tensor.
        """
        deltas = self.prior_per_tensor(prior_precision)
        s = self._s(scale, temperature)
        vectors, values = zip(*self._spectrum(), strict=True)
        out = Kronecker.from_precision_eigen(vectors, values, deltas, damping=damping, scale=s)
        return out.bind(self._layout())

    def logdet(self, prior_precision, *, scale=1.0, temperature=1.0, damping=False):
        """``log det`` of the precision :meth:`covariance` inverts: its eigenvalues' log sum."""
        deltas = self.prior_per_tensor(prior_precision)
        s = self._s(scale, temperature)
        total = self.reference().new_zeros(())
        for (_, values), delta in zip(self._spectrum(), deltas, strict=True):
            total = total + Kronecker.precision_eigenvalues(values, delta, damping, s).log().sum()
        return total


def _decompose(name: str, block: CovarianceOperator) -> tuple[list[Tensor], list[Tensor]]:
    """Eigendecompose one K-FAC block (symmetrized; eigenvalues clamped at 0)."""
    if isinstance(block, KroneckerFactors):
        pairs = [_eigh(F) for F in (block.out_factor, block.in_factor)]
        return [Q for _, Q in pairs], [lam for lam, _ in pairs]
    if isinstance(block, Diagonal):
        return [], [block.diagonal()]
    if isinstance(block, Dense):
        lam, Q = _eigh(block.to_dense())
        return [Q], [lam]
    raise TypeError(
        f"K-FAC block of {name!r} is a {type(block).__name__}; expected KroneckerFactors, Dense "
        "or Diagonal (as GGN.kfac() makes them)"
    )


def _eigh(F: Tensor) -> tuple[Tensor, Tensor]:
    lam, Q = torch.linalg.eigh(_working((F + F.T) / 2))
    return lam.clamp_min(0).to(F.dtype), Q.to(F.dtype)


def _bound(op: CovarianceOperator, layout: ParamLayout | None) -> CovarianceOperator:
    return op if layout is None else op.bind(layout)


def as_curvature(curvature: Any, layout: Any = None) -> Curvature:
    """``curvature`` as a typed :class:`Curvature`.

    A typed one is returned as is; a ``(P,)`` tensor, a ``(P, P)`` tensor,
    ``(eigenvalues, eigenvectors)`` or a bound :class:`Kronecker` (K-FAC blocks) are converted.
    ``layout`` (a :class:`~pushforward.ParamLayout`, or anything with ``.layout``: the curvature
    operator, a FunctionalModel) is used where the curvature has none.

    Raises:
        ValueError: shapes that do not fit, or a size other than the layout's.
        TypeError: anything else.
    """
    layout = getattr(layout, "layout", layout)
    if isinstance(curvature, Curvature):
        if layout is not None and curvature.param_layout is None:
            if isinstance(curvature, KroneckerCurvature):
                return KroneckerCurvature(curvature.blocks, check=False).bind(layout)
            if isinstance(curvature, LowRankCurvature):
                return LowRankCurvature(*curvature, layout=layout)
            return type(curvature)(curvature.values, layout)
        return _checked_size(curvature, layout)
    if isinstance(curvature, Kronecker):
        if curvature.layout is None:
            if layout is None:
                raise ValueError(
                    "a Kronecker curvature needs its layout: bind it (kron.bind(fm.layout))"
                )
            curvature = curvature.bind(layout)
        out = KroneckerCurvature(curvature.blocks, check=False)
        out.layout = curvature.layout
        return out
    if isinstance(curvature, (tuple, list)):
        if len(curvature) != 2:
            raise ValueError(
                "a low-rank curvature is (eigenvalues (k,), eigenvectors (P, k)), got "
                f"{len(curvature)} items"
            )
        return _checked_size(LowRankCurvature(curvature[0], curvature[1], layout), layout)
    if isinstance(curvature, Tensor) and curvature.dim() == 1:
        return _checked_size(DiagonalCurvature(curvature, layout), layout)
    if isinstance(curvature, Tensor) and curvature.dim() == 2:
        if curvature.shape[0] != curvature.shape[1]:
            raise ValueError(f"a dense curvature must be square, got {tuple(curvature.shape)}")
        return _checked_size(DenseCurvature(curvature, layout), layout)
    raise TypeError(
        "curvature must be a diagonal (P,), a dense (P, P) tensor, (eigenvalues, "
        f"eigenvectors) or a Kronecker (K-FAC); got {type(curvature).__name__}"
    )


def _checked_size(curvature: Curvature, layout: ParamLayout | None) -> Curvature:
    layout = layout if layout is not None else curvature.param_layout
    if layout is not None and layout.num_params != curvature.size:
        raise ValueError(
            f"the curvature is over {curvature.size} parameters but the layout has "
            f"{layout.num_params}"
        )
    return curvature


def check_n_data(n_data: Any) -> float:
    """``n_data`` of a mean-reduced curvature (a positive number) as a float; 1 for ``None``."""
    if n_data is None:
        return 1.0
    if isinstance(n_data, bool) or not isinstance(n_data, (int, float)) or not n_data > 0:
        raise ValueError(f"n_data must be a positive number of examples, got {n_data!r}")
    if not math.isfinite(n_data):
        raise ValueError(f"n_data must be finite, got {n_data!r}")
    return float(n_data)
