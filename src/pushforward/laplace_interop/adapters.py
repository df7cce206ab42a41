"""laplace-torch's input conventions, as :class:`~pushforward.FunctionalModel` calls.

laplace-torch calls ``model(x)`` with ``x`` either a tensor or a mapping (a Hugging Face batch:
``{"input_ids": ..., "attention_mask": ..., "labels": ...}``) passed as *one positional
argument*. pushforward's :class:`~pushforward.Inputs` reads a mapping as keyword arguments, so a
mapping-input model is wrapped in :class:`MappingInput`, which takes the entries as keyword
arguments and hands the model one mapping again. Its parameters are the model's under the prefix
:data:`PREFIX`. Nothing here imports laplace-torch.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import Tensor, nn

from pushforward.core.inputs import Inputs

__all__ = ["PREFIX", "MappingInput", "laplace_inputs"]

#: Prefix of the wrapped model's parameter names inside :class:`MappingInput`.
PREFIX = "model."


class MappingInput(nn.Module):
    """``model(dict(entries))`` for a model that takes one mapping as its input.

    The model receives a plain ``dict`` of the batch's entries (tensors sliced per example by
    the engine, anything else passed through).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **entries: Any) -> Any:
        """The model called on one ``dict`` of the keyword arguments ``entries``."""
        return self.model(dict(entries))


def laplace_inputs(x: Tensor | MutableMapping[str, Any]) -> tuple[Inputs, bool]:
    """``(inputs, is_mapping)`` for a laplace-torch batch ``x`` (a tensor or a mapping).

    A mapping's entries become keyword arguments (call the model through :class:`MappingInput`);
    every tensor in it must be batched along its first dimension.
    """
    if isinstance(x, Tensor):
        return Inputs.from_user(x), False
    if isinstance(x, MutableMapping):
        return Inputs.from_user(dict(x)), True
    raise TypeError(
        "laplace-torch passes a tensor or a mapping (e.g. a Hugging Face batch) to the model; "
        f"got {type(x).__name__}"
    )
