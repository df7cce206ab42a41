"""Laplace-LoRA predictives at GPT-2-small dimensions (issue 15's scale checks).

A GPT-2 architecture of GPT-2-small's size (12 layers, d = 768, 12 heads, vocabulary 50,257;
random weights from a config, float32) with ``peft`` LoRA r = 8 on every ``c_attn`` (GPT-2's
fused q/k/v projection: 294,912 posterior parameters), B = 4 sequences x T = 128 tokens with an
``attention_mask`` whose rows are padded to different lengths. The posterior is a K-FAC
posterior's form: one ``G ⊗ A`` Kronecker block per LoRA matrix (seeded SPD factors).

* ``llm-lora/pushforward-mc-vocab`` — the per-token predictive over the full vocabulary,
  ``pf.predictive(model, batch, S, link="mc")`` with outputs ``(4, 128, 50257)``: linearized
  samples (one JVP of the whole batch per weight-space draw), softmax averaged in chunks.
* ``llm-lora/pushforward-selected-exact`` — the exact variance ``diag(J S Jᵀ)`` of 4 selected
  tokens (answer letters) at each sequence's last non-pad token,
  ``pf.functional_variance(model, batch, S, outputs=ids)``: what Laplace-LoRA's predictive needs,
  here without a Jacobian.

Peak memory above the model is the number to read (``≤ 3 GB`` is the target on CPU); run with
``--repeats 1 --warmup 0 --time-limit 900``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from harness.registry import Context, register
from torch import Tensor, nn

from cases import workloads

#: GPT-2-small: layers, width, heads, vocabulary; the batch: sequences, tokens; LoRA rank.
SIZE = {"layers": 12, "width": 768, "heads": 12, "vocab": 50257, "batch": 4, "tokens": 128}
QUICK = {"layers": 2, "width": 32, "heads": 2, "vocab": 1000, "batch": 4, "tokens": 16}
RANK = 8
#: Weight-space draws of the Monte Carlo predictive; selected tokens of the exact variance.
MC_SAMPLES, SELECTED = 8, 4
#: The library's memory budget per call: the Monte Carlo predictive's smallest chunk (one draw
#: through the batch, the (B, T, V) outputs beside) takes about 2.8 GB at GPT-2-small's size.
MEMORY_BUDGET = "3GB"

TITLES = {
    "llm-lora": "Laplace-LoRA predictive: GPT-2-small dimensions (12 layers, d=768, vocab 50,257) "
    "+ LoRA r=8 on c_attn (P=294,912), K-FAC-form posterior, B=4 x T=128 padded",
}
for _key, _title in TITLES.items():
    workloads.TITLES.setdefault(_key, _title)


class LastToken(nn.Module):
    """``(B, V)``: the LM's logits at each row's last non-pad token (right padding)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return logits[rows, attention_mask.sum(1) - 1]


def _setup(ctx: Context, wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
    """``(model, batch, S)``: ``wrap`` of the LoRA GPT-2, a padded batch and a K-FAC-form
    posterior bound to the model's LoRA parameters."""
    import pushforward as pf

    size = QUICK if ctx.quick else SIZE
    model = workloads.peft_gpt2(
        ctx, size["layers"], size["width"], size["heads"], size["vocab"], size["tokens"], RANK
    )
    g = torch.Generator().manual_seed(ctx.seed + 1)
    B, T = size["batch"], size["tokens"]
    ids = torch.randint(0, size["vocab"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):  # rows padded to T, 7/8 T, 6/8 T, ...
        mask[b, T - b * T // 8 :] = 0
    batch = {"input_ids": ids.to(ctx.device), "attention_mask": mask.to(ctx.device)}

    def spd(n: int) -> Tensor:
        X = torch.randn(n, 2 * RANK, generator=g)
        M = X @ X.T / (2 * RANK) + torch.eye(n)
        return ((M + M.T) / 2).to(ctx.device) * 1e-2

    model = wrap(model).eval()
    fm = pf.FunctionalModel(model)
    # nn.Linear weights: lora_A (r, d), lora_B (3d, r)
    blocks = [pf.KroneckerFactors(spd(out), spd(inp)) for out, inp in fm.param_shapes.values()]
    S = pf.Kronecker(blocks).bind(fm.layout)
    ctx.info.update(
        arch=f"GPT-2 {size['layers']}x{size['width']}, vocab {size['vocab']}, LoRA r={RANK}",
        B=B,
        T=T,
        K=size["vocab"],
        P=fm.num_params,
        model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )
    return fm, batch, S


@register(
    "llm-lora/pushforward-mc-vocab",
    workload="llm-lora",
    method=f"pf.predictive(link='mc', n_samples={MC_SAMPLES}): per-token full-vocabulary "
    f"predictive, outputs (B, T, V), memory_budget={MEMORY_BUDGET!r}",
    library="pushforward",
    tags=("llm",),
)
def _mc_vocab(ctx: Context) -> Callable[[], object]:
    import pushforward as pf

    fm, batch, S = _setup(ctx)
    ctx.info["n_samples"] = MC_SAMPLES

    def run() -> Tensor:
        generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", pf.PushforwardFallbackWarning)
            return pf.predictive(
                fm,
                batch,
                S,
                link="mc",
                n_samples=MC_SAMPLES,
                generator=generator,
                memory_budget=MEMORY_BUDGET,
            )

    return run


@register(
    "llm-lora/pushforward-selected-exact",
    workload="llm-lora",
    method=f"pf.functional_variance(outputs=...): exact variance of {SELECTED} selected tokens "
    f"at the last token, memory_budget={MEMORY_BUDGET!r}",
    library="pushforward",
    tags=("llm",),
)
def _selected_exact(ctx: Context) -> Callable[[], object]:
    import pushforward as pf

    fm, batch, S = _setup(ctx, LastToken)
    B = batch["input_ids"].shape[0]
    outputs = torch.arange(10, 10 + SELECTED, device=ctx.device).expand(B, SELECTED)
    ctx.info["selected"] = SELECTED

    def run() -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pf.PushforwardFallbackWarning)
            return pf.functional_variance(
                fm, batch, S, outputs=outputs, memory_budget=MEMORY_BUDGET
            )[1]

    return run
