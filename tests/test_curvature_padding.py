"""Curvature over padded Hugging Face batches stays on the vmap-over-examples path (issue 15).

Hugging Face's mask helpers ask ``if padding_mask.all():`` in Python. The curvature sweep runs
its per-example ``vmap`` inside a ``torch.func.vjp``, where the value read sees a tensor batched
over the examples *around* autograd's wrapper: it used to fail there and fall back to a loop over
examples with a :class:`~pushforward.PushforwardFallbackWarning`. Both tests fail on the code
before the fix.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch.func import vjp

import pushforward as pf
from pushforward.core.branching import vmap_examples
from pushforward.curvature import GGN, CrossEntropy

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_value_read_under_vmap_inside_a_grad_transform() -> None:
    def one(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = x * w  # batched over the examples, wrapped by vjp's grad level inside
        return h * 2 if bool((h > 0).all()) else -h

    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [2.0, 2.0]])
    w = torch.ones(3, 2, requires_grad=True)
    out, pull = vjp(lambda w_: vmap_examples(one, [x, w_]), w)
    want = torch.stack([one(x[i], w[i]) for i in range(3)])
    assert torch.equal(out, want)
    (grad,) = pull(torch.ones_like(out))
    assert torch.equal(grad, torch.tensor([[2.0, 4.0], [1.0, -3.0], [4.0, 4.0]]))


class _Last(torch.nn.Module):
    """``(B, V)``: the logits at each row's last non-pad token."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        rows = torch.arange(input_ids.shape[0])
        return logits[rows, attention_mask.sum(1) - 1]


def _lora_gpt2() -> torch.nn.Module:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora).double().eval()
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make the GGN generic
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("target", ["last", "tokens"])
def test_ggn_on_padded_batches_needs_no_fallback(target: str) -> None:
    lm = _lora_gpt2()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 11, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padded and unpadded rows in one batch
    mask[3, 2:] = 0
    if target == "last":
        model, likelihood = _Last(lm), "classification"
        y = torch.randint(0, 11, (4,), generator=g)
    else:
        model, likelihood = lm, CrossEntropy()
        y = torch.cat([ids[:, 1:], torch.zeros(4, 1, dtype=torch.long)], 1)
        y = y.masked_fill(torch.cat([mask[:, 1:], mask[:, :1] * 0], 1) == 0, -100)
    data = [{"input_ids": ids, "attention_mask": mask, "labels": y}]
    ggn = GGN(model, data, likelihood)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PushforwardFallbackWarning)
        diag = ggn.diagonal()
        kfac = ggn.kfac()
    dense = ggn.matmat(torch.eye(ggn.num_params, dtype=torch.float64))  # matrix-free products
    torch.testing.assert_close(diag, dense.diagonal(), rtol=1e-10, atol=1e-12)
    assert kfac.to_dense().shape == dense.shape
    assert torch.isfinite(kfac.to_dense()).all()
