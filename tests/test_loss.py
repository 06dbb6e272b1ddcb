"""The loss without the whole logits (model/loss.py) equals the plain head + cross-entropy: the
loss and the gradients of the hidden states and of the head, with ignored labels, in fp32 and
bf16, in chunks that do not divide the tokens; and through ArgonneModel(labels=...)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from argonne_ds.config import ArgonneConfig
from argonne_ds.model.loss import IGNORE_INDEX, linear_cross_entropy
from argonne_ds.model.model import ArgonneModel, causal_lm_loss


def _plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(F.linear(hidden, weight), labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_loss_and_gradients_equal_the_plain_path(dtype: torch.dtype, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 32, generator=g).to(dtype)
    weight = (torch.randn(301, 32, generator=g) * 0.2).to(dtype)
    labels = torch.randint(0, 301, (3, 50), generator=g)
    labels[0, :9] = IGNORE_INDEX  # ignored positions count nowhere
    grads = []
    for fn in (_plain, lambda h, w, y: linear_cross_entropy(h, w, y, chunk)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    (l0, h0, w0), (l1, h1, w1) = grads
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2,
                                                                        "atol": 2e-3}
    torch.testing.assert_close(l1, l0, **tol)
    torch.testing.assert_close(h1.float(), h0.float(), **tol)
    torch.testing.assert_close(w1.float(), w0.float(), **tol)
    assert h1.dtype == w1.dtype == dtype


def test_the_model_gives_the_loss_with_labels_and_the_logits_without() -> None:
    config = ArgonneConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           intermediate_size=64, max_position_embeddings=64)
    model = ArgonneModel(config)
    x = torch.randint(0, 300, (2, 40))
    y = torch.roll(x, -1, dims=1)
    out = model(x, labels=y)
    assert out.logits is None  # never materialised for the loss
    out.loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x).logits
    assert logits.shape == (2, 40, 300)
    plain = causal_lm_loss(logits, y)
    plain.backward()
    torch.testing.assert_close(out.loss, plain, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_liger_is_called_with_its_argument_order_where_usable(monkeypatch) -> None:
    """liger-kernel runs only on CUDA (not here): its call is checked against a stand-in with
    the signature of `LigerFusedLinearCrossEntropyLoss.forward(lin_weight, _input, target)`."""
    import torch.nn.functional as F

    from argonne_ds.model import loss as loss_module

    calls = []

    class FakeLiger:
        def __init__(self, ignore_index: int) -> None:
            self.ignore_index = ignore_index

        def __call__(self, lin_weight, _input, target):
            calls.append((lin_weight.shape, _input.shape, target.shape, self.ignore_index))
            return F.cross_entropy(_input @ lin_weight.t(), target, ignore_index=-100)

    h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
    y = torch.randint(0, 11, (2, 5))
    assert not loss_module.liger_usable(h)  # CPU tensors never take it
    monkeypatch.setattr(loss_module, "_LigerLoss", FakeLiger)
    monkeypatch.setattr(loss_module, "liger_usable", lambda hidden: True)
    got = loss_module.linear_cross_entropy(h, w, y)
    assert calls == [((11, 8), (10, 8), (10,), -100)]
    monkeypatch.setattr(loss_module, "liger_usable", lambda hidden: False)
    assert torch.allclose(got, loss_module.linear_cross_entropy(h, w, y), atol=1e-6)
