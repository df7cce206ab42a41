"""The layer structure of a model for one input signature: traced once, shared by every pass.

:func:`layer_structure` traces one example (``pushforward.layers.tracing.analyze``) and
keeps the result in the model's cache under the input signature, so the functional variance,
the samples and every curvature pass over the same model and inputs share one trace. It adds
what every consumer needs on top of the analysis:

* the *head*: the plain linear call whose output is the model's output, kept only when its
  positions line up with the output's (``n`` positions of ``K`` outputs): backward passes can
  then start at its input, and its output directions are the pass's own rows;
* whether every matched call's input and output lead with the example's own batch dimension
  (size 1 in the trace), so a plain batched forward gives them as ``(b, ...)``;
* whether the traced forward read as a chain of linear layers and elementwise activations
  (``pushforward.layers.traced_chain``), so the producer tries that rung first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from pushforward.core.functional_model import FunctionalModel
from pushforward.core.inputs import Inputs
from pushforward.core.kernels import transform_kernels
from pushforward.layers.traced_chain import chain_shaped, read_chain
from pushforward.layers.tracing import Analysis, LayerCall, StructureError, analyze

__all__ = ["LayerStructure", "layer_structure"]


@dataclass(frozen=True)
class LayerStructure:
    """Where the selected parameters sit, for one input signature (module docstring).

    Attributes:
        analysis: the traced layer calls and why other parameters are not matched.
        head: the linear call whose output is the model's output, lined up with it.
        batch_first: every matched call's input and output lead with the batch dimension.
        positions: ``n``, output positions per example.
        outputs: ``K``, outputs per position.
        traced_chain: the traced forward read as a chain of the matched (linear) calls and
            elementwise activations, ending at the head.
    """

    analysis: Analysis
    head: LayerCall | None
    batch_first: bool
    positions: int
    outputs: int
    traced_chain: bool = False

    @property
    def calls(self) -> tuple[LayerCall, ...]:
        """The traced layer calls, in forward order (their ``index`` is their position)."""
        return tuple(self.analysis.calls)

    def generic(self, names: Iterable[str]) -> tuple[str, ...]:
        """The parameters among ``names`` on no matched layer call."""
        return tuple(n for n in names if n not in self.analysis.matched)

    def z_numel(self) -> int:
        """Entries of all matched layers' outputs in one example."""
        return sum(math.prod(c.output_shape) for c in self.calls)

    def widest(self) -> int:
        """The most entries of a direction's gradient, in one example, back through the calls.

        Through a chain of them: a call's output, or the input of a call after the first.
        """
        outputs = (math.prod(c.output_shape) for c in self.calls)
        inputs = (math.prod(c.input_shape) for c in self.calls[1:])
        return max([*outputs, *inputs], default=0)

    def head_cotangents(self, rows: Tensor, weight: Tensor) -> Tensor:
        """Rows ``u (b, r, *f_b)`` at the output -> ``u W (b, r, *a_head)`` at the head's input.

        Any two leading dimensions: rows ``(r, b, *f_b)`` give ``(r, b, *a_head)``.
        """
        head = self.head
        b, r = rows.shape[:2]
        u = rows.reshape(b * r * self.positions, self.outputs)
        return (u @ head.geometry.matrix(weight)).reshape(b, r, *head.input_shape)

    def head_unit_cotangents(self, index: Tensor, weight: Tensor) -> Tensor:
        """Unit rows at flat output positions ``index (b, r)`` -> ``(b, r, *a_head)``.

        Each row is ``W[k]`` at its position ``t`` (``index = t * K + k``), zero elsewhere. Any
        two leading dimensions: ``index (r, b)`` gives ``(r, b, *a_head)``.
        """
        head = self.head
        M = head.geometry.matrix(weight)  # (K, in)
        t, k = index // self.outputs, index % self.outputs
        b, r = index.shape
        width = M.shape[1]
        u = M.new_zeros(b, r, self.positions, width)
        u.scatter_(2, t.reshape(b, r, 1, 1).expand(b, r, 1, width), M[k].unsqueeze(2))
        return u.reshape(b, r, *head.input_shape)


def layer_structure(fm: FunctionalModel, inputs: Inputs) -> LayerStructure:
    """The layer structure of ``fm`` on inputs of ``inputs``' signature.

    Traced on the first example and cached in ``fm.cache``.
    """
    key = ("layers", inputs.signature())
    found = fm.cache.structures.get(key)
    if found is None:
        found = fm.cache.structures[key] = _trace(fm, inputs)
    return found


def _trace(fm: FunctionalModel, inputs: Inputs) -> LayerStructure:
    one = inputs.slice(0, 1).detach()
    params: dict[str, Tensor] = fm.params(False)
    with transform_kernels(safe_attention=True):
        analysis = analyze(lambda q: fm.call(q, one.args, one.kwargs), params)
    f_b = analysis.output_shape[1:]
    K = math.prod(f_b[len(f_b) - fm.output_dims :])
    n = f_b.numel() // max(K, 1)
    head = analysis.head
    if head is not None:
        g = head.geometry
        lined_up = (
            g.out_features == K
            and math.prod(head.output_shape) == n * K
            and math.prod(head.input_shape) == n * g.in_features
        )
        head = head if lined_up else None
    batch_first = all(
        c.output_shape[:1] == (1,) and c.input_shape[:1] == (1,) for c in analysis.calls
    )
    chain = (
        batch_first
        and head is not None
        and head is analysis.calls[-1]
        and chain_shaped(analysis.calls)
        and _reads_as_chain(fm, one, analysis, params)
    )
    return LayerStructure(analysis, head, batch_first, n, K, chain)


def _reads_as_chain(
    fm: FunctionalModel, one: Inputs, analysis: Analysis, params: dict[str, Tensor]
) -> bool:
    """The forward on ``one`` example reads as a chain (``pushforward.layers.traced_chain``)."""
    try:
        read_chain(fm, analysis, params, one)
    except (StructureError, RuntimeError, NotImplementedError):
        return False
    return True
