"""Opacus per-sample gradients of the PEFT LoRA model equal per-example autograd.

Upstream reported silently corrupted LoRA per-sample gradients with some opacus/peft
versions (opacus issue 820); this pins that the versions we ship are correct.
"""

import torch
from opacus import GradSampleModule

from fedadapt.imaging.backbones import ModelSpec, build_model


def test_grad_sample_matches_per_example_autograd():
    torch.manual_seed(0)
    spec = ModelSpec(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2,
                     num_heads=2, num_classes=3, lora_rank=4)
    model = build_model(spec)
    # Non-zero B so that gradients reach lora_A too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    expected = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()
                         if p.requires_grad})
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    loss_fn(gsm(x), y).backward()
    trainable = [(n, p) for n, p in gsm._module.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n, _ in trainable) and any("lora_B" in n for n, _ in trainable)
    for name, p in trainable:
        assert p.grad_sample.shape[0] == len(y), name
        for i in range(len(y)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    # Frozen backbone tensors get no per-sample gradients at all.
    frozen = [p for p in gsm._module.parameters() if not p.requires_grad]
    assert frozen and all(getattr(p, "grad_sample", None) is None for p in frozen)
