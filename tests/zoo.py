"""A zoo of small float64 models covering what the engine must handle; the brute-force
reference Jacobian is :func:`pushforward.testing.brute_force_jacobian`.

Each case builds a :class:`pushforward.FunctionalModel` and an input batch. Sizes are tiny so
the brute force stays fast; every case is deterministic (seeded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pushforward import FunctionalModel
from pushforward.testing import brute_force_jacobian

DTYPE = torch.float64


@dataclass
class Case:
    name: str
    fm: FunctionalModel
    x: Any


class TiedLM(nn.Module):
    """Token ids (B, T) -> logits (B, T, V) with the output head tied to the input embedding."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        # causal running mean couples tokens within a sequence (not across the batch)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(
            1, -1, 1
        )
        return self.head(h)


class SharedWeights(nn.Module):
    """Two Linear modules sharing one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class ReusedModule(nn.Module):
    """One Linear module applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.sin(self.inner(torch.tanh(self.inner(x)))))


class DictInput(nn.Module):
    """Keyword inputs ``a`` (B, 3) and ``b`` (B, 2), returns an object with ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(3, 4)
        self.fb = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, a, b, scale: float = 1.0):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.head(torch.tanh(self.fa(a) + scale * self.fb(b))))


class Adapter(nn.Module):
    """A frozen backbone with a trainable low-rank adapter (LoRA-style) and frozen head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(5, 6)
        self.down = nn.Linear(6, 2, bias=False)
        self.up = nn.Linear(2, 6, bias=False)
        self.head = nn.Linear(6, 3)
        for p in [*self.backbone.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)

    def forward(self, x):
        h = torch.relu(self.backbone(x))
        return self.head(h + self.up(self.down(h)))


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoderLayer`` (eval) with a per-token linear head: (B, T, K)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x))


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def _mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(5, 4)


def _cnn_bn():
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )
    _randomize_bn(m[1])
    return m.eval(), torch.randn(3, 2, 5, 5)


def _inplace_relu():
    m = nn.Sequential(
        nn.Linear(4, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 2),
    )
    return m, torch.randn(4, 4)


def _layernorm():
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)), torch.randn(
        4, 4
    )


def _gpt2():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=1,
        n_embd=8,
        n_head=2,
        vocab_size=11,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 11, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.long)
    return model, {"input_ids": ids, "attention_mask": mask}


def _multi_output():
    class Regressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 6))

        def forward(self, x):
            return self.body(x).view(-1, 2, 3)

    return Regressor(), torch.randn(4, 3)


# name -> (factory returning (module, x), FunctionalModel keyword arguments)
FACTORIES: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], dict]] = {
    "mlp": (_mlp, {}),
    "cnn_batchnorm_eval": (_cnn_bn, {}),
    "inplace_relu": (_inplace_relu, {}),
    "layernorm": (_layernorm, {}),
    "tied_weights": (lambda: (SharedWeights(), torch.randn(3, 4)), {}),
    "tied_embedding_lm": (lambda: (TiedLM(), torch.randint(0, 7, (3, 4))), {}),
    "reused_module": (lambda: (ReusedModule(), torch.randn(3, 4)), {}),
    "dict_input": (
        lambda: (DictInput(), {"a": torch.randn(3, 3), "b": torch.randn(3, 2), "scale": 0.5}),
        {},
    ),
    "frozen_backbone_adapter": (lambda: (Adapter(), torch.randn(4, 5)), {}),
    "transformer_encoder": (lambda: (EncoderClassifier().eval(), torch.randn(2, 3, 8)), {}),
    "gpt2_tiny": (_gpt2, {}),
    "multi_output_regression": (_multi_output, {"output_dims": 2}),
}


def make_case(name: str, seed: int = 0, **fm_kwargs) -> Case:
    torch.manual_seed(seed)
    factory, kwargs = FACTORIES[name]
    module, x = factory()
    module = module.to(DTYPE)
    x = _to_dtype(x)
    return Case(name, FunctionalModel(module, **{**kwargs, **fm_kwargs}), x)


def _to_dtype(x):
    if isinstance(x, torch.Tensor):
        return x.to(DTYPE) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_dtype(v) for k, v in x.items()}
    return x


__all__ = ["FACTORIES", "Case", "brute_force_jacobian", "make_case"]
