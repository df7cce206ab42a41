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

Results are in the model's dtype (``float32`` for a half-precision model: sums over the data
are accumulated in it) and on its device, detached.

**Data parallelism** (``process_group``, see :mod:`pushforward.core.collectives`): in a
``torch.distributed`` run each rank passes over its shard of the data and every sum —
products, diagonal, K-FAC factors, the dense matrix, the number of examples, the loss and the
output count — is all-reduced at the end of the pass
(:meth:`~pushforward.curvature.data.Batches.finish`): every rank gets the curvature of the union
of the shards, as one process would on all the data. Lanczos and the randomized method run
their (cheap) iterations on every rank with the reduced products, identically. Monte Carlo
draws (``mc_samples``) are seeded per batch of every rank (no two ranks' batches share them):
the estimate is the same on every rank, but not the draws one process would make.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import jvp as func_jvp
from torch.func import vjp, vmap

from pushforward.core.chunking import progress_bar, spans
from pushforward.core.collectives import AUTO, resolve_group
from pushforward.core.cost import Budget, ModelCost, measure_cost, product_bytes
from pushforward.core.fallback import Ladder
from pushforward.core.functional_model import FunctionalModel, as_functional_model
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import transform_kernels
from pushforward.core.layout import ParamLayout
from pushforward.core.options import Options, check_positive_int
from pushforward.core.precision import accumulation_dtype
from pushforward.covariance.checks import all_finite
from pushforward.curvature.data import Batches
from pushforward.curvature.dense import DenseSums
from pushforward.curvature.diagonal import DiagonalSums
from pushforward.curvature.directions import LikelihoodRows, RowKind, draw_noise
from pushforward.curvature.kfac import KFACSums, kfac_blocks
from pushforward.curvature.likelihoods import Likelihood, as_likelihood
from pushforward.curvature.lowrank import lanczos, lanczos_bytes, randomized, randomized_bytes
from pushforward.curvature.passes import CurvaturePass, PassPlan
from pushforward.curvature.results import (
    DenseCurvature,
    DiagonalCurvature,
    KroneckerCurvature,
    LowRankCurvature,
)
from pushforward.products.jvp import push_tangents

__all__ = ["GGN", "CurvatureOperator", "EmpiricalFisher"]

C = TypeVar("C")

#: At most this many bytes of data are kept between passes (and at most 1/8 of the budget).
CACHE_BYTES = 256 * 2**20

#: What :meth:`CurvatureOperator.plan` explains.
PLANS = ("diagonal", "kfac", "dense", "matmat", "lowrank")


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
        """P, the number of the model's selected parameters."""
        return self.fm.num_params

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of every result.

        The model's, ``float32`` for a half-precision model (sums over the data are accumulated
        in it, ``pushforward.core.precision``).
        """
        return accumulation_dtype(self.fm.dtype)

    @property
    def device(self) -> torch.device:
        """The model's device (that of every result)."""
        return self.fm.device

    @property
    def layout(self) -> ParamLayout:
        """The model's parameter layout (the flat order of the P parameters)."""
        return self.fm.layout

    def _budget(self) -> int:
        return self.options.budget_bytes(self.device)

    def _pass(self) -> CurvaturePass:
        return CurvaturePass(
            self.fm,
            self.likelihood,
            self.rows,
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
        """The summed negative log-likelihood at the current parameters.

        In laplace-torch's convention: cross-entropy summed; ``1/2 sum ||f - y||^2`` for regression.
        """
        return torch.as_tensor(self._statistics()[1], dtype=self.dtype, device=self.device)

    def num_outputs(self) -> int:
        """Observed output scalars, the Gaussian normalizer's count.

        ``N * K`` without the ignored targets.
        """
        return self._statistics()[2]

    def _statistics(self) -> tuple[int, float, int]:
        """``(N, loss, outputs)``, computed again when the parameters changed.

        Changed in place or replaced.
        """
        key = tuple((t.data_ptr(), t._version) for t in self.fm.params(False).values())
        if self._stats is None or self._stats_key != key:
            loss, outputs = 0.0, 0
            params = self.fm.params(False)
            with torch.no_grad():
                for batch in progress_bar(self.data, self.options.progress, "curvature: loss"):
                    inputs = self.fm.prepare(batch.inputs).detach()
                    f = self.fm.call(params, inputs.args, inputs.kwargs)
                    f, y = self._flat_outputs(f, batch.y)
                    loss += float(self.likelihood.loss(f, y))
                    outputs += self.likelihood.num_outputs(f, y)
            (totals,), count = self.data.finish(
                [torch.tensor([loss, outputs], dtype=torch.float64, device=self.device)]
            )
            loss, outputs = totals.tolist()
            self._stats = (count, loss, int(outputs))
            self._stats_key = key
        return self._stats

    def _flat_outputs(self, f: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``f (B, n, K)`` and the targets reshaped to match."""
        B = f.shape[0]
        K = math.prod(f.shape[f.dim() - self.fm.output_dims :])
        f = f.reshape(B, -1, K)
        return f, self.likelihood.prepare_targets(y, f.shape)

    # -- plans ---------------------------------------------------------------------------
    def plan(self, what: str = "diagonal", **kwargs: Any) -> PassPlan:
        """How a pass of ``what`` runs over the data's first batch (``print(ggn.plan("kfac"))``).

        The producer of layer pieces and why, chunk sizes, estimated work and peak memory.

        Args:
            what: ``"diagonal"``, ``"kfac"``, ``"dense"``, ``"matmat"`` or ``"lowrank"``.
            **kwargs: the options of that computation: ``approx=`` for ``"kfac"`` (as :meth:`kfac`),
                ``columns=`` (how many, default 1) for ``"matmat"``, ``k=``, ``method=`` and
                ``oversample=`` for ``"lowrank"`` (as :meth:`lowrank`).

        Returns:
            The :class:`PassPlan`.

        Raises:
            ValueError: an unknown ``what``, or data without a batch.
        """
        batch = next(iter(self.data), None)
        if batch is None:
            raise ValueError("the data hold no batch to plan a pass on")
        if what in ("matmat", "lowrank"):
            return self._product_plan(batch, what, **kwargs)
        consumers = {
            "diagonal": lambda: DiagonalSums(self.fm),
            "kfac": lambda: KFACSums(self.fm, kwargs.get("approx", "expand"), "diagonal"),
            "dense": lambda: DenseSums(self.fm),
        }
        if what not in consumers:
            raise ValueError(f"what must be one of {list(PLANS)}, got {what!r}")
        plan = self._pass().first_plan(self.data, consumers[what]())
        assert plan is not None  # the data hold a batch
        return plan

    def _product_plan(self, batch, what: str, **kwargs: Any) -> PassPlan:
        inputs = self.fm.prepare(batch.inputs).detach()
        cost = measure_cost(self.fm, inputs)
        budget = Budget.of(self._budget(), device=self.device)
        B = inputs.batch_size
        held = 0
        if what == "lowrank":
            k = kwargs.get("k", 10)
            method = kwargs.get("method", "lanczos")
            if method == "lanczos":
                columns, held = 1, lanczos_bytes(self.num_params, 10 * k + 20, cost.itemsize)
            else:
                columns = k + kwargs.get("oversample", 10)
                held = randomized_bytes(self.num_params, columns, cost.itemsize)
        else:
            columns = kwargs.get("columns", 1)
        rows, cols, per_pair, per_col, held = _product_chunks(cost, B, columns, budget, held)
        return PassPlan(
            f"curvature products ({columns} columns)",
            "forward-mode JVPs of the columns, then one VJP (torch.func)",
            B,
            columns,
            cols,
            held,
            per_col + rows * per_pair,
            0,
            3.0 * B * cost.forward_flops * columns,
            budget,
        )

    # -- products ----------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``(P,) -> (P,)``: the curvature times ``v``."""
        if v.shape != (self.num_params,):
            raise ValueError(f"v must have shape ({self.num_params},), got {tuple(v.shape)}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def matmat(self, V: Tensor) -> Tensor:
        """``(P, m) -> (P, m)``: the curvature times the columns of ``V``.

        One JVP (all m columns) and one VJP per chunk of a batch, the output-space Hessian in
        between.
        """
        if V.dim() != 2 or V.shape[0] != self.num_params:
            raise ValueError(f"V must have shape ({self.num_params}, m), got {tuple(V.shape)}")
        V = V.to(self.dtype, copy=False)
        fm, m = self.fm, V.shape[1]
        out = torch.zeros_like(V)
        if m == 0:
            return out
        params = fm.params(False)
        tangents = fm.unflatten(V.T.to(fm.dtype).contiguous())  # {name: (m, *shape)}
        curvature_pass = self._pass()
        for batch in progress_bar(self.data, self.options.progress, "curvature: products"):
            inputs = fm.prepare(batch.inputs).detach()
            cost = measure_cost(fm, inputs)
            n, K = curvature_pass.output_split(cost)
            B = inputs.batch_size
            y = self.likelihood.prepare_targets(batch.y, torch.Size((B, n, K)))
            noise = draw_noise(
                self.likelihood, self.rows, batch.index, B, n, K, cost.output_dtype, inputs.device
            )
            rows_of = LikelihoodRows(self.likelihood, self.rows, y, noise, cost.output_shape, n, K)
            budget = Budget.of(self._budget(), device=self.device)
            held = 3 * V.numel() * V.element_size()
            rows, cols, per_pair, per_col, held = _product_chunks(cost, B, m, budget, held)
            budget.require(
                held + cols * (rows * per_pair + per_col), "the curvature's matrix-vector products"
            )
            for s in spans(B, rows):
                sub = inputs.slice(s.start, s.stop)
                for c in spans(m, cols):
                    part = {k: t[c] for k, t in tangents.items()}
                    out[:, c] += self._product_chunk(rows_of, params, sub, y[s], noise, s, part).T
        (out,), count = self.data.finish([out])
        if self.reduction == "mean":
            out /= count
        return out

    def _product_chunk(self, rows_of, params, sub: Inputs, y, noise, samples: slice, tangents):
        """``(c, P)``: the chunk's share of the curvature times the c tangents."""
        fm = self.fm
        b = sub.batch_size
        nK = (rows_of.n, rows_of.K)
        nz = None if noise is None else noise[samples]
        product = self._output_product(rows_of)
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

    def _output_product(self, rows_of: LikelihoodRows):
        """One example's output-space curvature times ``v (c, n, K)``."""
        lik, kind = self.likelihood, self.rows.kind

        def product(f, y, noise, v):
            if kind == "exact":
                return lik.hessian_product(f, y, v)
            C = rows_of.cotangents(f, y, noise, slice(0, rows_of.rows))
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
    def diagonal(self) -> DiagonalCurvature:
        """``(P,)``: the diagonal, exact or the Monte Carlo estimate for ``mc_samples``.

        Returns:
            A :class:`DiagonalCurvature` (a tensor).
        """
        sums = DiagonalSums(self.fm)
        self._pass().run(self.data, sums)
        (flat,), count = self.data.finish([sums.total()])
        scale = self._scale(count)
        flat = flat if scale == 1.0 else flat * scale
        return self._tagged(DiagonalCurvature(flat, self.fm.layout))

    def dense(self) -> DenseCurvature:
        """``(P, P)``: the matrix, from per-example rows of all P parameters (small P).

        Returns:
            A :class:`DenseCurvature` (a tensor).
        """
        sums = DenseSums(self.fm)
        self._pass().run(self.data, sums)
        (total,), count = self.data.finish([sums.total])
        return self._tagged(DenseCurvature(total * self._scale(count), self.fm.layout))

    def kfac(self, approx: str = "expand", generic: str = "diagonal") -> KroneckerCurvature:
        """K-FAC: one Kronecker-factored block per layer weight.

        Args:
            approx: for a layer applied at several positions per example (sequences,
                convolutions): ``"expand"`` treats every position as an example (``A`` averages
                ``x x^T`` over examples and positions, ``G`` sums ``g g^T`` over them);
                ``"reduce"`` first takes each example's mean input and summed output gradient over
                the positions. curvlinops' conventions, which laplace-torch's ``KronLaplace`` uses;
                both agree for a layer applied once.
            generic: ``"diagonal"`` or ``"dense"``: the block of a parameter that is not a
                supported layer's weight or bias (the exact diagonal of its curvature, or its dense
                block).

        Returns:
            A :class:`KroneckerCurvature` (a :class:`~pushforward.Kronecker` bound to the model's
            layout) whose ``to_dense()`` is the ``(P, P)`` curvature: ``G ⊗ A`` per layer weight
            (output side ``G``, input side ``A``, an average over the examples), ``G`` per bias,
            and a :class:`~pushforward.Diagonal` or :class:`~pushforward.Dense` block for other
            parameters.
        """
        sums = KFACSums(self.fm, approx, generic)
        self._pass().run(self.data, sums)
        factors = sums.result()
        values, count = self.data.finish(factors.tensors())
        factors.replace_tensors(values)
        blocks = kfac_blocks(self.fm, factors, 1.0 / count, self._scale(count))
        out = KroneckerCurvature(blocks, check=False)
        out.layout = self.fm.layout
        return self._tagged(out)

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
    ) -> LowRankCurvature:
        """The k largest eigenpairs ``(eigenvalues (k,), eigenvectors (P, k))``.

        Args:
            k: how many.
            method: ``"lanczos"`` (one :meth:`matvec` per step) or ``"randomized"`` (subspace
                iteration: ``power_iterations + 2`` :meth:`matmat` calls with ``k + oversample``
                columns).
            iterations: Lanczos: run exactly this many steps; ``None`` runs until the k leading
                Ritz values converge to ``tol`` (at most ``10 k + 20`` steps).
            tol: Lanczos: convergence tolerance, relative to the largest Ritz value.
            oversample: randomized: extra sketch columns beyond ``k``.
            power_iterations: randomized: products with orthonormalization before Rayleigh-Ritz.
            seed: seeds the starting vector / sketch.

        Returns:
            A :class:`LowRankCurvature` (a tuple). When the curvature's rank is below ``k`` (Lanczos
            finds an invariant subspace of smaller dimension), fewer pairs are returned, with a
            warning saying how many.

        Raises:
            ValueError: ``k`` exceeds P, or an unknown ``method``.
        """
        check_positive_int(k, "k")
        if k > self.num_params:
            raise ValueError(f"k={k} exceeds the number of parameters P={self.num_params}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        common = {"dtype": self.dtype, "device": self.device, "generator": generator}
        P, itemsize = self.num_params, torch.finfo(self.dtype).bits // 8
        budget = Budget.of(self._budget(), device=self.device)
        if method == "lanczos":
            if iterations is not None:
                check_positive_int(iterations, "iterations")
            steps = min(P, iterations if iterations is not None else 10 * k + 20)
            budget.require(lanczos_bytes(P, steps, itemsize), f"Lanczos' basis of {steps} vectors")
            values, vectors = lanczos(
                self.matvec, P, k, iterations=iterations, max_iterations=steps, tol=tol, **common
            )
        elif method == "randomized":
            width = min(P, k + oversample)
            budget.require(randomized_bytes(P, width, itemsize), f"a sketch of {width} columns")
            values, vectors = randomized(
                self.matmat,
                self.num_params,
                k,
                oversample=oversample,
                power_iterations=power_iterations,
                **common,
            )
        else:
            raise ValueError(f"method must be 'lanczos' or 'randomized', got {method!r}")
        if values.shape[0] < k:
            warnings.warn(
                f"pushforward: the curvature has rank {values.shape[0]} < k={k} (Lanczos found "
                f"an invariant subspace of that dimension): returning {values.shape[0]} "
                "eigenpairs",
                UserWarning,
                stacklevel=2,
            )
        return self._tagged(LowRankCurvature(values, vectors, self.fm.layout))

    def _tagged(self, curvature: C) -> C:
        """``curvature`` marked with the likelihood's kind.

        A regression curvature's posterior then asks for the observation noise.
        """
        curvature.likelihood = self.likelihood.kind
        if isinstance(curvature, Tensor):
            tensors = [curvature]
        elif isinstance(curvature, LowRankCurvature):
            tensors = list(curvature)  # (eigenvalues, eigenvectors)
        else:
            tensors = curvature.tensors()
        for t in tensors:
            if not all_finite(t):
                what = f"the {type(self).__name__}'s {type(curvature).__name__}"
                raise ValueError(
                    f"{what} is not finite: the model's outputs or their derivatives are not "
                    "finite on this data (inputs or targets with nan/inf, or derivatives beyond "
                    "a half-precision base model's range)"
                )
        return curvature

    def __repr__(self) -> str:
        ranks = "" if self.group is None else f", summed over {self.group.size} ranks"
        return (
            f"{type(self).__name__}(P={self.num_params}, {self.likelihood!r}, "
            f"{self._describe_rows()}, reduction={self.reduction!r}{ranks})"
        )

    def _describe_rows(self) -> str:
        return self.rows.kind


def _product_chunks(cost: ModelCost, B: int, m: int, budget: Budget, held: int):
    """``(examples, columns, per example and column, per column, held)`` of a product's chunks.

    All columns go through as many examples as fit, else one column at a time through fewer.
    """
    per_pair, per_col = product_bytes(cost)
    cols = budget.chunk(B * per_pair + per_col, held, at_most=m)
    rows = B
    if held + B * per_pair + per_col > budget.total or cols == 1:
        rows = budget.chunk(per_pair, held + per_col, at_most=B)
    return rows, cols, per_pair, per_col, held


class GGN(CurvatureOperator):
    """The generalized Gauss-Newton ``sum_n J_n^T L_n J_n`` over ``data``.

    Args:
        model: an ``nn.Module`` (its trainable parameters) or a
            :class:`~pushforward.FunctionalModel`.
        data: a re-iterable collection of batches (a ``DataLoader``, a list; every pass iterates
            it afresh). A batch is ``(x, y)`` — ``x`` a tensor, a tuple of positional tensors or
            a mapping of keyword arguments — or a mapping holding the targets under
            ``target_key`` next to the model's keyword arguments.
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
    """The empirical Fisher ``sum_n g_n g_n^T`` over ``data``.

    ``g_n`` is the gradient of example n's negative log-likelihood (all its positions). The
    arguments are :class:`GGN`'s, without ``mc_samples``. For regression,
    ``g_n = J_n^T (f_n - y_n)`` (unit noise; laplace-torch's ``EFInterface`` uses the gradient of
    its ``MSELoss`` and is twice this).
    """

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
    """``J^T H J V`` for ``c`` tangents.

    All of them through one forward-mode pass (``vmap``), then all cotangents through one backward
    pass.
    """
    f, JV = push_tangents(fm, params, sub, tangents)  # (c, b, *f_b)
    return _PULL(fm, fm, params, sub, output_space(f, JV))


def _fused(fm: FunctionalModel, params, sub: Inputs, tangents, output_space) -> dict:
    """``J^T H J v`` for one tangent, its forward-mode pass recorded for the backward pass.

    One forward with dual numbers, one backward; no ``vmap`` over a single column.
    """
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
