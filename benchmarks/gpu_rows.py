"""The row groups of ``gpu_check.py``: one function per group, each filling a :class:`Group`.

Sizes are the full ones unless ``env.quick`` (then tiny: the script's own check, not a
measurement). Anchors that are not importable are recorded as skipped with the reason.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cases.curvature import _backpack
from cases.llm_lora import LastToken
from cases.workloads import _cnn as w4_cnn
from cases.workloads import custom_mlp, mlp
from gpu_measure import (
    CallTimeout,
    Env,
    Group,
    describe_error,
    free_memory,
    rel_err,
    time_limit,
)
from torch import Tensor, nn

import pushforward as pf
from pushforward.curvature import GGN, CrossEntropy

__all__ = ["GROUPS"]

#: Tolerances of the value checks: float32 results of two libraries (or a replayed and an eager
#: call), a bf16-base model against the float32 model with the same weights, float64 zoo.
TOL_F32, TOL_REPLAY_F32, TOL_BF16, TOL_F64 = 1e-4, 1e-5, 2e-2, 1e-10


def _seeded(env: Env, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(env.seed)
    return build().to(env.device).eval()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _plan_text(fm: Any, x: Any, S: Any, **kwargs: Any) -> str | None:
    """``str(pf.plan(...))`` of a call (what strategy and chunks it runs), or ``None``."""
    try:
        return str(pf.plan(fm, x, S, **kwargs))
    except Exception as err:
        return f"(no plan: {describe_error(err)['error']})"


def _ggn_plan(ggn: GGN, what: str) -> str | None:
    """``str(ggn.plan(what))``: how the pass runs (producer, chunks, estimates), or why not."""
    try:
        return str(ggn.plan(what))
    except Exception as err:
        return f"(no plan: {describe_error(err)['error']})"


# -- laplace-torch posteriors ------------------------------------------------------------------
def _laplace(grp: Group, model: nn.Module, x: Tensor, classes: int, structure: str):
    """A laplace-torch ``Laplace(model, "classification", subset_of_weights="all",
    hessian_structure=structure)`` fitted (default backend) on ``2 * max(1, 160 // K)``
    seeded points in two batches, or ``None`` with the reason noted."""
    try:
        from laplace import Laplace
    except Exception as err:
        grp.note("laplace-torch", f"not importable: {describe_error(err)['error']}")
        return None
    from torch.utils.data import DataLoader, TensorDataset

    env = grp.env
    n = max(1, 160 // classes)
    X = env.randn(2 * n, *x.shape[1:], seed=11)
    y = env.randint(classes, 2 * n, seed=12)
    try:
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
        start = time.perf_counter()
        la.fit(DataLoader(TensorDataset(X, y), batch_size=n))
        env.sync()
        grp.note(
            "laplace-torch fit",
            f"{type(la).__name__} ({type(la.backend).__name__}) on {2 * n} points: "
            f"{time.perf_counter() - start:.2f} s",
        )
        return la
    except Exception as err:
        grp.note("laplace-torch fit failed", describe_error(err)["error"])
        return None


def _posterior(grp: Group, model: nn.Module, x: Tensor, classes: int, structure: str):
    """``(fm, S, la)``: laplace-torch's fitted posterior through ``pf.from_laplace``; without
    laplace-torch a seeded random S of the same structure (``la`` is ``None``)."""
    la = _laplace(grp, model, x, classes, structure)
    if la is not None:
        try:
            fm, S = pf.from_laplace(la)
            return fm, S, la
        except Exception as err:
            grp.note("pf.from_laplace failed", describe_error(err)["error"])
            la = None
    fm = pf.FunctionalModel(model)
    S = _random_cov("diag" if structure == "diag" else "kron", fm, torch.float32, grp.env.seed)
    grp.note("posterior", f"random {structure} S (no laplace-torch posterior)")
    return fm, S.to(grp.env.device), None


def _spd(n: int, g: torch.Generator, dtype: torch.dtype) -> Tensor:
    A = torch.randn(n, n, generator=g, dtype=dtype)
    return A @ A.T / n + torch.eye(n, dtype=dtype)


def _random_cov(kind: str, fm: pf.FunctionalModel, dtype: torch.dtype, seed: int = 0):
    """A seeded covariance operator of ``kind`` ("diag", "kron", "lowrank", "dense")."""
    g = torch.Generator().manual_seed(seed)
    P = fm.num_params
    if kind == "diag":
        return pf.Diagonal(1e-3 * (0.5 + torch.rand(P, generator=g, dtype=dtype)))
    if kind == "lowrank":
        return pf.LowRank(
            torch.randn(P, 3, generator=g, dtype=dtype), torch.rand(3, generator=g, dtype=dtype)
        )
    if kind == "dense":
        return pf.Dense(_spd(P, g, dtype))
    if kind == "kron":
        factors = {}
        for name, shape in fm.layout.shapes.items():
            if len(shape) >= 2:
                factors[name] = (_spd(shape[0], g, dtype), _spd(shape[1:].numel(), g, dtype))
            else:
                factors[name] = (_spd(shape.numel(), g, dtype),)
        return pf.Kronecker(factors)
    raise ValueError(f"unknown covariance kind {kind!r}")


# -- the model alone and the predictive rows ---------------------------------------------------
def _model_alone(grp: Group, model: nn.Module, x: Tensor, classes: int) -> None:
    """``forward`` (no gradients) and ``forward+backward`` (summed cross-entropy, parameter
    gradients) of the model alone."""
    y = grp.env.randint(classes, x.shape[0], seed=3)

    def forward() -> Tensor:
        with torch.no_grad():
            return model(x)

    def forward_backward() -> Tensor:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        loss.backward()
        return loss.detach()

    grp.time("forward", forward, library="torch")
    grp.time("forward+backward", forward_backward, library="torch")
    model.zero_grad(set_to_none=True)


def _no_replay(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with pf.settings(replay=False):
            return fn()

    return run


def _compiled(grp: Group, row: str, fm: Any, S: Any, x: Any, **kwargs: Any) -> Tensor | None:
    """Time ``pf.compile(fm, S, x, **kwargs)`` (recorded: its program, the capture time and any
    warning) and then its replayed calls; the result's second element (``None`` on failure)."""
    if grp.skip_if_spent(row):
        return None
    try:
        with warnings.catch_warnings(record=True) as caught, time_limit(grp.env.call_limit):
            warnings.simplefilter("always")
            start = time.perf_counter()
            compiled = pf.compile(fm, S, x, **kwargs)
            grp.env.sync()
            capture_s = time.perf_counter() - start
    except (Exception, CallTimeout) as err:
        grp.fail(row, err)
        return None
    info = {"program": getattr(compiled, "program", None), "compile_s": capture_s}
    texts = [f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}" for w in caught]
    if texts:
        info["compile_warnings"] = texts[:4]
    out = grp.time(row, lambda: compiled(x), info=info)
    return None if out is None else out[1]


def _predictive_rows(grp: Group, fm: Any, S: Any, x: Tensor, la: Any) -> None:
    """Variance (default, replay off, compiled), per-example covariance, laplace-torch's GLM
    predictive on the same posterior, and the value checks between them."""
    var = grp.time(
        "variance",
        lambda: pf.functional_variance(fm, x, S)[1],
        info={"plan": _plan_text(fm, x, S)},
    )
    eager = grp.time(
        "variance, replay off", _no_replay(lambda: pf.functional_variance(fm, x, S)[1])
    )
    replayed = _compiled(grp, "variance, compiled", fm, S, x)
    grp.check("variance: default = replay off", var, eager, TOL_REPLAY_F32)
    grp.check("variance: compiled = replay off", replayed, eager, TOL_REPLAY_F32)
    grp.time("covariance per example", lambda: pf.functional_covariance(fm, x, S)[1])
    if la is None:
        grp.skip("GLM predictive (B, K, K)", "no laplace-torch posterior", "laplace-torch")
        return
    theirs = grp.time(
        "GLM predictive (B, K, K)",
        lambda: la._glm_predictive_distribution(x)[1],
        library="laplace-torch",
        ratio_to=("variance", "variance, compiled", "covariance per example"),
    )
    grp.check(
        "variance = diagonal of laplace-torch's GLM covariance",
        var,
        None if theirs is None else torch.diagonal(theirs, dim1=-2, dim2=-1),
        TOL_F32,
    )


# -- W1, W3, W4 -------------------------------------------------------------------------------
def _mlp_workload(grp: Group, classes: int, batch: int, structure: str):
    env = grp.env
    hidden = 32 if env.quick else 256
    classes = min(classes, 100) if env.quick else classes
    batch = max(1, batch // 8) if env.quick else batch
    model = _seeded(env, lambda: mlp(hidden, classes))
    x = env.randn(batch, 784, seed=1)
    grp.note("model", f"MLP 784-{hidden}-{hidden}-{classes}, P={_num_params(model):,}, B={batch}")
    fm, S, la = _posterior(grp, model, x, classes, structure)
    return model, x, classes, fm, S, la


def w1(grp: Group) -> None:
    """W1 MLP 784-256-256-10, B=256, diagonal S (DiagLaplace): the model alone, variance
    (default, replay off, compiled), covariance, laplace-torch; then B = 1/16/256/4096."""
    model, x, classes, fm, S, la = _mlp_workload(grp, 10, 256, "diag")
    _model_alone(grp, model, x, classes)
    _predictive_rows(grp, fm, S, x, la)
    del la
    for b in (1, 4, 32, 128) if grp.env.quick else (1, 16, 256, 4096):
        xb = grp.env.randn(b, 784, seed=100 + b)
        grp.time(f"variance, B={b}", lambda xb=xb: pf.functional_variance(fm, xb, S)[1])
        _compiled(grp, f"variance, B={b}, compiled", fm, S, xb)


def w1_kron(grp: Group) -> None:
    """W1 with a Kronecker S (KronLaplace)."""
    _, x, _, fm, S, la = _mlp_workload(grp, 10, 256, "kron")
    _predictive_rows(grp, fm, S, x, la)


def w3(grp: Group) -> None:
    """W3: MLP 784-256-256-1000, B=64, diagonal S."""
    model, x, classes, fm, S, la = _mlp_workload(grp, 1000, 64, "diag")
    _model_alone(grp, model, x, classes)
    _predictive_rows(grp, fm, S, x, la)


def w4(grp: Group) -> None:
    """W4: the CNN of benchmarks/cases/workloads.py (two 3x3 convs, 16 and 32 channels, and a
    linear head), B=64, diagonal S."""
    env = grp.env
    c1, c2, batch = (4, 8, 8) if env.quick else (16, 32, 64)
    model = _seeded(env, lambda: w4_cnn(c1, c2, 10))
    x = env.randn(batch, 1, 28, 28, seed=1)
    grp.note("model", f"CNN conv({c1})-pool-conv({c2})-pool-linear(10), P={_num_params(model):,}")
    fm, S, la = _posterior(grp, model, x, 10, "diag")
    _model_alone(grp, model, x, 10)
    _predictive_rows(grp, fm, S, x, la)


# -- exact diagonal GGN and K-FAC over a data set ----------------------------------------------
def _curvlinops_kfac(model: nn.Module, data: list) -> Callable[[], Any]:
    from curvlinops import KFACLinearOperator

    def run() -> Any:
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            list(model.parameters()),
            data,
            fisher_type="type-2",
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        return op

    return run


def _anchor(grp: Group, row: str, library: str, make: Callable[[], Callable[[], Any]], **kw):
    """Time the anchor ``make()`` builds, or record why it cannot run."""
    try:
        run = make()
    except Exception as err:
        grp.skip(row, f"not available: {describe_error(err)['error']}", library)
        return None
    return grp.time(row, run, library=library, **kw)


def curvature(grp: Group) -> None:
    """Exact diagonal GGN and K-FAC of W1 over 16,384 points in batches of 2,048: the
    ``nn.Sequential`` and the same MLP as a custom module (read as a chain; and made not a chain,
    the general path, for the diagonal), BackPACK and curvlinops beside."""
    env = grp.env
    hidden, points, batch = (32, 1024, 128) if env.quick else (256, 16384, 2048)
    model = _seeded(env, lambda: mlp(hidden, 10))
    custom = custom_mlp(model)
    general = custom_mlp(model, general=True)
    X = env.randn(points, 784, seed=21)
    y = env.randint(10, points, seed=22)
    data = list(zip(X.split(batch), y.split(batch), strict=True))
    grp.note("data", f"MLP 784-{hidden}-{hidden}-10, {points} points in batches of {batch}")
    seq, gen, other = GGN(model, data), GGN(custom, data), GGN(general, data)
    d_seq = grp.time(
        "GGN diagonal, nn.Sequential", seq.diagonal, info={"plan": _ggn_plan(seq, "diagonal")}
    )
    d_gen = grp.time(
        "GGN diagonal, custom nn.Module", gen.diagonal, info={"plan": _ggn_plan(gen, "diagonal")}
    )
    d_other = grp.time(
        "GGN diagonal, custom nn.Module, not a chain",
        other.diagonal,
        info={"plan": _ggn_plan(other, "diagonal")},
    )
    d_bp = _anchor(
        grp,
        "DiagGGNExact",
        "BackPACK",
        lambda: _backpack(model, data),
        ratio_to=(
            "GGN diagonal, nn.Sequential",
            "GGN diagonal, custom nn.Module",
            "GGN diagonal, custom nn.Module, not a chain",
        ),
    )
    grp.check("GGN diagonal (nn.Sequential) = BackPACK", d_seq, d_bp, TOL_F32)
    grp.check("GGN diagonal (custom module) = BackPACK", d_gen, d_bp, TOL_F32)
    grp.check("GGN diagonal (custom module, not a chain) = BackPACK", d_other, d_bp, TOL_F32)
    del d_seq, d_gen, d_other, d_bp
    k_seq = grp.time("GGN K-FAC, nn.Sequential", seq.kfac, info={"plan": _ggn_plan(seq, "kfac")})
    k_gen = grp.time("GGN K-FAC, custom nn.Module", gen.kfac, info={"plan": _ggn_plan(gen, "kfac")})
    theirs = _anchor(
        grp,
        "KFACLinearOperator",
        "curvlinops",
        lambda: _curvlinops_kfac(model, data),
        ratio_to=("GGN K-FAC, nn.Sequential", "GGN K-FAC, custom nn.Module"),
    )
    if theirs is None:
        return
    for label, ours, names in (
        ("nn.Sequential", k_seq, ("0", "2", "4")),
        ("custom module", k_gen, ("fc1", "fc2", "head")),
    ):
        for mine, name in zip(names, ("0", "2", "4"), strict=True):
            block = None if ours is None else ours.factors(f"{mine}.weight")
            grp.check(
                f"K-FAC ({label}) {mine}.weight output factor = curvlinops",
                None if block is None else block.out_factor,
                theirs._gradient_covariances[name],
                TOL_F32,
            )
            grp.check(
                f"K-FAC ({label}) {mine}.weight input factor = curvlinops",
                None if block is None else block.in_factor,
                theirs._input_covariances[name],
                TOL_F32,
            )


# -- a Llama-1.1B-sized model with LoRA --------------------------------------------------------
#: TinyLlama-1.1B's dimensions; the batch: sequences, tokens; LoRA rank.
LLM_FULL = {
    "layers": 22,
    "hidden": 2048,
    "intermediate": 5632,
    "heads": 32,
    "kv_heads": 4,
    "vocab": 32000,
    "batch": 8,
    "tokens": 256,
}
LLM_QUICK = {
    "layers": 2,
    "hidden": 64,
    "intermediate": 176,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 1000,
    "batch": 4,
    "tokens": 32,
}
LORA_RANK = 8
#: Llama's tokens "▁A", "▁B", "▁C", "▁D" (any four ids: the weights are random).
ANSWER_IDS = (319, 350, 315, 360)
#: Weight-space draws of the full-vocabulary Monte Carlo predictive; batches of the MC K-FAC.
MC_DRAWS, MC_BATCHES = 8, 4


def _last_positions(attention_mask: Tensor) -> Tensor:
    return attention_mask.long().sum(1) - 1


class AnswerHead(nn.Module):
    """``(B, 4)``: the answer tokens' logits at the last non-pad token; also called with one
    mapping of the inputs (as laplace-torch calls a model on a dict batch)."""

    def __init__(self, lm: nn.Module, answer_ids: Tensor) -> None:
        super().__init__()
        self.lm = lm
        self.register_buffer("answer_ids", answer_ids, persistent=False)

    def forward(
        self, input_ids: Tensor | Mapping[str, Tensor], attention_mask: Tensor | None = None
    ) -> Tensor:
        if isinstance(input_ids, Mapping):
            input_ids, attention_mask = input_ids["input_ids"], input_ids["attention_mask"]
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return logits[rows, _last_positions(attention_mask)][:, self.answer_ids]


class TokenHead(nn.Module):
    """``(B, T, V)``: the LM's next-token logits at every position."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


@dataclass
class LLM:
    """The LoRA language model, its batches and a diagonal posterior over the LoRA weights."""

    lm: nn.Module
    size: dict[str, int]
    inputs: dict[str, Tensor]
    answers: Tensor
    answer_batch: dict[str, Tensor]
    token_batches: list[dict[str, Tensor]]
    S: pf.Diagonal
    refs: dict[str, Tensor] = field(default_factory=dict)
    base_dtype: torch.dtype = torch.float32


#: The model of the ``llm`` group, reused (converted to a bf16 base) by ``llm-bf16``.
_LLM: dict[str, LLM] = {}


def _llm_batch(env: Env, size: dict[str, int], seed: int) -> dict[str, Tensor]:
    """Token ids and a right-padded attention mask (rows of T down to about T/2 tokens) and the
    next-token labels (-100 at the padding and the last token)."""
    B, T, V = size["batch"], size["tokens"], size["vocab"]
    g = torch.Generator().manual_seed(env.seed * 1000 + seed)
    ids = torch.randint(V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : T - b * T // (2 * B)] = 1
    ids = ids.masked_fill(mask == 0, 0)
    nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    keep = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1).bool()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": nxt.masked_fill(~keep, -100)}
    return {k: v.to(env.device) for k, v in batch.items()}


def _build_llm(grp: Group) -> LLM:
    """A Llama of TinyLlama-1.1B's dimensions from a config (random weights, float32, its base
    weights rounded to bfloat16 values so that the bf16-base passes compute with the same
    weights), peft LoRA r=8 on q_proj and v_proj (lora_B random, not zero), eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    env = grp.env
    size = LLM_QUICK if env.quick else LLM_FULL
    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    start = time.perf_counter()
    torch.manual_seed(env.seed)
    with torch.device(env.device):
        lm = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(p.to(torch.bfloat16))
    lora = LoraConfig(
        r=LORA_RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = get_peft_model(lm, lora)
    g = torch.Generator().manual_seed(env.seed + 7)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    lm = lm.to(env.device).eval()
    env.sync()
    P = _num_params(lm)
    g = torch.Generator().manual_seed(env.seed + 8)
    S = pf.Diagonal((1e-3 * (0.5 + torch.rand(P, generator=g))).to(env.device))
    answer_batch = _llm_batch(env, size, seed=40)
    answer_batch["labels"] = env.randint(len(ANSWER_IDS), size["batch"], seed=41)
    token_batches = [_llm_batch(env, size, seed=50 + i) for i in range(MC_BATCHES)]
    batch = _llm_batch(env, size, seed=40)
    grp.note(
        "model",
        f"Llama {size['layers']} layers, d={size['hidden']}, intermediate "
        f"{size['intermediate']}, {size['heads']} heads / {size['kv_heads']} KV heads, vocab "
        f"{size['vocab']} (random weights from a config), peft LoRA r={LORA_RANK} on q_proj, "
        f"v_proj: P={P:,}; B={size['batch']}, T={size['tokens']}, right-padded; built in "
        f"{time.perf_counter() - start:.1f} s",
    )
    grp.note("model_bytes", sum(p.numel() * p.element_size() for p in lm.parameters()))
    answers = torch.tensor(ANSWER_IDS, device=env.device) % size["vocab"]
    return LLM(
        lm=lm,
        size=size,
        inputs={k: batch[k] for k in ("input_ids", "attention_mask")},
        answers=answers,
        answer_batch=answer_batch,
        token_batches=token_batches,
        S=S,
    )


def _llm_passes(grp: Group, st: LLM, repeats: int) -> dict[str, Tensor | None]:
    """The LLM rows, each also as a multiple of the forward: the forward of the batch, the exact
    variance and the 4 x 4 covariance of the 4 answer logits at the last non-pad token, the exact
    last-token diagonal GGN and K-FAC of one batch, the all-token Monte Carlo K-FAC over 4
    batches and the full-vocabulary MC predictive with 8 draws."""
    env = grp.env
    B = st.size["batch"]
    last = pf.FunctionalModel(LastToken(st.lm))
    tokens = pf.FunctionalModel(TokenHead(st.lm))
    outputs = st.answers.expand(B, -1)
    per_forward = ("forward",)

    def forward() -> Tensor:
        with torch.no_grad():
            return st.lm(**st.inputs).logits

    logits = grp.time("forward", forward, library="torch")
    grp.note("logits dtype", None if logits is None else str(logits.dtype))
    del logits
    out: dict[str, Tensor | None] = {}
    plan = _plan_text(last, st.inputs, st.S, outputs=outputs)
    out["variance"] = grp.time(
        "4-answer variance, last token",
        lambda: pf.functional_variance(last, st.inputs, st.S, outputs=outputs)[1],
        ratio_to=per_forward,
        info={"plan": plan},
        repeats=repeats,
    )
    out["covariance"] = grp.time(
        "4 x 4 covariance per example",
        lambda: pf.functional_covariance(last, st.inputs, st.S, outputs=outputs)[1],
        ratio_to=per_forward,
        info={"plan": _plan_text(last, st.inputs, st.S, kind="covariance", outputs=outputs)},
        repeats=repeats,
    )
    answer_ggn = GGN(AnswerHead(st.lm, st.answers), [st.answer_batch], "classification")
    diagonal = grp.time(
        "exact last-token GGN diagonal, 1 batch",
        answer_ggn.diagonal,
        ratio_to=per_forward,
        info={"plan": _ggn_plan(answer_ggn, "diagonal")},
        repeats=repeats,
    )
    out["ggn_diagonal"] = None if diagonal is None else diagonal.detach().clone()
    del diagonal
    grp.time(
        "exact last-token GGN K-FAC, 1 batch",
        answer_ggn.kfac,
        ratio_to=per_forward,
        info={"plan": _ggn_plan(answer_ggn, "kfac")},
        repeats=repeats,
    )
    mc = GGN(TokenHead(st.lm), st.token_batches, CrossEntropy(), mc_samples=1, seed=env.seed)
    grp.time(
        f"all-token MC K-FAC (1 draw per token), {MC_BATCHES} batches",
        mc.kfac,
        ratio_to=(("forward", MC_BATCHES),),
        info={"plan": _ggn_plan(mc, "kfac")},
        repeats=repeats,
    )
    del mc

    def mc_predictive() -> Tensor:
        g = torch.Generator(device=env.device).manual_seed(env.seed)
        return pf.predictive(tokens, st.inputs, st.S, link="mc", n_samples=MC_DRAWS, generator=g)

    try:  # the draws per chunk: from the forward's live tensors (the cost model)
        mc_plan = str(pf.plan(tokens, st.inputs, st.S, strategy="monte_carlo", n_samples=MC_DRAWS))
    except Exception as err:
        mc_plan = f"(no plan: {describe_error(err)['error']})"
    grp.time(
        f"full-vocabulary MC predictive, {MC_DRAWS} draws",
        mc_predictive,
        ratio_to=per_forward,
        info={"plan": mc_plan},
        repeats=repeats,
    )
    return out


def _llm_laplace(grp: Group, st: LLM) -> None:
    """laplace-torch's KronLaplace on the answer head (2 batches of 2 sequences) and its GLM
    predictive (4 x 4 per example) at B=2, beside pushforward on the same posterior."""
    try:
        from laplace import Laplace
    except Exception as err:
        grp.skip(
            "GLM predictive 4 x 4, B=2",
            f"not importable: {describe_error(err)['error']}",
            "laplace-torch",
        )
        return
    from torch.utils.data import DataLoader

    head = AnswerHead(st.lm, st.answers)
    items = [{k: v[i] for k, v in st.answer_batch.items()} for i in range(4)]
    la = Laplace(
        head,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        dict_key_x="input_ids",
        dict_key_y="labels",
    )
    grp.time(
        "KronLaplace.fit, 2 batches of 2",
        lambda: la.fit(DataLoader(items, batch_size=2)),
        library="laplace-torch",
        once=True,
    )
    if grp.row("KronLaplace.fit, 2 batches of 2").get("status") != "ok":
        return
    x2 = {k: st.inputs[k][:2] for k in ("input_ids", "attention_mask")}
    fm, S = pf.from_laplace(la)
    ours = grp.time(
        "4 x 4 covariance, B=2, laplace-torch's posterior",
        lambda: pf.functional_covariance(fm, x2, S)[1],
    )
    theirs = grp.time(
        "GLM predictive 4 x 4, B=2",
        lambda: la._glm_predictive_distribution(x2)[1],
        library="laplace-torch",
        ratio_to=("4 x 4 covariance, B=2, laplace-torch's posterior",),
    )
    grp.check("4 x 4 covariance, B=2 = laplace-torch's", ours, theirs, TOL_F32)


def _chunk_sweep(grp: Group, st: LLM) -> None:
    """The 4-answer variance and the 4 x 4 covariance under a few chunk targets: how far the
    default settings are from the best one."""
    env = grp.env
    key = "gpu_chunk_target" if env.device.type != "cpu" else "chunk_target"
    targets = ("1MB", "16MB", "1GB") if env.quick else ("512MB", "4GB", "32GB")
    last = pf.FunctionalModel(LastToken(st.lm))
    outputs = st.answers.expand(st.size["batch"], -1)
    for target in targets:
        for row, fn in (
            ("4-answer variance, last token", pf.functional_variance),
            ("4 x 4 covariance per example", pf.functional_covariance),
        ):

            def run(fn=fn, target=target) -> Tensor:
                with pf.settings(**{key: target}):
                    return fn(last, st.inputs, st.S, outputs=outputs)[1]

            grp.time(f"{row}, {key}={target}", run, ratio_to=(row, "forward"), repeats=2)


def llm(grp: Group) -> None:
    """The Llama-1.1B-sized LoRA model in float32 (TF32 off): every pass as a multiple of the
    forward; laplace-torch at B=2; a chunk-target sweep."""
    st = _build_llm(grp)
    _LLM["model"] = st
    st.refs = {k: v for k, v in _llm_passes(grp, st, repeats=3).items() if v is not None}
    try:
        _llm_laplace(grp, st)
    except Exception as err:
        grp.fail("laplace-torch at B=2", err, "laplace-torch")
    _chunk_sweep(grp, st)


def llm_bf16(grp: Group) -> None:
    """The same passes with the base model in bfloat16 and the LoRA weights in float32; the
    variances, covariances and GGN diagonal against the float32 model with the same weights."""
    st = _LLM.pop("model", None)
    if st is None:
        st = _build_llm(grp)
        last = pf.FunctionalModel(LastToken(st.lm))
        outputs = st.answers.expand(st.size["batch"], -1)
        references = {
            "variance": lambda: pf.functional_variance(last, st.inputs, st.S, outputs=outputs)[1],
            "covariance": lambda: pf.functional_covariance(last, st.inputs, st.S, outputs=outputs)[
                1
            ],
            "ggn_diagonal": lambda: GGN(
                AnswerHead(st.lm, st.answers), [st.answer_batch], "classification"
            ).diagonal(),
        }
        for key, compute in references.items():
            try:
                st.refs[key] = compute()
            except Exception as err:
                grp.note(f"float32 reference {key} failed", describe_error(err)["error"])
    with torch.no_grad():
        for name, p in st.lm.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
    st.base_dtype = torch.bfloat16
    grp.env.sync()
    free_memory(grp.env)
    dtypes = sorted({str(p.dtype) for p in st.lm.parameters()})
    grp.note("parameter dtypes", dtypes)
    grp.note(
        "reference",
        "the float32 model with the same (bfloat16-representable) base weights and LoRA weights",
    )
    out = _llm_passes(grp, st, repeats=2)
    for key, label in (
        ("variance", "4-answer variance"),
        ("covariance", "4 x 4 covariance"),
        ("ggn_diagonal", "last-token GGN diagonal"),
    ):
        got, want = out.get(key), st.refs.get(key)
        grp.check(f"{label}, bf16 base vs float32", got, want, TOL_BF16)
        if got is not None and want is not None:
            got, want = got.detach().double().cpu(), want.detach().double().cpu()
            grp.note(
                f"{label}: dtype, largest elementwise relative error vs float32",
                f"{out[key].dtype}, {float(((got - want).abs() / want.abs()).max()):.3g}",
            )


# -- BoTorch ------------------------------------------------------------------------------------
def botorch(grp: Group) -> None:
    """``optimize_acqf(qLogExpectedImprovement, q=4, num_restarts=10, raw_samples=512)`` on a
    PushforwardModel: an MLP 6-200-200-1 (tanh, float64) trained on 20 Hartmann6 points, its
    K-FAC GGN posterior with δ and σ by the marginal likelihood (this library alone)."""
    from botorch.acquisition.logei import qLogExpectedImprovement
    from botorch.optim import optimize_acqf
    from botorch.sampling.normal import SobolQMCNormalSampler
    from botorch.test_functions import Hartmann

    from pushforward.botorch import PushforwardModel
    from pushforward.curvature import laplace_posterior, optimize_prior_precision

    env = grp.env
    hidden, epochs, restarts, raw = (16, 50, 2, 32) if env.quick else (200, 500, 10, 512)
    dt = torch.float64
    f = Hartmann(dim=6, negate=True).to(device=env.device, dtype=dt)
    g = torch.Generator().manual_seed(env.seed)
    X = torch.rand(20, 6, generator=g, dtype=dt).to(env.device)
    Y = f(X).unsqueeze(-1)
    torch.manual_seed(env.seed)
    net = nn.Sequential(
        nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    ).to(env.device, dt)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    start = time.perf_counter()
    for _ in range(epochs):
        opt.zero_grad()
        F.mse_loss(net(X), Y).backward()
        opt.step()
    net.eval()
    ggn = GGN(net, [(X, Y)], "regression")
    kfac = ggn.kfac()
    delta, sigma = optimize_prior_precision(ggn, kfac, optimize_sigma=True)
    S = laplace_posterior(kfac, delta, sigma_noise=sigma)
    model = PushforwardModel(net, S, noise=sigma**2, observation_noise=True)
    grp.note(
        "surrogate",
        f"MLP 6-{hidden}-{hidden}-1 tanh, P={_num_params(net):,}, 20 points, δ={float(delta):.3g}"
        f", σ={float(sigma):.3g}; trained and fitted in {time.perf_counter() - start:.1f} s",
    )
    bounds = f.bounds.to(env.device, dt)

    def run() -> Tensor:
        torch.manual_seed(env.seed)
        acqf = qLogExpectedImprovement(
            model,
            best_f=Y.max(),
            sampler=SobolQMCNormalSampler(torch.Size([512]), seed=env.seed),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, value = optimize_acqf(acqf, bounds=bounds, q=4, num_restarts=restarts,
                                     raw_samples=raw)  # fmt: skip
        return value

    grp.time(f"optimize_acqf(qLogEI, q=4, num_restarts={restarts}, raw_samples={raw})", run)
    Xc = torch.rand(10, 1, 6, generator=g, dtype=dt).to(env.device).requires_grad_(True)

    def posteriors() -> Tensor:
        for _ in range(100):
            post = model.posterior(Xc)
            post.mean, post.variance  # noqa: B018
        return post.variance

    grp.time("100 posterior calls, 10 x 1 x 6 (mean and variance)", posteriors)


# -- the test zoo, GRU and LSTM on the device against the CPU ----------------------------------
class RecurrentHead(nn.Module):
    """``nn.GRU`` or ``nn.LSTM`` (batch first) and a linear head on the last step: ``(B, K)``."""

    def __init__(self, kind: str, inputs: int = 3, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@dataclass
class ZooCase:
    name: str
    fm: pf.FunctionalModel
    x: Any


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x.to(device) if isinstance(x, Tensor) else x


def _zoo_factories() -> dict[str, Callable[[], ZooCase]]:
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from zoo import FACTORIES, make_case

    def recurrent(kind: str) -> ZooCase:
        torch.manual_seed(0)
        model = RecurrentHead(kind).double().eval()
        x = torch.randn(4, 6, 3, dtype=torch.float64)
        return ZooCase(kind, pf.FunctionalModel(model), x)

    # the recurrent models first: a spent time budget skips the zoo's last models
    out: dict[str, Callable[[], ZooCase]] = {
        "gru": lambda: recurrent("gru"),
        "lstm": lambda: recurrent("lstm"),
    }
    out |= {name: (lambda name=name: make_case(name)) for name in FACTORIES}
    return out


def _zoo_calls(strategy: str, fm: pf.FunctionalModel, x: Any, cov: Any) -> tuple[Tensor, Tensor]:
    """``(variance, joint covariance)`` by ``strategy`` (``"compiled"``: pf.compile)."""
    if strategy == "compiled":
        var = pf.compile(fm, cov, x)(x)[1]
        joint = pf.compile(fm, cov, x, what="joint")(x)[1]
        return var, joint
    return (
        pf.functional_variance(fm, x, cov, strategy=strategy)[1],
        pf.functional_covariance(fm, x, cov, joint=True, strategy=strategy)[1],
    )


def _zoo_compare(
    results: list[dict[str, Any]],
    base: dict[str, Any],
    device_call: tuple[pf.FunctionalModel, Any, Any],
    refs: tuple[Tensor, Tensor],
    cpu_call: tuple[pf.FunctionalModel, Any, Any] | None,
) -> None:
    """Append the comparison of ``base["strategy"]`` on ``device_call`` (model, inputs,
    covariance) with the brute-force ``refs`` and with the same call on ``cpu_call``."""
    strategy = base["strategy"]
    entry = dict(base)
    try:
        got = _zoo_calls(strategy, *device_call)
    except ValueError as err:  # the strategy does not apply (the message says why) ...
        entry |= {"status": "n/a", "error": describe_error(err)["error"]}
        if cpu_call is not None:  # ... unless the CPU runs it
            try:
                _zoo_calls(strategy, *cpu_call)
                entry["status"] = "error"
                entry["error"] += " (the same call runs on the CPU)"
            except ValueError:
                pass
            except Exception as cpu_err:
                entry["cpu_error"] = describe_error(cpu_err)["error"]
        results.append(entry)
        return
    except Exception as err:
        entry |= {k: v for k, v in describe_error(err).items() if k != "traceback"}
        results.append(entry)
        return
    shaped = [g.reshape(r.shape) for g, r in zip(got, refs, strict=True)]
    entry["rel_err_vs_brute_force"] = max(rel_err(g, r) for g, r in zip(shaped, refs, strict=True))
    if cpu_call is not None:
        try:
            on_cpu = _zoo_calls(strategy, *cpu_call)
            entry["rel_err_vs_cpu"] = max(
                rel_err(g, c.reshape(r.shape)) for g, c, r in zip(shaped, on_cpu, refs, strict=True)
            )
        except Exception as err:
            entry["cpu_error"] = describe_error(err)["error"]
    worst = max(entry["rel_err_vs_brute_force"], entry.get("rel_err_vs_cpu", 0.0))
    entry["status"] = "pass" if worst <= TOL_F64 else "fail"
    results.append(entry)


def _brute_ggn_diagonal(fm: pf.FunctionalModel, x: Any) -> Tensor:
    """``sum_n diag(J_n^T (diag(p_n) - p_n p_n^T) J_n)`` (softmax cross-entropy) by brute force."""
    from pushforward.testing import brute_force_jacobian

    f, J = brute_force_jacobian(fm, x)
    p = f.softmax(-1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("bkp,bkl,blp->p", J, H, J)


def zoo(grp: Group) -> None:
    """The test zoo (float64) plus a GRU and an LSTM model (eval mode, linear head) on the
    device: every exact strategy, ``auto`` and ``pf.compile``, variance and joint covariance,
    against the CPU brute force (``J S Jᵀ`` from per-output autograd) and against the same call
    on the CPU; the recurrent models' (and the MLP's) ``GGN(...).diagonal()`` and ``.kfac()``
    against the CPU."""
    from pushforward.engine import STRATEGY_NAMES
    from pushforward.testing import brute_force_jacobian

    env = grp.env
    strategies = ["auto", *(s for s in STRATEGY_NAMES if s != "monte_carlo"), "compiled"]
    kinds = ("diag", "kron", "lowrank", "dense")
    on_cpu = env.device.type == "cpu"
    results: list[dict[str, Any]] = []
    grp.notes["zoo"] = results
    for name, factory in _zoo_factories().items():
        if grp.remaining() <= 0:
            results.append({"model": name, "status": "skipped", "error": "time budget spent"})
            continue
        try:
            ref_case = factory()
            _, J = brute_force_jacobian(ref_case.fm, ref_case.x)
        except Exception as err:
            results.append({"model": name, "status": "error", **_short(err)})
            continue
        Jf = J.reshape(-1, J.shape[-1])
        for kind in kinds:
            cov = _random_cov(kind, ref_case.fm, torch.float64, seed=env.seed)
            try:
                Sd = cov.to_dense() if kind != "kron" else cov.bind(ref_case.fm.layout).to_dense()
            except Exception as err:
                results.append({"model": name, "cov": kind, "status": "error", **_short(err)})
                continue
            joint_ref = Jf @ Sd @ Jf.T
            refs = (joint_ref.diagonal().reshape(J.shape[:-1]), joint_ref)
            dev_case = factory()
            dev_case.fm.module.to(env.device)
            x_dev, cov_dev = _to(dev_case.x, env.device), cov.to(env.device)
            cpu = None if on_cpu else (ref_case.fm, ref_case.x, cov)
            for strategy in strategies:
                _zoo_compare(
                    results,
                    {"model": name, "cov": kind, "strategy": strategy},
                    (dev_case.fm, x_dev, cov_dev),
                    refs,
                    cpu,
                )
        if name in ("gru", "lstm", "mlp"):
            _zoo_curvature(grp, results, name, factory, on_cpu)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    grp.note("counts", counts)
    errs = [r["rel_err_vs_brute_force"] for r in results if "rel_err_vs_brute_force" in r]
    if errs:
        grp.note("worst relative error vs brute force", max(errs))
    failed = [r for r in results if r["status"] in ("fail", "error")]
    for r in failed[:20]:
        print(f"  [{grp.name}] {r}")


def _short(err: BaseException) -> dict[str, str]:
    return {k: v for k, v in describe_error(err).items() if k != "traceback"}


def _zoo_curvature(
    grp: Group,
    results: list[dict[str, Any]],
    name: str,
    factory: Callable[[], ZooCase],
    on_cpu: bool,
) -> None:
    """``GGN(model, [(x, y)]).diagonal()`` against the brute force and the CPU, ``.kfac()``
    (dense) against the CPU."""
    env = grp.env
    ref_case = factory()
    y = torch.randint(0, 3, (ref_case.x.shape[0],), generator=torch.Generator().manual_seed(1))
    dev_case = factory()
    dev_case.fm.module.to(env.device)
    data_dev = [(_to(dev_case.x, env.device), y.to(env.device))]
    data_cpu = [(ref_case.x, y)]
    brute = _brute_ggn_diagonal(ref_case.fm, ref_case.x)
    for what in ("diagonal", "kfac"):
        entry: dict[str, Any] = {"model": name, "cov": "-", "strategy": f"GGN.{what}()"}
        try:
            got = getattr(GGN(dev_case.fm, data_dev), what)()
            got = got if what == "diagonal" else got.to_dense()
            errs = []
            if what == "diagonal":
                entry["rel_err_vs_brute_force"] = rel_err(got, brute)
                errs.append(entry["rel_err_vs_brute_force"])
            if not on_cpu:
                want = getattr(GGN(ref_case.fm, data_cpu), what)()
                want = want if what == "diagonal" else want.to_dense()
                entry["rel_err_vs_cpu"] = rel_err(got, want)
                errs.append(entry["rel_err_vs_cpu"])
            entry["status"] = (
                ("pass" if all(e <= TOL_F64 for e in errs) else "fail") if errs else "not compared"
            )
        except Exception as err:
            entry |= _short(err)
        results.append(entry)


#: group name -> (function, title, time budget in seconds on an H100/H200).
GROUPS: dict[str, tuple[Callable[[Group], None], str, float]] = {
    "w1": (w1, "W1: MLP 784-256-256-10, B=256, diagonal S (DiagLaplace); B sweep", 45),
    "w1-kron": (w1_kron, "W1, Kronecker S (KronLaplace)", 20),
    "w4": (w4, "W4: CNN (conv 16, conv 32, linear), B=64, diagonal S", 20),
    "w3": (w3, "W3: MLP 784-256-256-1000, B=64, diagonal S", 20),
    "curvature": (
        curvature,
        "Exact diagonal GGN and K-FAC, W1 MLP, 16,384 points in batches of 2,048",
        35,
    ),
    "llm": (
        llm,
        "Llama-1.1B dimensions + LoRA r=8 (q_proj, v_proj), B=8, T=256, padded, float32",
        140,
    ),
    "llm-bf16": (llm_bf16, "The same with a bfloat16 base model and float32 LoRA weights", 55),
    "botorch": (botorch, "BoTorch optimize_acqf(qLogEI, q=4) on a PushforwardModel", 35),
    "zoo": (zoo, "The test zoo, GRU and LSTM (float64) on the device vs the CPU", 50),
}
