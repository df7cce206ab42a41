"""Saving and loading curvature results (``GGN(...).diagonal()/dense()/lowrank()/kfac()``) and
a Kronecker (K-FAC) Laplace posterior of a GPT-2 + LoRA model: exact round trips through a file
that ``torch.load(weights_only=True)`` reads, and a clear refusal of a model they do not fit."""

from __future__ import annotations

import inspect
import io
import logging
import warnings

import pytest
import torch
from torch import nn

import pushforward as pf
from pushforward import curvature, persistence
from pushforward.curvature import GGN, laplace_posterior

D = torch.float64


def _mlp(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).to(D)


def _round_trip(obj, **load_kwargs):
    buffer = io.BytesIO()
    pf.save(obj, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # readable without running code
    buffer.seek(0)
    return pf.load(buffer, **load_kwargs)


def _results(likelihood: str) -> tuple[nn.Module, dict[str, curvature.Curvature]]:
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=D)
    y = torch.randint(0, 2, (12,), generator=g) if likelihood == "classification" else X[:, :2]
    ggn = GGN(model, [(X, y)], likelihood)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Lanczos: fewer pairs than asked
        lowrank = ggn.lowrank(4)
    return model, {
        "diagonal": ggn.diagonal(),
        "dense": ggn.dense(),
        "lowrank": lowrank,
        "kfac": ggn.kfac(),
    }


def _tensors(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result.as_subclass(torch.Tensor)]
    if isinstance(result, tuple):
        return list(result)
    return result.tensors()


def test_every_curvature_result_type_is_registered():
    """Every concrete curvature type the package exports can be saved."""
    types = [
        getattr(curvature, name)
        for name in curvature.__all__
        if inspect.isclass(getattr(curvature, name))
        and issubclass(getattr(curvature, name), curvature.Curvature)
        and getattr(curvature, name) is not curvature.Curvature
    ]
    assert len(types) == 4
    for cls in types:
        assert persistence._NAMES.get(cls) == cls.__name__, cls


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["diagonal", "dense", "lowrank", "kfac"])
def test_curvature_results_round_trip_exactly(kind, likelihood):
    model, results = _results(likelihood)
    result = results[kind]
    loaded = _round_trip(result, model=model)
    assert type(loaded) is type(result)
    assert loaded.param_layout == result.param_layout and loaded.param_layout is not None
    assert loaded.likelihood == result.likelihood == likelihood
    for got, want in zip(_tensors(loaded), _tensors(result), strict=True):
        assert torch.equal(got, want) and got.stride() == want.stride()
    # the posterior of the loaded curvature is the same (sigma_noise: a regression needs it)
    kwargs = {"sigma_noise": 0.5} if likelihood == "regression" else {}
    want = laplace_posterior(result, 0.7, **kwargs)
    got = laplace_posterior(loaded, 0.7, **kwargs)
    err = (got.to_dense() - want.to_dense()).abs().max() / want.to_dense().abs().max()
    assert err.item() <= 1e-15
    assert torch.equal(loaded.logdet(0.7, scale=2.0), result.logdet(0.7, scale=2.0))
    # another model: refused, naming the parameter that differs
    with pytest.raises(ValueError, match="does not fit this model"):
        _round_trip(result, model=_mlp(width=5))


def test_an_unbound_curvature_checks_the_model_size():
    values = torch.rand(26, dtype=D)
    loaded = _round_trip(curvature.DiagonalCurvature(values), model=_mlp())
    assert torch.equal(loaded, values) and loaded.param_layout is None
    with pytest.raises(ValueError, match="P=26"):
        _round_trip(curvature.DiagonalCurvature(values), model=_mlp(width=5))


# -- a Kronecker posterior of GPT-2 + LoRA ---------------------------------------------------------
def _gpt2_lora(rank: int = 2) -> nn.Module:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    lora = peft.LoraConfig(
        r=rank,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
        init_lora_weights=False,  # LoRA's B not zero: a generic curvature
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora).to(D).eval()


def test_kronecker_posterior_of_gpt2_lora_round_trips(tmp_path):
    model = _gpt2_lora()
    fm = pf.FunctionalModel(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 11, (3, 5), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)  # next-token targets
    ggn = GGN(fm, [{"input_ids": ids, "labels": labels}], "classification")
    kfac = ggn.kfac()
    assert any(n.endswith("lora_A.default.weight") for n in kfac.layout.names)
    posterior = laplace_posterior(kfac, 2.0)
    for obj in (kfac, posterior):
        path = tmp_path / f"{type(obj).__name__}.pt"
        pf.save(obj, path)
        loaded = pf.load(path, model=fm)
        assert type(loaded) is type(obj) and loaded.layout == obj.layout == fm.layout
        want = obj.to_dense()
        err = (loaded.to_dense() - want).abs().max() / want.abs().max()
        assert err.item() <= 1e-15, err.item()
        # a fresh FunctionalModel of the same network loads it too
        pf.load(path, model=model)
        # another LoRA rank, another network: refused with the parameter named
        with pytest.raises(ValueError, match=r"lora_A\.default\.weight' has shape"):
            pf.load(path, model=_gpt2_lora(rank=3))
        with pytest.raises(ValueError, match="does not fit this model"):
            pf.load(path, model=_mlp())
    # the loaded posterior gives the same predictive variances
    x = {"input_ids": ids[:, :4]}
    loaded = pf.load(tmp_path / f"{type(posterior).__name__}.pt", model=fm)
    _, var = pf.functional_variance(fm, x, posterior)
    _, var_loaded = pf.functional_variance(fm, x, loaded)
    assert torch.equal(var, var_loaded)
