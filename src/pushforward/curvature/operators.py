"""The GGN and the empirical Fisher over a data set, as P x P operators.

``GGN(model, data, likelihood)`` is ``sum_n J_n^T L_n J_n`` over every example ``n`` of ``data``
(``L_n`` the Hessian of the example's negative log-likelihood w.r.t. its outputs), exact or
Monte Carlo (``mc_samples``: ``L_n`` replaced by sampled gradients' outer products);
``EmpiricalFisher(model, data, likelihood)`` is ``sum_n g_n g_n^T`` with ``g_n`` the gradient of
example n's negative log-likelihood. ``reduction="mean"`` divides by the number of examples N.

What each method costs (one pass over the data each, chunks bounded by ``memory_budget``):

* :meth:`~CurvatureOperator.matvec` / :meth:`~CurvatureOperator.matmat` — one JVP and one VJP
  per batch (``torch.func``), the output-space Hessian applied in between; never a Jacobian;
* :meth:`~CurvatureOperator.diagonal` — exact through the layer structure where it applies
  (:mod:`pushforward.curvature.diagonal`), per-example rows elsewhere;
* :meth:`~CurvatureOperator.kfac` — one Kronecker block per layer
  (:mod:`pushforward.curvature.kfac`), a :class:`~pushforward.Kronecker`;
* :meth:`~CurvatureOperator.dense` — the ``(P, P)`` matrix from per-example rows (small P);
* :meth:`~CurvatureOperator.lowrank` — leading eigenpairs by Lanczos (one matvec per step) or
  randomized subspace iteration (a few matmats).

Results are in the model's dtype and device, detached.

**Data parallelism** (``process_group``, see :mod:`pushforward.core.collectives`): in a
``torch.distributed`` run each rank passes over its shard of the data and every sum —
products, diagonal, K-FAC factors, the dense matrix, the number of examples, the loss and the
output count — is all-reduced at the end of the pass (:meth:`~pushforward.curvature.data.Batches.total`):
every rank gets the curvature of the union of the shards, as one process would on all the
data. Lanczos and the randomized method run their (cheap) iterations on every rank with the
reduced products, identically. Monte Carlo draws (``mc_samples``) are seeded per batch of every
rank (no two ranks' batches share them): the estimate is the same on every rank, but not the
draws one process would make.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp as func_jvp
from torch.func import vjp, vmap

from pushforward.core.chunking import progress_bar
from pushforward.core.collectives import AUTO, resolve_group
from pushforward.core.cost import Budget, measure_cost
from pushforward.core.errors import PushforwardFallbackWarning
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import transform_kernels
from pushforward.core.layout import ParamLayout
from pushforward.core.options import Options, check_positive_int
from pushforward.covariance.dense import Dense
from pushforward.covariance.diagonal import Diagonal
from pushforward.covariance.kronecker import Kronecker
from pushforward.covariance.kronecker_blocks import KroneckerFactors
from pushforward.covariance.operator import CovarianceOperator
from pushforward.curvature.data import Batches
from pushforward.curvature.diagonal import accumulate_diagonal
from pushforward.curvature.kfac import KFACFactors, accumulate_kfac
from pushforward.curvature.likelihoods import Likelihood, as_likelihood
from pushforward.curvature.lowrank import lanczos, randomized
from pushforward.curvature.sweep import RowKind, Sweep
from pushforward.engine.structure.tracing import StructureError
from pushforward.products.jvp import push_tangents

__all__ = ["GGN", "CurvatureOperator", "EmpiricalFisher"]

#: At most this many bytes of data are kept between passes (and at most 1/8 of the budget).
CACHE_BYTES = 256 * 2**20


class CurvatureOperator:
    """A curvature ``P x P`` over a data set (see the module docstring).

    Attributes:
        fm: the :class:`~pushforward.FunctionalModel` (its selected parameters are the P).
        likelihood: the :class:`~pushforward.curvature.Likelihood`.
        reduction: ``"sum"`` or ``"mean"`` (divided by the number of examples).
        shape: ``(P, P)``.
    """

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        data: Iterable,
        likelihood: str | Likelihood | Any,
        rows: RowKind,
        *,
        reduction: str = "sum",
        memory_budget: int | str | None = None,
        progress: bool = False,
        target_key: str = "labels",
        process_group: Any = AUTO,
    ) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.fm = as_functional_model(model)
        self.likelihood = as_likelihood(likelihood)
        self.reduction = reduction
        self.options = Options(memory_budget=memory_budget, progress=progress)
        # small data sets are kept on the device after the first pass (Lanczos passes often)
        cache = min(self._budget() // 8, CACHE_BYTES)
        self.group = resolve_group(process_group)
        auto = isinstance(process_group, str)
        self.data = Batches(data, self.fm.device, target_key, cache, self.group, auto=auto)
        self.rows = rows
        self._stats: tuple[int, float, int] | None = None
        self._stats_key: tuple = ()

    # -- shape ---------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.fm.num_params

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.fm.dtype

    @property
    def device(self) -> torch.device:
        return self.fm.device

    @property
    def layout(self) -> ParamLayout:
        return self.fm.layout

    def _budget(self) -> int:
        return self.options.budget_bytes(self.device)

    def _sweep(self, structured: bool = True) -> Sweep:
        return Sweep(
            self.fm,
            self.likelihood,
            self.rows,
            structured=structured,
            budget=self._budget(),
            progress=self.options.progress,
        )

    def _scale(self, count: int) -> float:
        return 1.0 / count if self.reduction == "mean" else 1.0

    # -- data statistics -------------------------------------------------------------------
    @property
    def n_data(self) -> int:
        """N, the number of examples in the data (one forward pass the first time)."""
        return self._statistics()[0]

    def loss(self) -> Tensor:
        """The summed negative log-likelihood at the current parameters, in laplace-torch's
        convention (cross-entropy summed; ``1/2 sum ||f - y||^2`` for regression)."""
        return torch.as_tensor(self._statistics()[1], dtype=self.dtype, device=self.device)

    def num_outputs(self) -> int:
        """Observed output scalars (``N * K`` without ignored targets; the Gaussian
        normalizer's count)."""
        return self._statistics()[2]

    def _statistics(self) -> tuple[int, float, int]:
        """``(N, loss, outputs)``, computed again when the parameters changed (in place or
        replaced)."""
        key = tuple((t.data_ptr(), t._version) for t in self.fm.params(False).values())
        if self._stats is None or self._stats_key != key:
            self._stats_key = key
            count, loss, outputs = 0, 0.0, 0
            params = self.fm.params(False)
            with torch.no_grad():
                for batch in progress_bar(self.data, self.options.progress, "curvature: loss"):
                    inputs = self.fm.prepare(batch.inputs).detach()
                    f = self.fm.call(params, inputs.args, inputs.kwargs)
                    f, y = self._flat_outputs(f, batch.y)
                    count += inputs.batch_size
                    loss += float(self.likelihood.loss(f, y))
                    outputs += self.likelihood.num_outputs(f, y)
            totals = self.data.total([torch.tensor([count, loss, outputs], dtype=torch.float64)])
            count, loss, outputs = totals[0].tolist()
            self._stats = (int(count), loss, int(outputs))
        return self._stats

    def _flat_outputs(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``f (B, n, K)`` and the targets reshaped to match."""
        B = f.shape[0]
        K = math.prod(f.shape[f.dim() - self.fm.output_dims :])
        f = f.reshape(B, -1, K)
        return f, self.likelihood.prepare_targets(y, f.shape)

    # -- products ----------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``(P,) -> (P,)``: the curvature times ``v``."""
        if v.shape != (self.num_params,):
            raise ValueError(f"v must have shape ({self.num_params},), got {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def matmat(self, V: Tensor) -> Tensor:
        """``(P, m) -> (P, m)``: one JVP (all m columns) and one VJP per chunk of a batch, the
        output-space Hessian in between."""
        if V.dim() != 2 or V.shape[0] != self.num_params:
            raise ValueError(f"V must have shape ({self.num_params}, m), got {tuple(V.shape)}")
        V = V.to(self.dtype, copy=False)
        fm, m = self.fm, V.shape[1]
        out = torch.zeros_like(V)
        if m == 0:
            return out
        params = fm.params(False)
        tangents = fm.unflatten(V.T.contiguous())  # {name: (m, *shape)}
        sweep = self._sweep(structured=False)
        count = 0
        itemsize = V.element_size()
        held = 3 * V.numel() * itemsize
        for batch in progress_bar(self.data, self.options.progress, "curvature: products"):
            inputs = fm.prepare(batch.inputs).detach()
            cost = measure_cost(fm, inputs)
            n, K = sweep.output_split(cost)
            B = inputs.batch_size
            y = self.likelihood.prepare_targets(batch.y, torch.Size((B, n, K)))
            noise = sweep.noise(batch.index, B, n, K, cost.output_dtype, inputs.device)
            budget = Budget.of(self._budget())
            # one column through one example: its forward-mode activations next to the primal
            # ones, the backward through them, the outputs; per column: the tangent, the
            # gradient and the result (P each)
            per_pair = 3 * cost.activation_bytes + 3 * cost.output_bytes
            per_col = 3 * fm.num_params * itemsize
            cols = budget.chunk(B * per_pair + per_col, held, at_most=m)
            rows = B
            if held + B * per_pair + per_col > budget.total or cols == 1:
                rows = budget.chunk(per_pair, held + per_col, at_most=B)
            budget.require(
                held + cols * (rows * per_pair + per_col), "the curvature's matrix-vector products"
            )
            count += B
            for s in range(0, B, rows):
                sub = inputs.slice(s, min(s + rows, B))
                for c in range(0, m, cols):
                    part = {k: t[c : c + cols] for k, t in tangents.items()}
                    out[:, c : c + cols] += self._product_chunk(
                        sweep, params, sub, y[s : s + rows], noise, s, part, (n, K)
                    ).T
        out, total = self.data.total([out, torch.tensor([count], dtype=torch.float64)])
        if self.reduction == "mean":
            out /= int(total)
        return out

    def _product_chunk(self, sweep, params, sub: Inputs, y, noise, start, tangents, nK) -> Tensor:
        """``(c, P)``: the chunk's share of the curvature times the c tangents."""
        fm = self.fm
        b = sub.batch_size
        nz = None if noise is None else noise[start : start + b]
        product = self._output_product(sweep)
        in_dims = (0, 0, None if nz is None else 0, 0)

        def output_space(f: Tensor, JV: Tensor) -> Tensor:
            """``(c, b, *f_b)``: the output-space curvature times ``J V``."""
            c = JV.shape[0]
            Vb = JV.reshape(c, b, *nK).transpose(0, 1)  # (b, c, n, K)
            HV = vmap(product, in_dims=in_dims)(f.reshape(b, *nK), y, nz, Vb)
            return HV.transpose(0, 1).reshape(JV.shape)

        single = next(iter(tangents.values())).shape[0] == 1
        with torch.no_grad(), transform_kernels(safe_attention=True):
            if single:
                grads = _SINGLE(fm, fm, params, sub, tangents, output_space)
            else:
                grads = _separate(fm, params, sub, tangents, output_space)
        return fm.flatten(grads)

    def _output_product(self, sweep: Sweep):
        """One example's output-space curvature times ``v (c, n, K)``."""
        lik, kind = self.likelihood, self.rows.kind

        def product(f, y, noise, v):
            if kind == "exact":
                return lik.hessian_product(f, y, v)
            C = sweep.cotangents(f, y, noise, slice(0, self.rows.count(lik, *f.shape)))
            # rows span all of the example's positions: sum_r c_r <c_r, v>
            return torch.einsum("cr,rnl->cnl", torch.einsum("rnk,cnk->cr", C, v), C)

        return product

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matvec(V) if V.dim() == 1 else self.matmat(V)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mm(X):
            X = np.asarray(X)
            single = X.ndim == 1
            V = torch.as_tensor(X.reshape(X.shape[0], -1), dtype=self.dtype, device=self.device)
            R = self.matmat(V).cpu().double().numpy()
            return R[:, 0] if single else R

        return LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=mm, dtype=np.float64)

    # -- structured results --------------------------------------------------------------
    def diagonal(self) -> Tensor:
        """``(P,)``: the diagonal (exact, or the Monte Carlo estimate for ``mc_samples``)."""
        try:
            sums, count = accumulate_diagonal(self._sweep(), self.data)
        except StructureError as err:
            warnings.warn(
                f"pushforward: {err}; computing the diagonal from every parameter's per-example "
                "rows instead (exact, slower)",
                PushforwardFallbackWarning,
                stacklevel=2,
            )
            sums, count = accumulate_diagonal(self._sweep(structured=False), self.data)
        return self.fm.flatten(sums) * self._scale(count)

    def dense(self) -> Tensor:
        """``(P, P)``: the matrix, from per-example rows of all P parameters (small P)."""
        fm = self.fm
        P = fm.num_params
        itemsize = fm.params(False)[fm.param_names[0]].element_size()
        total = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        count = 0
        sweep = self._sweep(structured=False)
        for piece in sweep.pieces(
            self.data, 2 * P * P * itemsize, lambda layers, cost: 2 * P * itemsize, "dense"
        ):
            if piece.first:
                count += piece.examples
            rows = fm.flatten(piece.rows).reshape(-1, P)
            total.addmm_(rows.T, rows)
        total, examples = self.data.total([total, torch.tensor([count], dtype=torch.float64)])
        return total * self._scale(int(examples))

    def kfac(self, approx: str = "expand", generic: str = "diagonal") -> Kronecker:
        """K-FAC: a :class:`~pushforward.Kronecker` (bound to the model's layout) whose
        ``to_dense()`` is the ``(P, P)`` curvature: ``G ⊗ A`` per layer weight, ``G`` per bias,
        and a :class:`~pushforward.Diagonal` (``generic="diagonal"``) or
        :class:`~pushforward.Dense` block for other parameters (see
        :mod:`pushforward.curvature.kfac` for the conventions; ``approx`` is ``"expand"`` or
        ``"reduce"``)."""
        factors = accumulate_kfac(self._sweep(), self.data, approx, generic)
        return kfac_operator(
            self.fm,
            factors,
            input_scale=1.0 / factors.examples,
            output_scale=self._scale(factors.examples),
        )

    def lowrank(
        self,
        k: int,
        method: str = "lanczos",
        *,
        iterations: int | None = None,
        tol: float = 1e-6,
        oversample: int = 10,
        power_iterations: int = 4,
        seed: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """``(eigenvalues (k,), eigenvectors (P, k))``: the k largest eigenpairs.

        Args:
            k: how many.
            method: ``"lanczos"`` (one :meth:`matvec` per step; ``iterations`` steps when
                given, else until the k leading Ritz values converge to ``tol`` relative to the
                largest) or ``"randomized"`` (subspace iteration: ``power_iterations + 2``
                :meth:`matmat` calls with ``k + oversample`` columns).
            seed: seeds the starting vector / sketch.
        """
        check_positive_int(k, "k")
        if k > self.num_params:
            raise ValueError(f"k={k} exceeds the number of parameters P={self.num_params}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        common = {"dtype": self.dtype, "device": self.device, "generator": generator}
        P, itemsize = self.num_params, torch.finfo(self.dtype).bits // 8
        budget = Budget.of(self._budget())
        if method == "lanczos":
            if iterations is not None:
                check_positive_int(iterations, "iterations")
            steps = min(P, iterations if iterations is not None else 10 * k + 20)
            budget.require((steps + 4) * P * itemsize, f"Lanczos' basis of {steps} vectors")
            return lanczos(
                self.matvec, P, k, iterations=iterations, max_iterations=steps, tol=tol, **common
            )
        if method == "randomized":
            width = min(P, k + oversample)
            budget.require(5 * width * P * itemsize, f"a sketch of {width} columns")
            return randomized(
                self.matmat,
                self.num_params,
                k,
                oversample=oversample,
                power_iterations=power_iterations,
                **common,
            )
        raise ValueError(f"method must be 'lanczos' or 'randomized', got {method!r}")

    def __repr__(self) -> str:
        ranks = "" if self.group is None else f", summed over {self.group.size} ranks"
        return (
            f"{type(self).__name__}(P={self.num_params}, {self.likelihood!r}, "
            f"{self._describe_rows()}, reduction={self.reduction!r}{ranks})"
        )

    def _describe_rows(self) -> str:
        return self.rows.kind


class GGN(CurvatureOperator):
    """The generalized Gauss-Newton ``sum_n J_n^T L_n J_n`` over ``data``.

    Args:
        model: an ``nn.Module`` (its trainable parameters) or a :class:`~pushforward.FunctionalModel`.
        data: a re-iterable collection of ``(x, y)`` batches (a ``DataLoader``, a list), or of
            mappings holding the targets under ``target_key``
            (see :mod:`pushforward.curvature.data`).
        likelihood: ``"classification"`` (softmax cross-entropy), ``"regression"`` (Gaussian,
            unit noise), a :class:`~pushforward.curvature.Likelihood` (e.g.
            ``CrossEntropy(ignore_index=...)``) or a callable ``(f, y) -> (n, K, K)`` giving the
            output-space Hessian of one example.
        mc_samples: ``None`` for the exact GGN; else the number of sampled targets per example
            (Monte Carlo GGN, i.e. the Fisher; seeded by ``seed``, the same draws on every pass).
        reduction: ``"sum"`` or ``"mean"`` (over the N examples).
        memory_budget: bytes or e.g. ``"2GB"`` bounding each call's working memory, its result
            included (default: half of the available memory).
        progress: tqdm progress bars over the data.
        target_key: the targets' key in mapping batches.
        seed: seeds the Monte Carlo draws.
        process_group: data parallelism: ``"auto"`` (default) sums over the ranks of the
            default group when ``torch.distributed`` is initialized with more than one process,
            each rank passing over its shard (a ``DataLoader`` with a ``DistributedSampler``);
            a ``ProcessGroup``: over that group; ``None``: this process's data only. See the
            module docstring.

    Data of at most ``min(memory_budget / 8, 256 MB)`` is kept on the model's device after the
    first complete pass (later passes skip the loader).
    """

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        data: Iterable,
        likelihood: str | Likelihood | Any = "classification",
        *,
        mc_samples: int | None = None,
        reduction: str = "sum",
        memory_budget: int | str | None = None,
        progress: bool = False,
        target_key: str = "labels",
        seed: int = 0,
        process_group: Any = AUTO,
    ) -> None:
        if mc_samples is None:
            rows = RowKind("exact")
        else:
            check_positive_int(mc_samples, "mc_samples")
            rows = RowKind("mc", mc_samples, int(seed))
        super().__init__(
            model,
            data,
            likelihood,
            rows,
            reduction=reduction,
            memory_budget=memory_budget,
            progress=progress,
            target_key=target_key,
            process_group=process_group,
        )

    def _describe_rows(self) -> str:
        return "exact" if self.rows.kind == "exact" else f"mc_samples={self.rows.mc_samples}"


class EmpiricalFisher(CurvatureOperator):
    """The empirical Fisher ``sum_n g_n g_n^T`` over ``data``, ``g_n`` the gradient of example
    n's negative log-likelihood (all its positions). Arguments as :class:`GGN` (no
    ``mc_samples``). For regression, ``g_n = J_n^T (f_n - y_n)`` (unit noise; laplace-torch's
    ``EFInterface`` uses the gradient of its ``MSELoss`` and is twice this)."""

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        data: Iterable,
        likelihood: str | Likelihood | Any = "classification",
        *,
        reduction: str = "sum",
        memory_budget: int | str | None = None,
        progress: bool = False,
        target_key: str = "labels",
        process_group: Any = AUTO,
    ) -> None:
        super().__init__(
            model,
            data,
            likelihood,
            RowKind("ef"),
            reduction=reduction,
            memory_budget=memory_budget,
            progress=progress,
            target_key=target_key,
            process_group=process_group,
        )


def kfac_operator(
    fm: FunctionalModel, factors: KFACFactors, input_scale: float, output_scale: float
) -> Kronecker:
    """The :class:`Kronecker` of summed factors: ``A * input_scale``, ``G * output_scale``."""
    blocks: dict[str, CovarianceOperator] = {}
    shapes = fm.param_shapes
    for layer in factors.layers.values():
        call, G = layer.call, layer.G * output_scale
        if call.weight_name is not None:
            A = layer.A * input_scale
            if call.kind in ("addmm", "embedding"):
                # the input side is the weight's first dimension: Conv1D stores (in, out), an
                # embedding's rows are its tokens
                blocks[call.weight_name] = KroneckerFactors(A, G, check=False)
            else:
                blocks[call.weight_name] = KroneckerFactors(G, A, check=False)
        if call.bias_name is not None:
            blocks[call.bias_name] = Dense(G, check=False)
    for name, total in factors.generic.items():
        total = total * output_scale
        if total.dim() == 2 and total.shape[0] == total.shape[1] == math.prod(shapes[name]):
            blocks[name] = Dense(total, check=False)
        else:
            blocks[name] = Diagonal(total.reshape(-1), check=False)
    missing = [n for n in fm.param_names if n not in blocks]
    for name in missing:  # parameters the data never reached (e.g. an unused layer)
        blocks[name] = Diagonal(
            fm.params(False)[name].new_zeros(math.prod(shapes[name])), check=False
        )
    return Kronecker({n: blocks[n] for n in fm.param_names}, check=False).bind(fm.layout)


def _pull_vmapped(fm: FunctionalModel, params, sub: Inputs, cot: Tensor) -> dict[str, Tensor]:
    _, pull = vjp(lambda p: fm.call(p, sub.args, sub.kwargs), params)
    (grads,) = vmap(pull)(cot)
    return grads


def _pull_loop(fm: FunctionalModel, params, sub: Inputs, cot: Tensor) -> dict[str, Tensor]:
    _, pull = vjp(lambda p: fm.call(p, sub.args, sub.kwargs), params)
    parts = [pull(c)[0] for c in cot]
    return {n: torch.stack([p[n] for p in parts]) for n in params}


_PULL = Ladder(
    "curvature products",
    [("vmap of torch.func.vjp", _pull_vmapped), ("a loop of torch.func.vjp", _pull_loop)],
)


def _separate(fm: FunctionalModel, params, sub: Inputs, tangents, output_space) -> dict:
    """``J^T H J V`` for ``c`` tangents: all of them through one forward-mode pass (``vmap``),
    then all cotangents through one backward pass."""
    f, JV = push_tangents(fm, params, sub, tangents)  # (c, b, *f_b)
    return _PULL(fm, fm, params, sub, output_space(f, JV))


def _fused(fm: FunctionalModel, params, sub: Inputs, tangents, output_space) -> dict:
    """One tangent: the forward-mode pass is itself recorded for the backward pass (one forward
    with dual numbers, one backward; no ``vmap`` over a single column)."""
    tangent = {k: t[0] for k, t in tangents.items()}

    def forward(p):
        return func_jvp(lambda q: fm.call(q, sub.args, sub.kwargs), (p,), (tangent,))

    f, pull, Jv = vjp(forward, params, has_aux=True)
    (grads,) = pull(output_space(f, Jv.unsqueeze(0))[0])
    return {k: g.unsqueeze(0) for k, g in grads.items()}


_SINGLE = Ladder(
    "curvature matrix-vector products",
    [
        ("a forward-mode pass inside torch.func.vjp", _fused),
        ("torch.func.jvp, then torch.func.vjp", _separate),
    ],
)
