"""Laplace-LoRA on a Hugging Face GPT-2, end to end with pushforward (``make demo-llm``).

Everything is generated here, offline and seeded; nothing is downloaded:

1. **data** — a multiple-choice task, "which is largest ?" over four lettered options, whose
   answer is one letter token after ``Answer:``::

       Q: which is largest ? A) 42 B) 37 C) 45 D) 28 Answer: C                     (train, test_id)
       Q: which is largest ? A) 453 B) 439 C) 466 D) 478 Answer: D                 (test_3digit)
       Q: which is largest ? A) 24 + 41 B) 59 + 20 C) 71 + 29 D) 80 + 19 Answer: C   (test_sum)

   Fine-tuning sees two-digit numbers only; the shifted test sets have three-digit numbers or
   sums (arithmetic, an operator fine-tuning never sees). A word-level tokenizer is trained with
   the ``tokenizers`` package (numbers split into digits; ``A``..``D`` single tokens). (Picking
   the option equal to ``17 + 25`` was the first idea; a GPT-2 trained from scratch in minutes on
   one CPU thread stays at chance on it, while "which is largest" trains.)
2. **training** — a randomly initialised GPT-2 (``transformers.GPT2Config``) is pre-trained on the
   task language (answered items of all three kinds, true equations), then ``peft`` LoRA (r = 8
   on ``c_attn``, the fused q/k/v projection) is fine-tuned on the in-distribution split with the
   cross-entropy of the four answer-letter logits at the last non-pad token.
3. **fit** — :mod:`pushforward.curvature` over the LoRA parameters only: the exact GGN of the
   answer-letter likelihood at the last token ("last-token statistics", Laplace-LoRA's), as
   diagonal and K-FAC; and the Monte Carlo GGN of the next-token likelihood over the whole
   vocabulary at every token ("all-token statistics"), as K-FAC.
4. **prior precision** — :func:`~pushforward.curvature.optimize_prior_precision`: the marginal
   likelihood, and a grid search on the validation NLL of the probit predictive.
5. **predict** — the answer letter: :func:`pushforward.predictive` over the four answer-letter
   logits (probit link), and the Monte Carlo link from the exact ``4 x 4`` output covariance of
   :func:`pushforward.functional_covariance`; the per-token predictive entropy over the full
   vocabulary on the items' text: :func:`pushforward.predictive` with ``link="mc"`` on outputs
   ``(B, T, V)`` (weight-space draws, one JVP each).

The same job through laplace-torch (``Laplace(..., subset_of_weights="all",
hessian_structure="kron")`` on the LoRA model, as the Laplace-LoRA code does) is timed next to
it, and the predictives compared. Every batch carries an ``attention_mask`` (right padding), and
:class:`~pushforward.PushforwardFallbackWarning` is an error in this script: every product runs
on the library's fast paths.

Written to ``--out`` (default ``examples/results/laplace_lora``): ``results.md`` (the tables,
also printed), ``results.json`` (every number) and ``reliability.png`` (reliability diagrams of
MAP, Laplace-diag and Laplace-KFAC on each test set).

Sizes: ``--tiny`` (seconds; checks the plumbing, its model stays at chance), the default
(GPT-2 with 4 layers, d = 64, 8,192 LoRA parameters; about 8 CPU minutes on one thread) and
``--size gpt2-small`` (12 layers, d = 768; for a GPU: ``--device cuda``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pushforward as pf
from pushforward.curvature import (
    GGN,
    CrossEntropy,
    laplace_posterior,
    log_marginal_likelihood,
    optimize_prior_precision,
)

LETTERS = ("A", "B", "C", "D")
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
PAD_LABEL = -100  # ignored targets
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "laplace_lora"

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """GPT-2 dimensions: layers, width, heads and the longest sequence."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 96


MODEL_SIZES = {
    "tiny": ModelSize(n_layer=2, n_embd=32, n_head=2),
    "default": ModelSize(n_layer=4, n_embd=64, n_head=4),
    "gpt2-small": ModelSize(n_layer=12, n_embd=768, n_head=12, n_positions=128),
}


@dataclass(frozen=True)
class Config:
    """Every knob of the pipeline; :data:`CONFIGS` holds the presets."""

    size: str = "default"
    seed: int = 0
    # data
    n_train: int = 2000  # in-distribution items for LoRA fine-tuning (and the curvature)
    n_val: int = 200  # in-distribution items for the prior precision's grid search
    n_test: int = 600  # items per test split
    n_pretrain: int = 40000  # stage-A sequences (generated once, iterated in order)
    p_near: float = 0.5  # probability that a distractor is within 9 of the answer
    pretrain_eq_per_line: int = 3  # equations packed into one "eq" pre-training sequence
    # stage A (full pre-training)
    pretrain_steps: int = 2000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # stage B (LoRA)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target: tuple[str, ...] = ("c_attn",)
    finetune_steps: int = 600
    finetune_batch: int = 32
    finetune_lr: float = 3e-3
    eval_batch: int = 200
    # Laplace
    curvature_batch: int = 50  # items per batch of the curvature passes
    token_fit_items: int = 500  # items whose every token enters the all-token MC-GGN
    grid: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
    mc_samples: int = 1000  # logit samples of the "mc" link (from the output-space Gaussian)
    entropy_items: int = 50  # items per split whose per-token predictive entropy is computed
    entropy_samples: int = 20  # weight-space samples of the full-vocabulary predictive
    # laplace-torch comparison
    laplace_torch_items: int = 100  # items per test split through its GLM predictive
    laplace_torch_batch: int = 8  # its jacrev Jacobians grow with the batch squared
    # pre-training mixture: (kind, ops, n_digits, weight); kind "eq" = packed true equations,
    # "mc" = an answered multiple-choice item
    pretrain_mix: tuple = field(
        default_factory=lambda: (
            ("eq", "+", 2, 1.0),
            ("mc", "n", 2, 1.0),
            ("mc", "n", 3, 1.0),
            ("mc", "+", 2, 1.0),
        )
    )


CONFIGS = {
    "tiny": Config(
        size="tiny",
        n_train=64,
        n_val=16,
        n_test=32,
        n_pretrain=400,
        pretrain_steps=25,
        pretrain_batch=16,
        finetune_steps=10,
        curvature_batch=32,
        token_fit_items=32,
        grid=(1.0, 10.0, 100.0),
        mc_samples=200,
        entropy_items=16,
        entropy_samples=10,
        laplace_torch_items=8,
    ),
    "default": Config(),
    "gpt2-small": Config(
        size="gpt2-small",
        n_pretrain=200000,
        pretrain_steps=3000,
        pretrain_batch=128,
        pretrain_lr=3e-4,
        finetune_lr=1e-3,
        n_train=5000,
        n_test=2000,
        eval_batch=100,
        curvature_batch=25,
        laplace_torch_batch=4,
    ),
}

# --------------------------------------------------------------------------------------------
# 1. Generated multiple-choice arithmetic task
# --------------------------------------------------------------------------------------------

SPLITS = {
    # name: (option kind: "n" = plain numbers, else the operators of expressions, n_digits, seed)
    "train": ("n", 2, 1),
    "test_id": ("n", 2, 2),
    "test_3digit": ("n", 3, 3),
    "test_sum": ("+", 2, 4),
    "val": ("n", 2, 5),
}
#: The splits whose items the tokenizer is trained on (with the pre-training formats).
TOKENIZER_SPLITS = ("train", "test_id", "test_3digit", "test_sum")
QUESTION = "which is largest ?"


def _operands(rng: random.Random, op: str, n_digits: int) -> tuple[int, int]:
    lo, hi = 10 ** (n_digits - 1), 10**n_digits - 1
    a = rng.randint(lo, hi)
    if op == "*":  # n-digit times one digit (2..9)
        return a, rng.randint(2, 9)
    b = rng.randint(lo, hi)
    if op == "-" and b > a:
        a, b = b, a
    return a, b


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _expr_with_value(rng: random.Random, ops: str, n_digits: int, v: int, tries: int = 20):
    """An option of the split's kind whose value is ``v``: ``(v,)`` for plain numbers
    (``ops == "n"``), else an expression ``(a, op, b)``; None if there is none."""
    lo, hi = 10 ** (n_digits - 1), 10**n_digits - 1
    if ops == "n":
        return (v,) if lo <= v <= hi else None
    for _ in range(tries):
        op = rng.choice(ops)
        if op == "+":
            a_lo, a_hi = max(lo, v - hi), min(hi, v - lo)
            if a_lo <= a_hi:
                a = rng.randint(a_lo, a_hi)
                return (a, op, v - a)
        elif op == "-":
            b_hi = min(hi, hi - v)
            if v >= 0 and lo <= b_hi:
                b = rng.randint(lo, b_hi)
                return (v + b, op, b)
        else:
            bs = [b for b in range(2, 10) if v % b == 0 and lo <= v // b <= hi]
            if bs:
                b = rng.choice(bs)
                return (v // b, op, b)
    return None


def make_item(
    rng: random.Random,
    ops: str,
    n_digits: int,
    label: int | None = None,
    p_near: float = 0.5,
    max_offset: int = 40,
) -> dict:
    """One question: four expressions, the largest value is the answer. The three distractors
    are smaller by 1..9 (probability ``p_near``) or by 10..``max_offset - 1``, with distinct
    values. ``label`` (0..3) fixes the slot of the right answer (random if None).

    Returns ``{"exprs": [(a, op, b)] * 4, "values": [int] * 4, "label": int}``."""
    while True:
        if ops == "n":
            first = (rng.randint(10 ** (n_digits - 1), 10**n_digits - 1),)
        else:
            op = rng.choice(ops)
            a, b = _operands(rng, op, n_digits)
            first = (a, op, b)
        t = _value(first)
        exprs, vals = [], set()
        for _ in range(60):
            if len(exprs) == 3:
                break
            o = rng.randint(1, 9) if rng.random() < p_near else rng.randint(10, max_offset - 1)
            if t - o in vals:
                continue
            e = _expr_with_value(rng, ops, n_digits, t - o)
            if e is not None:
                exprs.append(e)
                vals.add(t - o)
        if len(exprs) == 3:
            break
    if label is None:
        label = rng.randrange(4)
    rng.shuffle(exprs)
    exprs.insert(label, first)
    return {"exprs": exprs, "values": [_value(e) for e in exprs], "label": label}


def _value(e: tuple) -> int:
    return e[0] if len(e) == 1 else _apply(e[1], e[0], e[2])


def format_prompt(item: dict) -> str:
    """``Q: which is largest ? A) 42 B) 37 C) 45 D) 28 Answer:`` (plain numbers) or
    ``Q: which is largest ? A) 17 + 25 B) 31 + 14 C) 22 + 19 D) 40 + 5 Answer:``"""
    opts = " ".join(
        f"{L}) " + " ".join(map(str, e)) for L, e in zip(LETTERS, item["exprs"], strict=True)
    )
    return f"Q: {QUESTION} {opts} Answer:"


def make_split(name: str, n: int, seed: int = 0, p_near: float = 0.5) -> list[dict]:
    """Deterministic split ``name`` (see ``SPLITS``) of ``n`` items; answer letters balanced
    (each letter ``n // 4`` or ``n // 4 + 1`` times, in shuffled order)."""
    ops, n_digits, off = SPLITS[name]
    rng = random.Random(1000 * seed + off)
    labels = [i % 4 for i in range(n)]
    rng.shuffle(labels)
    return [make_item(rng, ops, n_digits, label, p_near) for label in labels]


def make_pretrain_corpus(cfg: Config) -> list[str]:
    """Stage-A text: lines drawn from ``cfg.pretrain_mix`` (packed true equations such as
    ``17 + 25 = 42 ; 63 - 8 = ...`` and answered items ``<prompt> C``), each ending in EOS."""
    rng = random.Random(1000 * cfg.seed + 99)
    kinds = [m[:3] for m in cfg.pretrain_mix]
    weights = [m[3] for m in cfg.pretrain_mix]
    lines = []
    for _ in range(cfg.n_pretrain):
        kind, ops, nd = rng.choices(kinds, weights)[0]
        if kind == "eq":
            eqs = []
            for _ in range(cfg.pretrain_eq_per_line):
                op = rng.choice(ops)
                a, b = _operands(rng, op, nd)
                eqs.append(f"{a} {op} {b} = {_apply(op, a, b)}")
            lines.append(" ; ".join(eqs) + f" {EOS}")
        else:
            item = make_item(rng, ops, nd, None, cfg.p_near)
            lines.append(f"{format_prompt(item)} {LETTERS[item['label']]} {EOS}")
    return lines


# --------------------------------------------------------------------------------------------
# 2. Tokenizer
# --------------------------------------------------------------------------------------------


def build_tokenizer(texts=None):
    """Word-level tokenizer (``tokenizers`` WordLevel) trained on generated text; numbers are
    split into single digits. Returns a ``transformers.PreTrainedTokenizerFast`` with right
    padding; ``A``..``D`` are single tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:  # a sample covering every split and the pre-training formats
        texts = [
            format_prompt(it) + " A B C D" for s in TOKENIZER_SPLITS for it in make_split(s, 64)
        ]
        texts += make_pretrain_corpus(Config(n_pretrain=200))
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS], min_frequency=1)
    tok.train_from_iterator((t.replace(EOS, " ") for t in texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS, padding_side="right"
    )
    for L in LETTERS:
        assert len(fast(L, add_special_tokens=False)["input_ids"]) == 1, L
    return fast


def answer_token_ids(tokenizer) -> list[int]:
    """Token ids of ``A``, ``B``, ``C``, ``D`` (in that order)."""
    return [tokenizer.convert_tokens_to_ids(L) for L in LETTERS]


def encode_items(tokenizer, items: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids`` (N, T) long, ``attention_mask`` (N, T) long,
    ``labels`` (N,) long in 0..3 (index into ``answer_token_ids``)."""
    enc = tokenizer([format_prompt(it) for it in items], padding=True, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([it["label"] for it in items]),
    }


def encode_answered(tokenizer, items: list[dict]) -> dict[str, Tensor]:
    """The answered items as text for next-token statistics: ``input_ids`` and ``attention_mask``
    ``(N, T)`` of ``<prompt> <letter>`` (right-padded) and ``labels`` ``(N, T)``, the next token
    at every position (``-100`` at the last token and at the padding)."""
    texts = [f"{format_prompt(it)} {LETTERS[it['label']]}" for it in items]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], PAD_LABEL)], dim=1)
    keep = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1).bool()
    return {"input_ids": ids, "attention_mask": mask, "labels": nxt.masked_fill(~keep, PAD_LABEL)}


def batches(enc: dict[str, Tensor], batch_size: int, device: torch.device) -> list[dict]:
    """The encoded split as a list of dict batches (``input_ids``, ``attention_mask``,
    ``labels``), each trimmed to its longest row and moved to ``device``."""
    lengths = enc["attention_mask"].sum(1)
    out = []
    for i in range(0, lengths.shape[0], batch_size):
        T = int(lengths[i : i + batch_size].max())
        out.append(
            {
                k: (v[i : i + batch_size, :T] if v.dim() == 2 else v[i : i + batch_size]).to(device)
                for k, v in enc.items()
            }
        )
    return out


def inputs_of(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's keyword arguments of a batch (its targets dropped)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class MCDataset(torch.utils.data.Dataset):
    """Items of an encoded split as dicts, so that a default ``DataLoader`` yields dict batches
    (laplace-torch's ``dict_key_x`` / ``dict_key_y`` and ``len(loader.dataset)``)."""

    def __init__(self, enc: dict[str, Tensor]) -> None:
        self.enc = enc

    def __len__(self) -> int:
        return self.enc["labels"].shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.enc.items()}


# --------------------------------------------------------------------------------------------
# 3. Model
# --------------------------------------------------------------------------------------------


def parse_size(size: str) -> ModelSize:
    """A preset name of :data:`MODEL_SIZES` or ``"LxDxH"`` (layers x width x heads)."""
    if size in MODEL_SIZES:
        return MODEL_SIZES[size]
    n_layer, n_embd, n_head = (int(v) for v in size.split("x"))
    return ModelSize(n_layer=n_layer, n_embd=n_embd, n_head=n_head)


def build_model(tokenizer, size: str | ModelSize = "default", seed: int = 0) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` (dropout off) for the tokenizer's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    logging.getLogger("transformers").setLevel(logging.ERROR)
    ms = size if isinstance(size, ModelSize) else parse_size(size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=ms.n_positions,
        n_embd=ms.n_embd,
        n_layer=ms.n_layer,
        n_head=ms.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def add_lora(model: nn.Module, r: int, alpha: int, target_modules: tuple[str, ...]) -> nn.Module:
    """Wrap with ``peft`` LoRA (GPT-2's ``Conv1D`` needs ``fan_in_fan_out=True``); only the LoRA
    matrices require grad afterwards."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        fan_in_fan_out=True,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated name
        return get_peft_model(model, cfg)


def last_positions(attention_mask: Tensor) -> Tensor:
    """``(B,)``: the index of each row's last non-pad token (right padding)."""
    return attention_mask.long().sum(1) - 1


class AnswerHead(nn.Module):
    """``(B, 4)``: the answer letters' next-token logits at the last non-pad token.

    Called with keyword arguments ``input_ids``, ``attention_mask`` (each ``(B, T)``) — how
    pushforward calls a mapping input — or with one mapping holding them (laplace-torch passes
    its whole dict batch; other keys are ignored). Its parameters are the wrapped LM's, named
    ``lm.*`` as in :class:`TokenHead`, so the two share one parameter layout.
    """

    def __init__(self, lm: nn.Module, answer_ids: list[int]) -> None:
        super().__init__()
        self.lm = lm
        self.register_buffer("answer_ids", torch.as_tensor(answer_ids), persistent=False)

    def forward(
        self, input_ids: Tensor | Mapping[str, Tensor], attention_mask: Tensor | None = None
    ) -> Tensor:
        if isinstance(input_ids, Mapping):
            input_ids, attention_mask = input_ids["input_ids"], input_ids["attention_mask"]
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return logits[rows, last_positions(attention_mask)][:, self.answer_ids]


class TokenHead(nn.Module):
    """``(B, T, V)``: the LM's next-token logits at every position (the full vocabulary)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


# --------------------------------------------------------------------------------------------
# 4. Training
# --------------------------------------------------------------------------------------------


def _schedule(opt: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.05):
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine down to 0.1x."""
    warm = max(1, int(warmup_frac * steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def pretrain(model: nn.Module, tokenizer, corpus: list[str], cfg: Config, device) -> dict:
    """Stage A: the next-token loss (all non-pad tokens) of the whole model on ``corpus``.
    Returns ``{"steps", "loss_first", "loss_last"}`` (losses averaged over 5% of the steps)."""
    torch.manual_seed(cfg.seed)
    enc = tokenizer(corpus, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(1)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.98)
    )
    sched = _schedule(opt, cfg.pretrain_steps)
    model.train()
    n = ids.shape[0]
    perm = torch.randperm(n)
    losses = []
    for step in range(cfg.pretrain_steps):
        j = perm[(torch.arange(cfg.pretrain_batch) + step * cfg.pretrain_batch) % n]
        T = int(lengths[j].max())
        x, m = ids[j, :T].to(device), mask[j, :T].to(device)
        loss = model(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    k = max(1, len(losses) // 20)
    return {
        "steps": len(losses),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
    }


def finetune_lora(head: AnswerHead, enc: dict[str, Tensor], cfg: Config, device) -> dict:
    """Stage B: train the parameters that require grad (the LoRA matrices) with the
    cross-entropy of the four answer-letter logits, reshuffling every epoch.
    Returns ``{"steps", "loss_first", "loss_last", "n_trainable"}``."""
    torch.manual_seed(cfg.seed)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.0)
    sched = _schedule(opt, cfg.finetune_steps)
    ids, mask, y = enc["input_ids"], enc["attention_mask"], enc["labels"]
    lengths = mask.sum(1)
    n, bs = ids.shape[0], cfg.finetune_batch
    head.train()
    perm = torch.randperm(n)
    losses = []
    for step in range(cfg.finetune_steps):
        if step and (step * bs) // n != ((step - 1) * bs) // n:
            perm = torch.randperm(n)
        j = perm[(torch.arange(bs) + step * bs) % n]
        T = int(lengths[j].max())
        logits = head(input_ids=ids[j, :T].to(device), attention_mask=mask[j, :T].to(device))
        loss = F.cross_entropy(logits, y[j].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    head.eval()
    k = max(1, len(losses) // 20)
    return {
        "steps": len(losses),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "n_trainable": sum(p.numel() for p in params),
    }


@torch.no_grad()
def map_probs(head: AnswerHead, data: list[dict]) -> Tensor:
    """``(N, 4)`` float64: the MAP softmax over the answer letters."""
    return torch.cat([torch.softmax(head(**inputs_of(b)).double(), -1).cpu() for b in data])


# --------------------------------------------------------------------------------------------
# 5. Metrics and reliability diagram
# --------------------------------------------------------------------------------------------


def _bins(probs: Tensor, labels: Tensor, n_bins: int) -> list[tuple[int, float, float]]:
    """Per equal-width confidence bin on (0, 1]: ``(count, mean confidence, accuracy)``."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    out = []
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        n = int(m.sum())
        out.append((n, float(conf[m].mean()) if n else 0.0, float(correct[m].mean()) if n else 0.0))
    return out


def metrics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``accuracy``, ``NLL`` (mean ``-log p(y)``), ``ECE`` (top label, ``n_bins`` equal-width
    bins), ``Brier`` (``sum_k (p_k - 1[y=k])^2``, mean; 0..2) and the mean confidence, for
    ``probs (N, C)`` and ``labels (N,)``."""
    probs, labels = probs.double().cpu(), labels.cpu()
    N = labels.shape[0]
    onehot = F.one_hot(labels, probs.shape[1]).double()
    return {
        "accuracy": float((probs.argmax(1) == labels).double().mean()),
        "NLL": float(-probs[torch.arange(N), labels].clamp_min(1e-12).log().mean()),
        "ECE": sum(n / N * abs(c - a) for n, c, a in _bins(probs, labels, n_bins)),
        "Brier": float(((probs - onehot) ** 2).sum(1).mean()),
        "confidence": float(probs.max(1).values.mean()),
    }


def reliability_diagram(
    panels: dict[str, dict[str, tuple[Tensor, Tensor]]], path: Path, n_bins: int = 15
) -> None:
    """One row per method, one column per split: accuracy per confidence bin against the
    diagonal. ``panels[method][split] = (probs (N, C), labels (N,))``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(panels)
    splits = list(panels[methods[0]])
    fig, axes = plt.subplots(
        len(methods),
        len(splits),
        figsize=(3.0 * len(splits), 2.9 * len(methods)),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    centers = (torch.arange(n_bins) + 0.5) / n_bins
    for row, method in zip(axes, methods, strict=True):
        for ax, split in zip(row, splits, strict=True):
            probs, labels = panels[method][split]
            bins = _bins(probs.double(), labels, n_bins)
            accs = [a for _, _, a in bins]
            gaps = [c - a if n else 0.0 for n, c, a in bins]
            ax.bar(centers, accs, width=1 / n_bins, edgecolor="k", color="tab:blue", alpha=0.8)
            ax.bar(centers, gaps, bottom=accs, width=1 / n_bins, color="tab:red", alpha=0.3)
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            m = metrics(probs, labels, n_bins)
            ax.set_title(
                f"{method} / {split}\nacc {m['accuracy']:.2f}  ECE {m['ECE']:.3f}", fontsize=8
            )
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        row[0].set_ylabel("accuracy")
    for ax in axes[-1]:
        ax.set_xlabel("confidence")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# 6. Time and peak memory of each step
# --------------------------------------------------------------------------------------------


def _rss_kb(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Meter:
    """Wall-clock time, CPU time and peak memory of named steps.

    The peak is above the memory right before the step: on CPU the resident set's high-water
    mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step) minus ``VmRSS``
    before it; on a GPU ``max_memory_allocated`` minus ``memory_allocated`` before it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[dict[str, Any]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            before = (_rss_kb("VmRSS") or 0) * 1024
        t, c = time.perf_counter(), time.process_time()
        yield
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = (_rss_kb("VmHWM") or 0) * 1024
        self.steps.append(
            {
                "step": name,
                "seconds": time.perf_counter() - t,
                "cpu_seconds": time.process_time() - c,
                "peak_MB_above_start": max(0, peak - before) / 2**20,
                "peak_MB": peak / 2**20,
            }
        )
        s = self.steps[-1]
        print(
            f"  [{s['seconds']:7.1f} s, peak +{s['peak_MB_above_start']:6.0f} MB] {name}",
            flush=True,
        )


# --------------------------------------------------------------------------------------------
# 7. Laplace with pushforward
# --------------------------------------------------------------------------------------------


def laplace_probs(
    model: nn.Module,
    data: list[dict],
    S: pf.CovarianceOperator,
    link: str,
    n_samples: int = 1000,
    seed: int = 0,
) -> Tensor:
    """``(N, C)`` float64: the linearized predictive over the batches. ``link="probit"``:
    :func:`pushforward.predictive`; ``link="mc"``: the mean softmax of ``n_samples`` logit vectors
    drawn from the Gaussian ``N(f, J S J^T)`` of :func:`pushforward.functional_covariance` (the
    ``C x C`` covariance of the few outputs is exact and cheap; laplace-torch's
    ``pred_type="glm", link_approx="mc"``)."""
    if link == "probit":
        return torch.cat(
            [pf.predictive(model, inputs_of(b), S, link="probit").double().cpu() for b in data]
        )
    generator = torch.Generator().manual_seed(seed)
    out = []
    for b in data:
        f, C = pf.functional_covariance(model, inputs_of(b), S)  # (B, C), (B, C, C)
        f, C = f.double().cpu(), C.double().cpu()
        lam, Q = torch.linalg.eigh(C)
        root = Q * lam.clamp_min(0).sqrt().unsqueeze(-2)  # C = root root^T
        z = torch.randn(n_samples, *f.shape, generator=generator, dtype=f.dtype)
        logits = f + torch.einsum("bij,sbj->sbi", root, z)
        out.append(logits.softmax(-1).mean(0))
    return torch.cat(out)


def token_entropy(
    token_head: TokenHead,
    data: list[dict],
    S: pf.CovarianceOperator | None,
    n_samples: int,
    seed: int = 0,
) -> dict[str, float]:
    """Mean per-token predictive entropy (nats) over the full vocabulary: over every non-pad
    position (``all tokens``) and at the answer position (the token before the letter).
    ``S=None`` gives the MAP softmax's; otherwise ``pf.predictive(link="mc")`` of the
    ``(B, T, V)`` outputs."""
    generator = None if S is None else torch.Generator(device=S.device).manual_seed(seed)
    total = at_answer = 0.0
    tokens = rows = 0
    for b in data:
        if S is None:
            with torch.no_grad():
                p = torch.softmax(token_head(**inputs_of(b)).double(), -1)
        else:
            p = pf.predictive(
                token_head, inputs_of(b), S, link="mc", n_samples=n_samples, generator=generator
            ).double()
        h = -(p * p.clamp_min(1e-300).log()).sum(-1)  # (B, T)
        mask = b["attention_mask"].bool()
        total += float(h[mask].sum())
        tokens += int(mask.sum())
        answer = last_positions(b["attention_mask"]) - 1  # predicts the letter
        at_answer += float(h[torch.arange(h.shape[0], device=h.device), answer].sum())
        rows += h.shape[0]
    return {"all tokens": total / tokens, "answer token": at_answer / rows}


# --------------------------------------------------------------------------------------------
# 8. The job
# --------------------------------------------------------------------------------------------

EVAL_SPLITS = ("test_id", "test_3digit", "test_sum")
#: The table's methods: (name, posterior key, prior-precision key, link).
METHODS = (
    ("MAP", None, None, None),
    ("Laplace-diag", "diag", "marglik", "probit"),
    ("Laplace-KFAC", "kfac", "marglik", "probit"),
    ("Laplace-diag (val-grid δ)", "diag", "grid", "probit"),
    ("Laplace-KFAC (val-grid δ)", "kfac", "grid", "probit"),
    ("Laplace-KFAC (MC link)", "kfac", "marglik", "mc"),
    ("Laplace-KFAC (all-token MC-GGN)", "kfac-all-tokens", "marglik", "probit"),
)
COLUMNS = ("accuracy", "NLL", "ECE", "Brier")
#: The reliability diagram's rows.
METHODS_IN_PLOT = ("MAP", "Laplace-diag", "Laplace-KFAC")


def run(cfg: Config, out: Path, device: str = "cpu", laplace_torch: bool = True) -> dict:
    """The whole job (see the module docstring); writes ``results.md``, ``results.json`` and
    ``reliability.png`` to ``out`` and returns what ``results.json`` holds."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PushforwardFallbackWarning)
        return _run(cfg, out, torch.device(device), laplace_torch)


def _run(cfg: Config, out: Path, device: torch.device, laplace_torch: bool) -> dict:
    meter = Meter(device)
    t_start = time.perf_counter()
    print(f"Laplace-LoRA, size {cfg.size}, {torch.get_num_threads()} thread(s), {device}")

    with meter.step("data: generate, tokenizer, encode"):
        tok = build_tokenizer()
        aid = answer_token_ids(tok)
        n = {"train": cfg.n_train, "val": cfg.n_val} | dict.fromkeys(EVAL_SPLITS, cfg.n_test)
        items = {s: make_split(s, k, cfg.seed, cfg.p_near) for s, k in n.items()}
        enc = {s: encode_items(tok, its) for s, its in items.items()}
        data = {s: batches(enc[s], cfg.eval_batch, device) for s in ("val", *EVAL_SPLITS)}
        fit_data = batches(enc["train"], cfg.curvature_batch, device)
        token_fit = batches(
            encode_answered(tok, items["train"][: cfg.token_fit_items]), cfg.curvature_batch, device
        )
        free_text = {
            s: batches(encode_answered(tok, items[s][: cfg.entropy_items]), cfg.eval_batch, device)
            for s in EVAL_SPLITS
        }
        corpus = make_pretrain_corpus(cfg)

    with meter.step("pretrain GPT-2 (all weights, next-token loss)"):
        lm = build_model(tok, cfg.size, cfg.seed).to(device)
        stats_a = pretrain(lm, tok, corpus, cfg, device)
    with meter.step("LoRA fine-tune (answer-letter loss)"):
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_target)
        head = AnswerHead(lm, aid).to(device).eval()
        stats_b = finetune_lora(head, enc["train"], cfg, device)
    token_head = TokenHead(lm).eval()
    labels = {s: enc[s]["labels"] for s in EVAL_SPLITS}
    with meter.step("MAP predict"):
        probs = {"MAP": {s: map_probs(head, data[s]) for s in EVAL_SPLITS}}

    # -- fit: curvature over the LoRA parameters (the parameters that require grad)
    ggn = GGN(head, fit_data, "classification")
    curv = {}
    with meter.step("fit: GGN diagonal (last token, 4 answer logits, exact)"):
        curv["diag"] = ggn.diagonal()
    with meter.step("fit: GGN K-FAC (last token, 4 answer logits, exact)"):
        curv["kfac"] = ggn.kfac()
    ggn_tokens = GGN(token_head, token_fit, CrossEntropy(), mc_samples=1, seed=cfg.seed)
    with meter.step(
        f"fit: MC-GGN K-FAC (all tokens, vocabulary {len(tok)}, {cfg.token_fit_items} items)"
    ):
        curv["kfac-all-tokens"] = ggn_tokens.kfac()
    fits = {"diag": ggn, "kfac": ggn, "kfac-all-tokens": ggn_tokens}

    # -- prior precision
    delta: dict[str, dict[str, Tensor]] = {"marglik": {}, "grid": {}}
    marglik: dict[str, float] = {}
    with meter.step("prior precision: marginal likelihood (3 posteriors)"):
        for key, H in curv.items():
            delta["marglik"][key] = optimize_prior_precision(fits[key], H, method="marglik")
            marglik[key] = float(log_marginal_likelihood(fits[key], H, delta["marglik"][key]))
    grid = torch.tensor(cfg.grid, dtype=torch.float64)
    with meter.step(f"prior precision: validation-NLL grid ({len(grid)} values, 2 posteriors)"):
        for key in ("diag", "kfac"):
            delta["grid"][key] = optimize_prior_precision(
                ggn, curv[key], method="gridsearch", val_data=data["val"], grid=grid
            )
    posterior = {
        (key, how): laplace_posterior(curv[key], d[key], layout=fits[key])
        for how, d in delta.items()
        for key in d
    }

    # -- predict the answer letter
    for name, key, how, link in METHODS[1:]:
        with meter.step(f"predict: {name} ({link}, 3 x {cfg.n_test} items)"):
            probs[name] = {
                s: laplace_probs(head, data[s], posterior[key, how], link, cfg.mc_samples)
                for s in EVAL_SPLITS
            }
    table = {m: {s: metrics(probs[m][s], labels[s]) for s in EVAL_SPLITS} for m in probs}

    # -- per-token full-vocabulary predictive entropy on the items' text
    entropy = {"MAP": {s: token_entropy(token_head, free_text[s], None, 0) for s in EVAL_SPLITS}}
    for name, key in (("Laplace-KFAC", "kfac"), ("Laplace-KFAC (all-token)", "kfac-all-tokens")):
        with meter.step(
            f"predict: per-token entropy, {name}, full vocabulary, MC {cfg.entropy_samples}"
        ):
            entropy[name] = {
                s: token_entropy(
                    token_head, free_text[s], posterior[key, "marglik"], cfg.entropy_samples
                )
                for s in EVAL_SPLITS
            }

    comparison = (
        compare_laplace_torch(cfg, head, enc, posterior, curv, meter) if laplace_torch else None
    )

    reliability_diagram(
        {m: {s: (probs[m][s], labels[s]) for s in EVAL_SPLITS} for m in METHODS_IN_PLOT},
        out / "reliability.png",
    )
    results = {
        "config": asdict(cfg),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "vocabulary": len(tok),
        "model_parameters": sum(p.numel() for p in lm.parameters()),
        "lora_parameters": stats_b["n_trainable"],
        "pretrain": stats_a,
        "finetune": stats_b,
        "table": table,
        "prior_precision": {h: {k: d.tolist() for k, d in v.items()} for h, v in delta.items()},
        "log_marginal_likelihood": marglik,
        "entropy": entropy,
        "laplace_torch": comparison,
        "steps": meter.steps,
        "total_seconds": time.perf_counter() - t_start,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    (out / "results.md").write_text(text)
    print(text)
    return results


# --------------------------------------------------------------------------------------------
# 9. The same job through laplace-torch
# --------------------------------------------------------------------------------------------


def compare_laplace_torch(
    cfg: Config,
    head: AnswerHead,
    enc: dict[str, dict[str, Tensor]],
    posterior: dict,
    curv: dict,
    meter: Meter,
) -> dict:
    """laplace-torch's K-FAC Laplace on the same LoRA model and training items: fit, marginal
    likelihood, GLM probit predictive on the first ``cfg.laplace_torch_items`` items of each test
    split (in batches of ``cfg.laplace_torch_batch``); against pushforward: the same posterior
    (``pf.from_laplace``) through ``pf.predictive``, and pushforward's own K-FAC fit with
    laplace-torch's prior precision."""
    from laplace import Laplace

    device = next(head.parameters()).device
    loader = torch.utils.data.DataLoader(MCDataset(enc["train"]), batch_size=cfg.curvature_batch)
    k = cfg.laplace_torch_items
    subset = {s: {key: v[:k] for key, v in enc[s].items()} for s in EVAL_SPLITS}
    with meter.step("laplace-torch: KronLaplace.fit (curvlinops K-FAC)"):
        la = Laplace(
            head,
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            dict_key_x="input_ids",
            dict_key_y="labels",
        )
        la.fit(loader)
    with meter.step("laplace-torch: optimize_prior_precision (marglik)"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "By default `link_approx` is `probit`", UserWarning)
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    lt = {}
    with (
        meter.step(f"laplace-torch: GLM probit predictive (3 x {k} items)"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # vmap's fallback for SDPA's backward
        for s in EVAL_SPLITS:
            parts = []
            for b in batches(subset[s], cfg.laplace_torch_batch, device):
                parts.append(la(b, pred_type="glm", link_approx="probit").detach().double().cpu())
            lt[s] = torch.cat(parts)
    fm, S_lt = pf.from_laplace(la)
    sub_data = {s: batches(subset[s], cfg.eval_batch, device) for s in EVAL_SPLITS}
    with meter.step(f"pushforward: probit predictive of laplace-torch's posterior (3 x {k})"):
        same = {s: laplace_probs(fm, sub_data[s], S_lt, "probit") for s in EVAL_SPLITS}
    prior = la.prior_precision.detach().reshape(())
    ours = laplace_posterior(curv["kfac"], prior.double(), layout=curv["kfac"])
    own = {s: laplace_probs(head, sub_data[s], ours, "probit") for s in EVAL_SPLITS}
    cat = torch.cat
    mine = cat(
        [
            laplace_probs(head, sub_data[s], posterior["kfac", "marglik"], "probit")
            for s in EVAL_SPLITS
        ]
    )
    lt_all, y = cat([lt[s] for s in EVAL_SPLITS]), cat([subset[s]["labels"] for s in EVAL_SPLITS])
    return {
        "items": 3 * k,
        "prior_precision": float(prior),
        "max_abs_diff_same_posterior": float(
            (cat([same[s] for s in EVAL_SPLITS]) - lt_all).abs().max()
        ),
        "max_abs_diff_own_kfac_same_prior": float(
            (cat([own[s] for s in EVAL_SPLITS]) - lt_all).abs().max()
        ),
        "max_abs_diff_own_kfac_own_prior": float((mine - lt_all).abs().max()),
        "metrics_laplace_torch": metrics(lt_all, y),
        "metrics_pushforward": metrics(mine, y),
    }


# --------------------------------------------------------------------------------------------
# 10. Report and command line
# --------------------------------------------------------------------------------------------


def report(r: dict) -> str:
    """The markdown of ``results.md``: calibration table, entropies, laplace-torch, steps."""
    cfg = r["config"]
    lines = [
        f"## Laplace-LoRA: GPT-2 {cfg['size']} ({r['model_parameters']:,} parameters, "
        f"{r['lora_parameters']:,} LoRA), vocabulary {r['vocabulary']}",
        "",
        f"Test sets of {cfg['n_test']} items; {cfg['n_train']} training items; "
        f"{r['threads']} thread(s) on {r['device']}; total {r['total_seconds']:.0f} s.",
        "",
        "| method | split | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for m, per in r["table"].items():
        for s, v in per.items():
            lines.append(f"| {m} | {s} | " + " | ".join(f"{v[c]:.3f}" for c in COLUMNS) + " |")
    lines += [
        "",
        "Prior precision δ: "
        + "; ".join(
            f"{how} {key} {_fmt(d)}"
            for how, v in r["prior_precision"].items()
            for key, d in v.items()
        ),
        "",
    ]
    lines += [
        "Per-token predictive entropy (nats) over the full vocabulary on the answered items' text "
        f"(first {cfg['entropy_items']} items per split; Laplace: MC, {cfg['entropy_samples']} "
        "samples), all tokens / the token that predicts the answer letter:",
        "",
        "| method | " + " | ".join(EVAL_SPLITS) + " |",
        "|---|" + "---:|" * len(EVAL_SPLITS),
    ]
    for m, per in r["entropy"].items():
        cells = [f"{per[s]['all tokens']:.3f} / {per[s]['answer token']:.3f}" for s in EVAL_SPLITS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    c = r["laplace_torch"]
    if c is not None:
        lines += [
            "",
            f"laplace-torch (KronLaplace, marglik δ = {c['prior_precision']:.3g}) on the first "
            f"{c['items'] // 3} items of each test split, max |Δp| against its GLM probit "
            f"predictive: pushforward on laplace-torch's posterior {c['max_abs_diff_same_posterior']:.1e}; "
            f"pushforward's own K-FAC with laplace-torch's δ {c['max_abs_diff_own_kfac_same_prior']:.1e}; "
            f"with its own δ {c['max_abs_diff_own_kfac_own_prior']:.1e}. Metrics on those items, "
            "laplace-torch / pushforward: "
            + ", ".join(
                f"{k} {c['metrics_laplace_torch'][k]:.3f} / {c['metrics_pushforward'][k]:.3f}"
                for k in COLUMNS
            ),
        ]
    lines += [
        "",
        "| step | time (s) | CPU (s) | peak memory above start (MB) |",
        "|---|---:|---:|---:|",
    ]
    for s in r["steps"]:
        lines.append(
            f"| {s['step']} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | "
            f"{s['peak_MB_above_start']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(d: float | list) -> str:
    return f"{d:.3g}" if isinstance(d, float) else "[" + ", ".join(f"{v:.3g}" for v in d) + "]"


def get_config(name: str = "default", **overrides: Any) -> Config:
    """Preset ``name`` (``tiny``, ``default``, ``gpt2-small``) with field overrides."""
    return replace(CONFIGS[name], **overrides)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="default", choices=sorted(CONFIGS))
    p.add_argument("--tiny", action="store_true", help="the smoke configuration (--size tiny)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-laplace-torch", action="store_true", help="skip the comparison")
    p.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    p.add_argument("--readme", type=Path, default=None, help="also write the results there")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = get_config("tiny" if args.tiny else args.size, seed=args.seed)
    out = args.out or (DEFAULT_OUT if cfg.size == "default" else DEFAULT_OUT / cfg.size)
    results = run(cfg, out, args.device, laplace_torch=not args.no_laplace_torch)
    if args.readme is not None:
        write_readme(args.readme, (out / "results.md").read_text())
    return results


README_START = (
    "<!-- laplace-lora results: generated by examples/laplace_lora.py --readme README.md -->"
)
README_END = "<!-- end of laplace-lora results -->"


def write_readme(path: Path, results_md: str) -> None:
    """Put ``results_md`` between the README's Laplace-LoRA markers (its heading as bold text)."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} lacks the markers {README_START!r} ... {README_END!r}")
    title, _, body = results_md.partition("\n")
    block = f"**{title.removeprefix('## ')}**\n{body}".strip()
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    path.write_text(f"{before}{README_START}\n{block}\n{README_END}{after}")


if __name__ == "__main__":
    main()
