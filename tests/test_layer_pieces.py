"""One producer of layer pieces: the structured strategy (functional variances) and a curvature
pass hand it the same output directions and get the same pieces, on every rung of its ladder;
and every rung's pieces are exact (float64, against the brute-force Jacobian)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import Tensor, nn
from zoo import make_case

import pushforward as pf
import pushforward.curvature.passes as passes
import pushforward.engine.strategies.structured as structured
import pushforward.layers.pieces as pieces_module
from pushforward.curvature import CrossEntropy
from pushforward.curvature.data import Batch
from pushforward.curvature.diagonal import DiagonalSums
from pushforward.curvature.directions import RowKind
from pushforward.layers import (
    BY_HAND,
    GivenRows,
    RowSquares,
    dense,
    layer_structure,
    produce,
    rungs,
)

DT = torch.float64


class TokenTagger(nn.Module):
    """Token ids (B, T) -> per-token logits (B, T, K): an embedding and a per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)))


class CustomMLP(nn.Module):
    """An MLP as a module with its own ``forward``: the traced chain's case."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.nn.functional.gelu(self.fc2(torch.relu(self.fc1(x)))))


def gpt2_lora_padded():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    lora = LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    model = get_peft_model(GPT2LMHeadModel(cfg), lora).to(DT).eval()
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0  # a right-padded sequence
    return pf.FunctionalModel(model), {"input_ids": ids, "attention_mask": mask}


class LastToken(nn.Module):
    """A language model's logits at each row's last non-pad token: indexed after its frozen
    vocabulary head."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        rows = torch.arange(input_ids.shape[0])
        return logits[rows, attention_mask.sum(1) - 1]


def cases():
    torch.manual_seed(0)
    mlp = make_case("mlp")
    cnn = make_case("cnn_batchnorm_eval")
    tagger = pf.FunctionalModel(TokenTagger().to(DT))
    ids = torch.randint(0, 9, (3, 4))
    ids[0, 1] = 0  # a padding token
    return {
        "mlp": (mlp.fm, mlp.x),
        "custom_mlp": (pf.FunctionalModel(CustomMLP().to(DT)), torch.randn(4, 4, dtype=DT)),
        "cnn": (cnn.fm, cnn.x),
        "embedding": (tagger, ids),
        "gpt2_lora_padded": gpt2_lora_padded(),
        "gpt2_last_token": last_token(),
    }


def last_token():
    fm, batch = gpt2_lora_padded()
    return pf.FunctionalModel(LastToken(fm.module)), batch


def assembled(records: list, B: int, R: int, calls: list[int]) -> dict:
    """The recorded chunks' pieces put together per example and row."""
    out: dict = {}
    for pieces in records:
        s, r = pieces.chunk.samples, pieces.chunk.rows
        if r.start == 0:
            out.setdefault("f", {})[s.start] = pieces.f
            for i in calls:
                out.setdefault(("a", i), {})[s.start] = pieces.a[i]
        for i in calls:
            if isinstance(pieces.G[i], RowSquares):  # the rows' squares, summed over them
                sums = pieces.G[i].values
                total = out.setdefault(("squares", i), sums.new_zeros(B, *sums.shape[1:]))
                total[s] += sums
                continue
            G = dense(pieces.G[i])
            full = out.setdefault(("G", i), torch.zeros(B, R, *G.shape[2:], dtype=G.dtype))
            full[s, r] = G
    for key in [k for k in out if k == "f" or k[0] == "a"]:
        out[key] = torch.cat([v for _, v in sorted(out[key].items())])
    return out


def recorder(module, monkeypatch, rung: str, records: list) -> None:
    inner = produce

    def record(*args, **kwargs):
        pieces = inner(*args, **kwargs, only=rung)
        records.append(pieces)
        return pieces

    monkeypatch.setattr(module, "produce", record)


@pytest.mark.parametrize(
    "name", ["mlp", "custom_mlp", "cnn", "embedding", "gpt2_lora_padded", "gpt2_last_token"]
)
def test_variance_and_curvature_receive_the_same_pieces(name, monkeypatch):
    fm, x = cases()[name]
    inputs = fm.prepare(x)
    structure = layer_structure(fm, inputs)
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    f_ref, J = pf.testing.brute_force_jacobian(fm, x)
    B = inputs.batch_size
    E = math.prod(f_ref.shape[1:])
    # the variance's rows: one unit row per output entry, as dense cotangents for the curvature
    U = torch.eye(E, dtype=DT).reshape(E, *f_ref.shape[1:]).expand(B, E, *f_ref.shape[1:])
    ran = []
    generic = bool(structure.generic(fm.param_names))  # the curvature asks their rows too
    engine_rungs = rungs(structure, False, name == "mlp", False)
    both = [r for r in engine_rungs if r in rungs(structure, generic, name == "mlp", False)]
    for rung in both:
        engine_records: list = []
        recorder(structured, monkeypatch, rung, engine_records)
        with pf.settings(plan_cache=0):
            _, var = pf.functional_variance(fm, x, S, strategy="structured")
        needed = sorted({i for p in engine_records for i, G in enumerate(p.G) if G is not None})
        assert needed, rung
        ours = assembled(engine_records, B, E, needed)
        sweep = passes.CurvaturePass(fm, CrossEntropy(), RowKind("exact"), budget=2**30)
        # a consumer of the directions themselves receives the very pieces; the diagonal (only
        # their squares summed over the rows) receives those squares from the rungs by hand
        for squares in (False, True):
            curvature_records: list = []
            recorder(passes, monkeypatch, rung, curvature_records)
            consumer = DiagonalSums(fm)
            consumer.squares = squares
            sweep.run_batch(Batch(0, inputs, torch.zeros(B)), consumer, GivenRows(U))
            theirs = assembled(curvature_records, B, E, needed)
            reduced = squares and rung in BY_HAND
            assert any(k[0] == "squares" for k in theirs) == reduced, (rung, squares)
            for key, value in ours.items():
                if key[0] == "G" and ("squares", key[1]) in theirs:
                    key, value = ("squares", key[1]), value.square().sum(1)
                torch.testing.assert_close(value, theirs[key], rtol=1e-12, atol=1e-14, msg=str(key))
        # and the variance is exact on this rung
        want = torch.einsum("b...p,p,b...p->b...", J, S.diagonal(), J)
        torch.testing.assert_close(var, want, rtol=1e-10, atol=1e-12)
        ran.append(rung)
    assert {"vmapped", "loop"} <= set(ran), ran
    assert ("batched" in ran) == (name != "cnn"), ran  # BatchNorm's parameters: rows per example
    assert ("chain" in ran) == (name == "mlp"), ran
    assert ("traced chain" in ran) == (name in ("mlp", "custom_mlp")), ran


class AfterFrozenHead(nn.Module):
    """Token ids (B, T) -> an embedding and a linear layer (trained) -> a frozen head (B, T, 6),
    then ``after``: what the model returns of the head's output."""

    def __init__(self, after: str) -> None:
        super().__init__()
        self.after = after
        self.emb = nn.Embedding(9, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6).requires_grad_(False)
        self.register_buffer("M", torch.randn(4, 6))

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.body(torch.tanh(self.emb(ids))))
        z = self.head(h)
        if self.after == "log_softmax":  # one-input operations, nonlinear
            return z.log_softmax(-1)[:, -1, :3]
        if self.after == "scaled":
            return (z / 2.0)[:, 0]
        if self.after == "two_positions":
            return z[:, [0, -1], :2].reshape(len(ids), -1)
        if self.after == "summed":  # every row touches every position: one dense product
            return z.sum(1)[:, :3]
        return z[:, -1, :3] + (h @ self.M)[:, -1, :3]  # "skip": h reaches the output twice


@pytest.mark.parametrize(
    "name", ["gpt2_last_token", "log_softmax", "scaled", "two_positions", "summed", "skip"]
)
def test_frozen_head_rows_start_at_its_input_only_when_the_output_depends_on_it_alone(
    name, monkeypatch
):
    """The batched rung takes the rows back through a frozen head (a language model's vocabulary
    projection, indexed after it) only at the positions they touch, also through nonlinear
    one-input operations after it; an output that depends on the head's input another way takes
    the plain backward. Exact either way."""
    if name == "gpt2_last_token":
        fm, x = last_token()
    else:
        torch.manual_seed(0)
        fm, x = pf.FunctionalModel(AfterFrozenHead(name).to(DT)), torch.randint(0, 9, (3, 5))
    used: list[bool] = []
    inner = pieces_module._frozen_head

    def spy(last, f):
        found = inner(last, f)
        used.append(found is not None)
        return found

    monkeypatch.setattr(pieces_module, "_frozen_head", spy)
    monkeypatch.setattr(structured, "produce", lambda *a, **k: produce(*a, **k, only="batched"))
    S = pf.Diagonal(torch.rand(fm.num_params, dtype=DT) + 0.1)
    _, J = pf.testing.brute_force_jacobian(fm, x)
    with pf.settings(plan_cache=0):
        _, var = pf.functional_variance(fm, x, S, strategy="structured")
        _, cov = pf.functional_covariance(fm, x, S, strategy="structured")
    Jf = J.reshape(J.shape[0], -1, J.shape[-1])
    want = torch.einsum("bkp,p,blp->bkl", Jf, S.diagonal(), Jf)
    torch.testing.assert_close(var.reshape(len(Jf), -1), want.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(cov.reshape(want.shape), want)
    assert used and all(used) == (name != "skip"), used
