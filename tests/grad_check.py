"""Opacus per-sample gradients against per-example autograd, for any model (shared by the
backbone tests; upstream once corrupted LoRA per-sample gradients, opacus issue 820).

Each model is checked in Opacus' ``"hooks"`` mode and in the mode ``privacy.dp`` trains
it with (``grad_sample_mode``: expanded weights for all-``nn.Linear`` trainable tensors
on the CPU), so the path DP-SGD really takes is the one pinned."""

from __future__ import annotations

import torch
from opacus.grad_sample import get_gsm_class
from torch import nn

from fedadapt.privacy.dp import grad_sample_mode


def randomise_lora_b(model: nn.Module, std: float = 0.1) -> None:
    """Non-zero LoRA B (PEFT starts it at 0), so that gradients reach lora_A too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def assert_grad_samples_match_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                                       train_mode: bool = False) -> list[str]:
    """Check every trainable tensor's Opacus ``grad_sample`` equals the gradient of that
    example alone, and that frozen tensors get none, in ``"hooks"`` mode and in the mode
    ``privacy.dp.make_private`` picks for ``model``.

    Returns:
        The names of the trainable tensors checked.
    """
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    expected = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()
                         if p.requires_grad})
    modes, training = dict.fromkeys(["hooks", grad_sample_mode(model)]), model.training
    for mode in modes:
        model.train(training)
        gsm = get_gsm_class(mode)(model, loss_reduction="sum")
        gsm.zero_grad()
        if train_mode:
            model.train()
        loss_fn(gsm(x), y).backward()
        trainable = [(n, p) for n, p in gsm._module.named_parameters() if p.requires_grad]
        for name, p in trainable:
            assert p.grad_sample.shape[0] == len(y), (mode, name)
            for i in range(len(y)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4,
                                           atol=1e-6, msg=lambda m: f"{mode} {name}: {m}")
        frozen = [p for p in gsm._module.parameters() if not p.requires_grad]
        assert frozen and all(getattr(p, "grad_sample", None) is None for p in frozen), mode
        gsm._close()
    return [n for n, _ in trainable]
