"""Mixed precision: half-precision models (a bf16/fp16 base with fp32 LoRA adapters, or bf16
throughout) against a float64 reference of the same weights, results accumulated in float32."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pushforward as pf
from pushforward.core.precision import accumulation_dtype
from pushforward.curvature import GGN

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

STRATEGIES = ("auto", "structured", "reverse", "forward", "explicit")
#: Relative error (Frobenius) allowed against the float64 reference: bf16 keeps 8 bits of
#: mantissa (2^-8 = 3.9e-3 per rounding), fp16 keeps 11.
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _lora_model():
    """A tiny GPT-2 with LoRA adapters on c_attn (random weights), float32."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    lora = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    return get_peft_model(GPT2LMHeadModel(config), lora).eval()


def _last_logits(out):
    return out.logits[:, -1]


def _half_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model with its frozen base weights in ``dtype`` and its adapters left in float32."""
    half = copy.deepcopy(model)
    for name, p in half.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(dtype)
    return half


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    ).eval()
    return model, torch.randn(8, 6)


@pytest.fixture(scope="module")
def lora():
    model = _lora_model()
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    ref = pf.FunctionalModel(copy.deepcopy(model).double(), output_fn=_last_logits)
    return model, {"input_ids": ids}, ref


def _diag(fm: pf.FunctionalModel, dtype: torch.dtype) -> pf.Diagonal:
    g = torch.Generator().manual_seed(3)
    return pf.Diagonal(
        (torch.rand(fm.num_params, generator=g, dtype=torch.float64) * 1e-2).to(dtype)
    )


def test_accumulation_dtype():
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.bfloat16, torch.float32) == torch.float32
    assert accumulation_dtype(torch.float16, torch.float64) == torch.float64
    assert accumulation_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_half_base_lora_variance(lora, dtype, strategy):
    model, x, ref = lora
    f64, v64 = pf.functional_variance(ref, x, _diag(ref, torch.float64))
    fm = pf.FunctionalModel(_half_base(model, dtype), output_fn=_last_logits)
    assert fm.dtype == torch.float32  # the adapters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pf.PushforwardFallbackWarning)
        try:
            f, var = pf.functional_variance(fm, x, _diag(fm, torch.float32), strategy=strategy)
        except pf.DerivativeOverflowError as err:
            # float16's range: GPT-2 masks attention with the dtype's minimum, and forward-mode
            # or batched products through it overflow for some inputs; said, never a nan
            assert dtype == torch.float16 and strategy in ("structured", "explicit", "forward")
            assert "float16" in str(err)
            return
    assert f.dtype == dtype and var.dtype == torch.float32
    assert _norm_err(var, v64) <= TOL[dtype]
    assert _norm_err(f, f64) <= TOL[dtype]
    cov = pf.functional_covariance(fm, x, _diag(fm, torch.float32))[1]
    assert cov.dtype == torch.float32
    assert (
        _norm_err(cov, pf.functional_covariance(ref, x, _diag(ref, torch.float64))[1]) <= TOL[dtype]
    )


@pytest.mark.parametrize("cov_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bfloat16_model_variance(cov_dtype, strategy):
    model, x = _mlp()
    ref = pf.FunctionalModel(copy.deepcopy(model).double())
    v64 = pf.functional_variance(ref, x.double(), _diag(ref, torch.float64))[1]
    fm = pf.FunctionalModel(copy.deepcopy(model).to(torch.bfloat16))
    f, var = pf.functional_variance(fm, x.bfloat16(), _diag(fm, cov_dtype), strategy=strategy)
    assert f.dtype == torch.bfloat16 and var.dtype == torch.float32
    assert _norm_err(var, v64) <= TOL[torch.bfloat16]


def test_bfloat16_replay_equals_the_eager_call():
    model, x = _mlp()
    fm = pf.FunctionalModel(copy.deepcopy(model).to(torch.bfloat16))
    S = _diag(fm, torch.float32)
    xb = x.bfloat16()
    with pf.settings(replay=False):
        want = pf.functional_variance(fm, xb, S)[1]
    for _ in range(3):
        got = pf.functional_variance(fm, xb, S)[1]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert [entry[1].program for entry in fm.cache.replays.values()] == ["chain"]


@pytest.mark.parametrize("what", ["diagonal", "kfac", "dense"])
def test_half_precision_curvature_is_summed_in_float32(lora, what):
    model, x, ref = lora
    y = torch.randint(0, 50, (4,), generator=torch.Generator().manual_seed(4))

    def result(fm):
        c = getattr(GGN(fm, [(x, y)], "classification"), what)()
        return c.to_dense() if what == "kfac" else c

    want = result(ref)
    fm = pf.FunctionalModel(_half_base(model, torch.bfloat16), output_fn=_last_logits)
    got = result(fm)
    assert got.dtype == torch.float32
    assert _norm_err(got, want) <= TOL[torch.bfloat16]


def test_bfloat16_curvature_over_many_examples():
    """Thousands of examples: a bfloat16 running sum would stall (adding a term below half an
    ulp of the sum changes nothing); the float32 one keeps the reference's value."""
    model, _ = _mlp()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(4096, 6, generator=g)
    y = torch.randint(0, 3, (4096,), generator=g)
    batches = [(X[i : i + 512], y[i : i + 512]) for i in range(0, 4096, 512)]
    ref = GGN(
        pf.FunctionalModel(copy.deepcopy(model).double()),
        [(a.double(), b) for a, b in batches],
        "classification",
    ).diagonal()
    fm = pf.FunctionalModel(copy.deepcopy(model).to(torch.bfloat16))
    got = GGN(fm, [(a.bfloat16(), b) for a, b in batches], "classification").diagonal()
    assert got.dtype == torch.float32
    assert _norm_err(got, ref) <= TOL[torch.bfloat16]
    # what a bfloat16 accumulator would give: far off
    naive = torch.zeros_like(ref, dtype=torch.bfloat16)
    for a, b in batches:
        naive += GGN(fm, [(a.bfloat16(), b)], "classification").diagonal().bfloat16()
    assert _norm_err(naive, ref) > 2 * _norm_err(got, ref)


def test_half_precision_samples_and_predictive(lora):
    model, x, ref = lora
    fm = pf.FunctionalModel(_half_base(model, torch.bfloat16), output_fn=_last_logits)
    S = _diag(fm, torch.float32)
    samples = pf.functional_samples(fm, x, S, 64, generator=torch.Generator().manual_seed(6))
    assert samples.dtype == torch.bfloat16  # function values, in the model's output dtype
    v64 = pf.functional_variance(ref, x, _diag(ref, torch.float64))[1]
    spread = samples.double().var(0)
    assert _norm_err(spread, v64) <= 0.5  # 64 draws: a Monte Carlo estimate
    probs = pf.predictive(fm, x, S, likelihood="classification")
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(4), rtol=0, atol=1e-5)


def test_non_finite_curvature_is_an_error():
    model, x = _mlp()
    x = x.clone()
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        GGN(model, [(x, torch.zeros(8, dtype=torch.long))], "classification").diagonal()
    fm = pf.FunctionalModel(copy.deepcopy(model).to(torch.bfloat16))
    with pytest.raises(ValueError, match="half-precision"):
        GGN(fm, [(x.bfloat16(), torch.zeros(8, dtype=torch.long))], "classification").diagonal()
