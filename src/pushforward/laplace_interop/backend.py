"""laplace-torch (0.3) curvature backends computed by pushforward's per-example engine.

Pass :class:`PushforwardGGN` or :class:`PushforwardEF` as laplace-torch's ``backend``::

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="diag", backend=PushforwardGGN,
                 backend_kwargs={"memory_budget": "1GB"})
    la.fit(train_loader)

laplace-torch's own backends form the Jacobian of a whole batch, ``B x K x P``, with ``jacrev``
(its vectorized backward passes go through the whole batch, O(B^2) work) and contract it even
for a diagonal GGN. These backends compute per-example rows ``J(x_n)^T u`` (``vmap`` over examples
of ``torch.func.vjp``, as :func:`pushforward.per_example_vjp` does) in chunks bounded by
``memory_budget``:

* ``diag``: ``sum_n sum_r (J_n^T u_nr)^2`` with ``u_n`` the rows of a factor of the loss Hessian
  w.r.t. the outputs, or the loss gradient (empirical Fisher), through the layer structure
  (as :meth:`GGN.diagonal <pushforward.curvature.CurvatureOperator.diagonal>`: a linear layer's
  ``sum G^2 ⊗ a^2`` in closed form, per-example rows only for other parameters); with
  ``stochastic=True`` the same from sampled output gradients drawn as laplace-torch draws them;
* ``full``: the ``P x P`` sum, accumulated chunk by chunk;
* ``jacobians``/``last_layer_jacobians``/``selected_output_jacobians``/``gradients``: laplace's
  shapes and order, memory linear in the batch (their result's own size);
* ``kron``: K-FAC from the layer structure (as :meth:`GGN.kfac
  <pushforward.curvature.CurvatureOperator.kfac>`: one forward and one batched backward per
  loss-Hessian factor row, never a per-example parameter gradient) in
  laplace-torch's ``Kron`` form — the same factors as its default (curvlinops' KFAC), ``"expand"``
  or ``"reduce"`` (``asdl_fisher_kwargs={"kfac_approx": ...}``); also for layers curvlinops
  refuses (embeddings, Hugging Face ``Conv1D``, 1-d parameters such as LayerNorm's, as dense
  blocks). Except for a layer run on ``R`` rows per example folded into the batch inside
  ``forward`` (a reward model reshaping its pairs ``(B, 2, d)`` to ``(2B, d)``): its input factor
  is averaged over ``N R`` rows (K-FAC "expand", the factor of the same network written on
  ``(B, 2, d)``), where curvlinops sums the ``R B`` rows over ``N = B``: ``1 / R`` of the
  default backend's;
* ``eig_lowrank``: the leading eigenpairs of the GGN (or EF) by Lanczos over the data
  (``low_rank`` of them, laplace-torch's ``LowRankLaplace``), without asdfghjkl.

Semantics follow laplace-torch: parameters are those with ``requires_grad`` in
``named_parameters()`` order (frozen ones are left out); ``subnetwork_indices`` (set by
``SubnetLaplace`` after construction) index that vector; with ``last_layer=True`` (set by the
last-layer classes) everything is w.r.t. all parameters of ``model.last_layer`` of laplace's
``FeatureExtractor``, through its features; mapping inputs (Hugging Face batches) are passed to
the model as one positional argument; losses are ``factor * lossfunc(f, y)``
(``factor`` 1 for cross-entropy, 1/2 for squared error, sums over the batch).

What laplace-torch checks by exact class or name, and how these backends get through:

* ``Laplace(...)`` picks the class from ``(subset_of_weights, hessian_structure)`` (each
  subclass's ``_key``) and passes ``backend`` and ``backend_kwargs`` through; the backend is
  built lazily on first use with ``(model, likelihood, dict_key_x=, dict_key_y=,
  **backend_kwargs)``, plus ``last_layer=True`` for last-layer Laplace.
* ``SubnetLaplace`` requires ``issubclass(backend, (GGNInterface, EFInterface))``: satisfied
  (the classes derive from laplace's ``CurvlinopsGGN``/``CurvlinopsEF``).
* Frozen parameters are refused only for BackPACK/Asdfghjkl backends (``issubclass``): not these.
* ``fit`` on mapping batches refuses backends whose class name contains ``"backpack"`` and,
  for ``DiagLaplace``, ``backend == CurvlinopsEF`` (equality, so a subclass passes):
  :class:`PushforwardEF` supports mapping inputs for the diagonal.
* The GLM predictive calls ``backend.functorch_jacobians`` (laplace's ``jacrev``) instead of
  ``backend.jacobians`` when the backend's class name contains ``"asdl"``: avoid that in
  subclass names.
* ``FunctionalLaplace``/``FunctionalLLLaplace`` assert ``backend in [BackPackGGN, AsdlGGN,
  CurvlinopsGGN]`` (exact classes). Workaround: construct with ``backend=CurvlinopsGGN``, then set
  ``la._backend_cls = PushforwardGGN`` (and ``la._backend_kwargs``) before ``fit``; the
  backend object is created on first use.
* ``ELLA``/``VaLLA`` call ``CurvatureInterface.jacobians(la.backend, x)`` (laplace's
  ``jacrev``) explicitly for reward modeling and ASDL backends, bypassing any backend's
  ``jacobians``.
* ``LowRankLaplace.__init__`` raises unless ``importlib.util.find_spec("asdfghjkl")`` finds the
  old asdfghjkl package (only its default backend needs it). Importing this module wraps the
  ``find_spec`` that ``laplace.baselaplace`` calls, once: inside ``LowRankLaplace.__init__``
  with one of these backends as ``backend`` it reports asdfghjkl as present; every other call
  (and every other backend) gets the real answer. So ``Laplace(..., hessian_structure="lowrank",
  backend=PushforwardGGN)`` fits with
  :meth:`~pushforward.laplace_interop.PushforwardGGN.eig_lowrank` and predicts without asdfghjkl.
* Keyword arguments laplace-torch passes to ``diag``/``full``/``kron`` (its
  ``asdl_fisher_kwargs``, curvlinops' options) are accepted as by the parent classes:
  ``mc_samples`` is the number of Monte Carlo draws (``stochastic=True``), ``kfac_approx`` is
  K-FAC's ``"expand"``/``"reduce"``, ``N`` is laplace-torch's own; every other one is ignored
  with a ``UserWarning`` naming it.
* laplace-torch's own ``jacobians``/``gradients`` with ``last_layer=True`` call the
  ``FeatureExtractor`` with the last layer's parameter names, which it does not have, and return
  zeros (so ``DiagLLLaplace`` with ``CurvlinopsEF`` fits ``H = 0``). Here they are the last layer's
  Jacobians and gradients.
"""

from __future__ import annotations

import copy
import importlib.machinery
import math
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import laplace.baselaplace
import torch
from laplace.curvature.curvlinops import CurvlinopsEF, CurvlinopsGGN
from torch import Tensor, nn

from pushforward.core.chunking import RowChunk
from pushforward.core.cost import measure_cost
from pushforward.core.functional_model import FunctionalModel, module_lock
from pushforward.core.inputs import Inputs
from pushforward.core.options import Options
from pushforward.core.softmax import softmax
from pushforward.curvature.data import Batch as DataBatch
from pushforward.curvature.dense import DenseSums
from pushforward.curvature.diagonal import DiagonalSums
from pushforward.curvature.directions import RowKind
from pushforward.curvature.kfac import APPROXIMATIONS, KFACFactors, KFACSums
from pushforward.curvature.likelihoods import CrossEntropy, Gaussian, Likelihood
from pushforward.curvature.operators import GGN, EmpiricalFisher
from pushforward.curvature.passes import Consumer, CurvaturePass
from pushforward.laplace_interop.adapters import PREFIX, MappingInput, laplace_inputs
from pushforward.laplace_interop.convert import _subnet_selection
from pushforward.layers import Directions, GivenRows
from pushforward.products.vjp import (
    collect_rows,
    iter_row_chunks,
    one_hot_cotangents,
    row_chunk_size,
)

__all__ = ["PushforwardEF", "PushforwardGGN"]

Batch = Tensor | MutableMapping[str, Any]


@dataclass(frozen=True)
class _Target:
    """What the engine differentiates for one batch.

    Attributes:
        fm: the model over the parameters laplace-torch's vector is drawn from.
        inputs: the batch as ``fm`` takes it (the features for the last layer).
        indices: positions in ``fm``'s flat vector of laplace-torch's parameters, in its order
            (subnetwork); ``None``: all of ``fm``'s parameters.
        f: the model's output ``(B, K)`` when already computed (last layer), else ``None``.
    """

    fm: FunctionalModel
    inputs: Inputs
    indices: Tensor | None
    f: Tensor | None

    @property
    def size(self) -> int:
        """Length of laplace-torch's parameter vector."""
        return self.fm.num_params if self.indices is None else len(self.indices)


def _without_hooks(layer: nn.Module) -> nn.Module:
    """``layer`` without its forward hooks: a shallow copy sharing its parameters and buffers.

    laplace-torch's ``FeatureExtractor`` records the last layer's input in ``_features`` from a
    forward hook on that layer. Called through the engine's ``vmap``/``jvp``, the hook would store
    a transform-wrapped tensor there, which outlives the call (laplace-torch's pickling then fails
    with "Cannot access storage of TensorWrapper"). The engine never needs the hook's record.
    """
    view = copy.copy(layer)
    view._forward_hooks = OrderedDict()
    view._forward_hooks_with_kwargs = OrderedDict()
    view._forward_hooks_always_called = OrderedDict()
    view._forward_pre_hooks = OrderedDict()
    view._forward_pre_hooks_with_kwargs = OrderedDict()
    return view


class _PushforwardCurvature:
    """Jacobians, gradients and curvature sums shared by the GGN and EF backends.

    Placed before laplace-torch's classes in the bases so that its methods take precedence; it
    reads the attributes laplace's ``CurvatureInterface`` sets (``model``, ``likelihood``,
    ``last_layer``, ``subnetwork_indices``, ``params_dict``, ``lossfunc``, ``factor``).
    """

    model: nn.Module
    likelihood: str
    last_layer: bool
    subnetwork_indices: Tensor | None
    params_dict: dict[str, nn.Parameter]
    lossfunc: Callable[[Tensor, Tensor], Tensor]
    factor: float

    def _init_engine(self, memory_budget: int | str | None) -> None:
        if memory_budget is not None:
            Options(memory_budget=memory_budget)  # validate now rather than at the first batch
        self.memory_budget = memory_budget
        self._models: dict[str, tuple[object, FunctionalModel, Tensor | None]] = {}

    # -- what to differentiate -------------------------------------------------------
    def _cached(
        self, kind: str, source: object, build: Callable[[], tuple[FunctionalModel, Tensor | None]]
    ) -> tuple[FunctionalModel, Tensor | None]:
        """The functional model of ``kind``, rebuilt when ``source`` changes.

        ``source`` is the last layer or the subnetwork indices, which laplace-torch sets after
        construction.
        """
        cached = self._models.get(kind)
        if cached is None or cached[0] is not source:
            cached = (source, *build())
            self._models[kind] = cached
        return cached[1], cached[2]

    def _target(self, x: Batch, differentiable: bool) -> _Target:
        if self.last_layer:
            return self._last_layer_target(x, differentiable)
        inputs, mapping = laplace_inputs(x)
        indices = self.subnetwork_indices

        def build() -> tuple[FunctionalModel, Tensor | None]:
            names = list(self.params_dict)
            local = None
            if indices is not None:
                sizes = [p.numel() for p in self.params_dict.values()]
                names, local = _subnet_selection(names, sizes, indices)
            module, prefix = (MappingInput(self.model), PREFIX) if mapping else (self.model, "")
            fm = FunctionalModel(module, params=[prefix + n for n in names])
            return fm, None if local is None else local.to(fm.device)

        fm, local = self._cached("mapping" if mapping else "tensor", indices, build)
        return _Target(fm, fm.prepare(inputs), local, None)

    def _last_layer_target(self, x: Batch, differentiable: bool) -> _Target:
        with torch.set_grad_enabled(differentiable):
            f, phi = self.model.forward_with_features(x)
        if phi.dim() == 1:  # laplace's feature reduction squeezes a batch of one
            phi = phi.unsqueeze(0)
        if phi.dim() != 2 or f.dim() != 2 or phi.shape[0] != f.shape[0]:
            raise ValueError(
                f"last-layer Laplace needs (B, d) features and (B, K) outputs; got features "
                f"{tuple(phi.shape)} and outputs {tuple(f.shape)} (for (B, T, d) features pass "
                "feature_reduction= to laplace-torch)"
            )
        layer = self.model.last_layer
        fm, _ = self._cached(
            "last_layer",
            layer,
            lambda: (FunctionalModel(_without_hooks(layer), params="all"), None),
        )
        return _Target(fm, fm.prepare(phi), None, f)

    # -- per-example rows ------------------------------------------------------------
    def _rows(
        self,
        target: _Target,
        rows_per_sample: int,
        make_cotangents: Callable[[RowChunk], Tensor],
        differentiable: bool,
    ) -> tuple[Tensor, Tensor]:
        """``(f (B, *f_b), rows (B, R, S))``: rows ``J_n^T u_nr`` at laplace-torch's parameters.

        Computed in chunks bounded by ``memory_budget``.
        """
        fm, inputs = target.fm, target.inputs
        itemsize = measure_cost(fm, inputs).itemsize
        result = inputs.batch_size * rows_per_sample * target.size * itemsize
        chunk_size = row_chunk_size(
            fm, inputs, Options(memory_budget=self.memory_budget), result, "laplace-torch's rows"
        )
        with torch.set_grad_enabled(differentiable):
            inputs = inputs if differentiable else inputs.detach()
            chunks = iter_row_chunks(
                fm, fm.params(differentiable), inputs, rows_per_sample, make_cotangents, chunk_size
            )
            if target.indices is not None:
                chunks = ((c, f, rows[..., target.indices]) for c, f, rows in chunks)
            return collect_rows(chunks, inputs.batch_size, rows_per_sample, target.size)

    def _one_hot_rows(self, target: _Target, differentiable: bool) -> tuple[Tensor, Tensor]:
        """Full Jacobians ``(B, *f_b, S)`` and outputs ``(B, *f_b)``."""
        cost = measure_cost(target.fm, target.inputs)
        shape, dtype = cost.output_shape, cost.output_dtype
        rows = math.prod(shape)

        def make(chunk: RowChunk) -> Tensor:
            b = chunk.samples.stop - chunk.samples.start
            index = torch.arange(chunk.rows.start, chunk.rows.stop, device=target.inputs.device)
            return one_hot_cotangents(index.expand(b, -1), shape, dtype)

        f, J = self._rows(target, rows, make, differentiable)
        return J.reshape(*f.shape, -1), f

    def _outputs(self, target: _Target) -> Tensor:
        """The model's outputs on the batch, without a graph."""
        if target.f is not None:
            return target.f.detach()
        fm, inputs = target.fm, target.inputs.detach()
        with torch.no_grad():
            return fm.call(fm.params(False), inputs.args, inputs.kwargs)

    def _output_gradients(self, f: Tensor, y: Tensor) -> Tensor:
        """``d lossfunc(f, y) / d f``: per-example loss gradients w.r.t. the outputs."""
        with torch.enable_grad():
            leaf = f.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.lossfunc(leaf, y), leaf)
        return grad

    # -- laplace-torch's interface ---------------------------------------------------
    def jacobians(self, x: Batch, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-example Jacobians ``Js (B, K, P)`` and outputs ``f (B, K)``.

        As laplace-torch's ``CurvatureInterface.jacobians`` (``Js.shape == f.shape + (P,)``,
        columns ``subnetwork_indices`` when set), computed example by example in chunks bounded
        by ``memory_budget``. With ``last_layer=True`` these are the last layer's Jacobians
        (:meth:`last_layer_jacobians`). ``enable_backprop`` keeps the graph to the inputs.
        """
        if self.last_layer:
            return self.last_layer_jacobians(x, enable_backprop)
        return self._one_hot_rows(self._target(x, enable_backprop), enable_backprop)

    def last_layer_jacobians(
        self, x: Batch, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians ``(B, K, P_last)`` w.r.t. all parameters of ``model.last_layer``, and ``f``.

        The parameters in order weight (row-major), then bias, through laplace's
        ``FeatureExtractor`` features; the model's outputs are ``f (B, K)``. ``enable_backprop``
        keeps the graph to the inputs.
        """
        target = self._last_layer_target(x, enable_backprop)
        Js, _ = self._one_hot_rows(target, enable_backprop)
        return Js, target.f if enable_backprop else target.f.detach()

    def selected_output_jacobians(
        self, x: Batch, outputs: Tensor, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians of selected outputs ``(B, S, P)`` and all outputs ``f (B, K)``.

        Args:
            x: the batch's inputs (a tensor, or a mapping passed to the model as one argument).
            outputs: output indices per input, ``(B,)`` or ``(B, S)``.
            enable_backprop: keep the graph to the inputs.

        Only the ``B * S`` selected rows are computed (one backward each); the full Jacobian is
        never formed.
        """
        target = self._target(x, enable_backprop)
        if outputs.ndim == 1:
            outputs = outputs[:, None]
        if outputs.ndim != 2 or outputs.shape[0] != target.inputs.batch_size:
            raise ValueError("Output selectors must match the input batch size.")
        cost = measure_cost(target.fm, target.inputs)
        shape, dtype = cost.output_shape, cost.output_dtype
        index = outputs.to(target.inputs.device, torch.long)

        def make(chunk: RowChunk) -> Tensor:
            return one_hot_cotangents(index[chunk.samples, chunk.rows], shape, dtype)

        f, Js = self._rows(target, index.shape[1], make, enable_backprop)
        if target.f is not None:
            f = target.f if enable_backprop else target.f.detach()
        return Js, f

    def gradients(self, x: Batch, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example gradients ``Gs (B, P)`` of ``lossfunc`` and the summed loss (no ``factor``).

        As laplace-torch's ``CurvatureInterface.gradients``: ``Gs[n] = J_n^T g_n`` with ``g_n`` the
        loss gradient w.r.t. example n's outputs.
        """
        target = self._target(x, False)
        f = self._outputs(target)
        g = self._output_gradients(f, y)
        _, rows = self._rows(target, 1, lambda c: g[c.samples].unsqueeze(1), False)
        return rows[:, 0], self.lossfunc(f, y)

    # -- curvature sums --------------------------------------------------------------
    def _run(
        self, target: _Target, y: Tensor, kind: RowKind, consumer: Consumer, rows=None
    ) -> None:
        """One pass of ``consumer`` over the batch (rows: the likelihood's, or given)."""
        fm = target.fm
        budget = Options(memory_budget=self.memory_budget).budget_bytes(fm.device)
        curvature_pass = CurvaturePass(fm, self._likelihood(), kind, budget=budget)
        curvature_pass.run_batch(DataBatch(0, target.inputs, y.to(fm.device)), consumer, rows)

    def _sum(self, target: _Target, y: Tensor, rows: Directions | None, diagonal: bool) -> Tensor:
        """The batch's curvature at laplace-torch's parameters: ``(P,)`` diagonal or ``(S, S)``.

        For ``rows`` (default: the exact GGN's, the loss Hessian's factor).
        """
        if diagonal:
            sums = DiagonalSums(target.fm, "laplace-torch's diag")
            self._run(target, y, RowKind("exact"), sums, rows)
            flat = sums.total()
            return flat if target.indices is None else flat[target.indices]
        dense = DenseSums(target.fm, target.indices, "laplace-torch's full")
        self._run(target, y, RowKind("exact"), dense, rows)
        return dense.total

    def _honoured(
        self, method: str, kwargs: dict[str, Any], meaningful: dict[str, str]
    ) -> dict[str, Any]:
        """The keyword arguments of ``method`` that mean something here.

        ``meaningful`` maps each such name to what it does; the others are ignored with a warning
        naming them (laplace-torch's ``N`` silently: the backends here do not need it).
        """
        rest = {k: v for k, v in kwargs.items() if k != "N"}
        used = {k: rest.pop(k) for k in list(rest) if k in meaningful}
        if rest:
            warnings.warn(
                f"{type(self).__name__}.{method}() ignores the keyword arguments {sorted(rest)}: "
                "they configure laplace-torch's curvlinops/ASDL backends and have no meaning "
                "here"
                + (
                    f" (honoured: {', '.join(f'{k} = {v}' for k, v in meaningful.items())})"
                    if meaningful
                    else ""
                ),
                UserWarning,
                stacklevel=3,
            )
        return used

    # -- through the layer structure ---------------------------------------------------
    def _likelihood(self) -> Likelihood:
        return CrossEntropy() if self.likelihood == "classification" else Gaussian()

    def _structured_diagonal(self, target: _Target, y: Tensor, rows: RowKind) -> Tensor:
        """The batch's diagonal through the layer structure, at laplace-torch's parameters.

        Closed forms per layer, as :meth:`GGN.diagonal
        <pushforward.curvature.CurvatureOperator.diagonal>` computes them.
        """
        sums = DiagonalSums(target.fm, "laplace-torch's diag")
        self._run(target, y, rows, sums)
        flat = sums.total()
        return flat if target.indices is None else flat[target.indices]

    # -- Kronecker factors -------------------------------------------------------------

    def _kron(
        self, x: Batch, y: Tensor, N: int, rows: RowKind, approx: str, scale: float
    ) -> tuple[Tensor, Any]:
        """``(loss, laplace-torch Kron)`` of one batch.

        K-FAC factors with ``A`` over ``N`` examples and the output side times ``scale`` (the ratio
        of laplace-torch's curvature to the sweep's; see :meth:`_laplace_kron`).
        """
        if approx not in APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {approx!r}")
        target = self._target(x, False)
        if target.indices is not None:
            raise ValueError(
                "kron is not defined for a subnetwork (laplace-torch's SubnetLaplace is full or "
                "diagonal only)"
            )
        f = self._outputs(target)
        self._check_outputs(f)
        loss = self.factor * self.lossfunc(f, y)
        sums = KFACSums(target.fm, approx, "dense", "laplace-torch's kron")
        self._run(target, y, rows, sums)
        return loss.detach(), self._laplace_kron(target.fm, sums.result(), N, scale)

    def _laplace_kron(self, fm: FunctionalModel, factors: KFACFactors, N: int, scale: float):
        """laplace-torch's ``Kron``: per parameter (in its order) a factor pair or one matrix.

        A weight's pair gets its factor split as laplace-torch's ``Kron *= factor`` does
        (``sqrt(factor)`` each); a bias or any 1-d parameter gets one matrix.
        """
        from laplace.utils import Kron

        root = math.sqrt(self.factor)
        blocks: dict[str, list[Tensor]] = {}
        for layer in factors.layers.values():
            call = layer.call
            G = layer.G * (scale / self.factor)  # the curvature of laplace's torch loss
            if call.weight_name is not None:
                first, second = call.geometry.pair(G, layer.A / N)
                blocks[call.weight_name] = [root * first, root * second]
            if call.bias_name is not None:
                blocks[call.bias_name] = [self.factor * G]
        shapes = fm.param_shapes
        for name, total in factors.generic.items():
            if len(shapes[name]) != 1:
                raise ValueError(
                    f"kron: parameter {name!r} of shape {tuple(shapes[name])} is not the weight "
                    "of a linear, convolution (groups=1) or embedding layer used once, and "
                    "laplace-torch's Kron needs a factor pair for it"
                )
            blocks[name] = [total * scale]
        missing = [n for n in fm.param_names if n not in blocks]
        if missing:
            raise ValueError(f"kron: no curvature for parameters {missing} (not used?)")
        return Kron([blocks[n] for n in fm.param_names])

    # -- low rank --------------------------------------------------------------------------
    def _low_rank(self, data_loader: Iterable, operator: type, scale: float, **kwargs: Any):
        """laplace-torch's ``eig_lowrank``: ``(U (P, k), eigenvalues (k,), loss)``.

        The ``low_rank`` leading eigenpairs (eigenvalues above 1e-6 kept, as asdfghjkl's backend).
        """
        if self.last_layer or self.subnetwork_indices is not None:
            raise ValueError("eig_lowrank is for all weights (LowRankLaplace)")
        data = _LaplaceBatches(self, data_loader)
        first = next(iter(data_loader), None)
        if first is None:
            raise ValueError("eig_lowrank: the data loader is empty")
        fm = self._target(data.split(first)[0], False).fm
        # laplace-torch sums over its own data loader per process: no reduction across ranks
        op = operator(
            fm,
            data,
            self._likelihood(),
            memory_budget=self.memory_budget,
            process_group=None,
            **kwargs,
        )
        k = min(self.low_rank, fm.num_params)
        eigenvalues, eigenvectors = op.lowrank(k)
        eigenvalues = eigenvalues * scale
        keep = eigenvalues > 1e-6
        return eigenvectors[:, keep], eigenvalues[keep], op.loss()

    @staticmethod
    def _check_outputs(f: Tensor) -> None:
        if f.dim() != 2:
            raise ValueError(
                f"laplace-torch's curvature needs (B, K) model outputs; got {tuple(f.shape)}"
            )


class PushforwardGGN(_PushforwardCurvature, CurvlinopsGGN):
    """Generalized Gauss-Newton backend (exact, or Monte Carlo with ``stochastic=True``).

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: as
            laplace-torch's backends (set by laplace-torch).
        stochastic: Monte Carlo GGN (Fisher) for ``diag``/``full``, with laplace-torch's
            sampling: per batch, ``num_samples`` draws from the global generator in its order
            (regression ``y ~ N(f, I)``, classification ``y ~ Cat(softmax f)``), so a fixed
            ``torch.manual_seed`` reproduces laplace-torch's own ``GGNInterface`` result. For
            ``kron`` it selects curvlinops' MC KFAC, as laplace-torch's ``CurvlinopsGGN``.
        num_samples: Monte Carlo samples per example (``diag``/``full``).
        memory_budget: bytes or a string like ``"1GB"`` bounding the engine's working memory
            (beyond the ``P`` or ``P^2`` result); default half of the available memory. Pass it
            through laplace-torch's ``backend_kwargs``.
        low_rank: the number of leading eigenpairs :meth:`eig_lowrank` computes (laplace-torch's
            ``LowRankLaplace``).

    ``diag``/``full`` return ``(loss, H)`` with ``loss = factor * lossfunc(f, y)`` and
    ``H = sum_n J_n^T L_n J_n`` over the batch (``L_n``: softmax Hessian, or the identity for
    regression, or the MC estimate), ``(P,)`` or ``(P, P)``; laplace-torch's ``N`` is ignored.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        memory_budget: int | str | None = None,
        low_rank: int = 10,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if low_rank < 1:
            raise ValueError(f"low_rank must be >= 1, got {low_rank}")
        # laplace-torch reads the trainable parameters here: not while another thread's call
        # has the module's parameters swapped
        with module_lock(model):
            super().__init__(
                model,
                likelihood,
                last_layer,
                subnetwork_indices,
                dict_key_x,
                dict_key_y,
                stochastic=stochastic,
            )
        self.num_samples = int(num_samples)
        self.low_rank = int(low_rank)
        self._init_engine(memory_budget)

    def _mc_output_gradients(self, f: Tensor, samples: int) -> Tensor:
        """``(B, S, K)`` sampled output gradients over ``sqrt(S)``, drawn as laplace-torch does.

        The same calls in the same order as laplace-torch's
        ``GGNInterface._get_mc_functional_fisher``.
        """
        draws = []
        for _ in range(samples):
            if self.likelihood == "regression":
                y_sample = f + torch.randn(f.shape, device=f.device, dtype=f.dtype)
                draws.append(f - y_sample)
            else:
                y_sample = torch.distributions.Multinomial(logits=f).sample()
                draws.append(softmax(f) - y_sample)
        return torch.stack(draws, dim=1) / math.sqrt(samples)

    def _samples(self, method: str, kwargs: dict[str, Any]) -> int:
        """Monte Carlo draws per example for this call.

        ``mc_samples`` when given (with ``stochastic=True``), else ``num_samples``.
        """
        meaningful = {"mc_samples": "Monte Carlo draws per example"} if self.stochastic else {}
        used = self._honoured(method, kwargs, meaningful)
        samples = used.get("mc_samples", self.num_samples)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {samples!r}")
        return samples

    def _ggn(self, x: Batch, y: Tensor, diagonal: bool, samples: int) -> tuple[Tensor, Tensor]:
        target = self._target(x, False)
        f = self._outputs(target)
        self._check_outputs(f)
        loss = self.factor * self.lossfunc(f, y)
        if self.stochastic:
            H = self._sum(target, y, GivenRows(self._mc_output_gradients(f, samples)), diagonal)
        elif diagonal:
            H = self._structured_diagonal(target, y, RowKind("exact"))
        else:
            H = self._sum(target, y, None, diagonal)
        return loss.detach(), H

    def diag(self, x: Batch, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, diagonal of the batch's GGN (P,))``, never holding ``B x K x P``."""
        return self._ggn(x, y, True, self._samples("diag", kwargs))

    def full(self, x: Batch, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, the batch's GGN (P, P))``, accumulated chunk by chunk."""
        return self._ggn(x, y, False, self._samples("full", kwargs))

    def kron(self, x: Batch, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Any]:
        """``(loss, laplace-torch Kron)``: K-FAC of the batch's GGN.

        The input factors are over ``N`` examples. Monte Carlo with ``stochastic=True``:
        ``mc_samples`` sampled targets per example, drawn from a seed taken from the global
        generator.
        """
        meaningful = {"kfac_approx": "'expand' or 'reduce'"}
        if self.stochastic:
            meaningful["mc_samples"] = "Monte Carlo draws per example"
        used = self._honoured("kron", kwargs, meaningful)
        if self.stochastic:
            samples = used.get("mc_samples", self.num_samples)
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
            rows = RowKind("mc", samples, seed)
        else:
            rows = RowKind("exact")
        return self._kron(x, y, N, rows, used.get("kfac_approx", "expand"), 1.0)

    def eig_lowrank(self, data_loader: Iterable) -> tuple[Tensor, Tensor, Tensor]:
        """``(eigenvectors (P, k), eigenvalues (k,), loss)``: the GGN's leading eigenpairs.

        The ``low_rank`` leading ones over ``data_loader``, by Lanczos on the GGN's matrix-free
        products (Monte Carlo with ``stochastic=True``), for laplace-torch's ``LowRankLaplace``.
        """
        kwargs = {"mc_samples": self.num_samples} if self.stochastic else {}
        return self._low_rank(data_loader, GGN, 1.0, **kwargs)


class PushforwardEF(_PushforwardCurvature, CurvlinopsEF):
    """Empirical Fisher backend: ``H = factor * sum_n G_n G_n^T`` (laplace-torch's ``EFInterface``).

    ``G_n`` are the per-example gradients of ``lossfunc``.

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: as
            laplace-torch's backends (set by laplace-torch).
        memory_budget: as for :class:`PushforwardGGN`.
        low_rank: the number of leading eigenpairs :meth:`eig_lowrank` computes.

    ``kron`` is curvlinops' empirical KFAC, as laplace-torch's ``CurvlinopsEF``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        memory_budget: int | str | None = None,
        low_rank: int = 10,
    ) -> None:
        if low_rank < 1:
            raise ValueError(f"low_rank must be >= 1, got {low_rank}")
        with module_lock(model):  # as PushforwardGGN: not while its parameters are swapped
            super().__init__(
                model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y
            )
        self.low_rank = int(low_rank)
        self._init_engine(memory_budget)

    @property
    def _ef_scale(self) -> float:
        """laplace-torch's EF over the sweep's.

        ``factor`` times the squared ratio of its loss gradient to the likelihood's (``MSELoss``:
        ``2 (f - y)`` vs ``f - y``).
        """
        return self.factor * (4.0 if self.likelihood == "regression" else 1.0)

    def _ef(self, x: Batch, y: Tensor, diagonal: bool) -> tuple[Tensor, Tensor]:
        target = self._target(x, False)
        f = self._outputs(target)
        loss = self.factor * self.lossfunc(f, y)
        if diagonal:
            return loss.detach(), self._ef_scale * self._structured_diagonal(
                target, y, RowKind("ef")
            )
        g = self._output_gradients(f, y).unsqueeze(1)  # (B, 1, *f_b)
        H = self._sum(target, y, GivenRows(g), diagonal)
        return loss.detach(), self.factor * H

    def diag(self, x: Batch, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, diagonal of the batch's empirical Fisher (P,))``."""
        self._honoured("diag", kwargs, {})
        return self._ef(x, y, diagonal=True)

    def full(self, x: Batch, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, the batch's empirical Fisher (P, P))``."""
        self._honoured("full", kwargs, {})
        return self._ef(x, y, diagonal=False)

    def kron(self, x: Batch, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Any]:
        """``(loss, laplace-torch Kron)``: K-FAC of the batch's empirical Fisher.

        curvlinops' ``fisher_type="empirical"``, input factors over ``N`` examples.
        """
        used = self._honoured("kron", kwargs, {"kfac_approx": "'expand' or 'reduce'"})
        approx = used.get("kfac_approx", "expand")
        return self._kron(x, y, N, RowKind("ef"), approx, self._ef_scale)

    def eig_lowrank(self, data_loader: Iterable) -> tuple[Tensor, Tensor, Tensor]:
        """``(eigenvectors (P, k), eigenvalues (k,), loss)``: the empirical Fisher's eigenpairs.

        The ``low_rank`` leading ones, over ``data_loader`` (Lanczos).
        """
        return self._low_rank(data_loader, EmpiricalFisher, self._ef_scale)


class _LaplaceBatches:
    """A laplace-torch data loader as ``(inputs, y)`` batches of the backend's model.

    Tensor or mapping batches; the targets of a mapping are under ``dict_key_y``.
    """

    def __init__(self, backend: _PushforwardCurvature, loader: Iterable) -> None:
        self.backend, self.loader = backend, loader

    def split(self, batch: Any) -> tuple[Any, Tensor]:
        """laplace-torch's ``(x, y)`` of a batch."""
        if isinstance(batch, MutableMapping):
            return batch, batch[self.backend.dict_key_y]
        x, y = batch
        return x, y

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        for batch in self.loader:
            x, y = self.split(batch)
            yield self.backend._target(x, False).inputs, y

    def __len__(self) -> int:
        return len(self.loader)


def _allow_low_rank() -> None:
    """Let ``LowRankLaplace(..., backend=PushforwardGGN/PushforwardEF)`` be built without asdfghjkl.

    See the module docstring: wrap, once, the ``find_spec`` that ``laplace.baselaplace`` calls.
    """
    real = laplace.baselaplace.find_spec
    if getattr(real, "_pushforward", False):
        return

    def find_spec(name: str, package: str | None = None):
        spec = real(name, package)
        if spec is None and name == "asdfghjkl":
            caller = sys._getframe(1)
            backend = caller.f_locals.get("backend")
            if (
                caller.f_code is laplace.baselaplace.LowRankLaplace.__init__.__code__
                and isinstance(backend, type)
                and issubclass(backend, _PushforwardCurvature)
            ):
                return importlib.machinery.ModuleSpec("asdfghjkl", None)
        return spec

    find_spec._pushforward = True  # type: ignore[attr-defined]
    laplace.baselaplace.find_spec = find_spec


_allow_low_rank()
