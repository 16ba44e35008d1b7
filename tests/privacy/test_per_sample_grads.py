"""Opacus per-sample gradients of the PEFT LoRA model equal per-example autograd.

Upstream reported silently corrupted LoRA per-sample gradients with some opacus/peft
versions (opacus issue 820); this pins that the versions we ship are correct, in both
Opacus modes ``privacy.dp`` uses (expanded weights on the CPU, hooks otherwise), and that
DP-SGD trains to the same tensors in either.
"""

import pytest
import torch

from fedadapt.imaging.backbones import ModelSpec, build_model, load_trainable
from tests.grad_check import assert_grad_samples_match_autograd, randomise_lora_b


SMALL = ModelSpec(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2,
                  num_heads=2, num_classes=3, lora_rank=4)


def test_grad_sample_matches_per_example_autograd():
    # Checked in hooks mode and in expanded-weights mode, the one privacy.dp trains with.
    torch.manual_seed(0)
    model = build_model(SMALL)
    randomise_lora_b(model)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    # Frozen backbone tensors get no per-sample gradients at all (checked there too).
    trainable = assert_grad_samples_match_autograd(model, x, y)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)


def test_make_private_picks_expanded_weights_for_linear_adapters_on_cpu():
    from opacus.grad_sample import GradSampleModule, GradSampleModuleExpandedWeights

    from fedadapt.privacy.dp import DPRequest, grad_sample_mode, make_private

    model = build_model(SMALL)
    assert grad_sample_mode(model) == "ew"  # LoRA A/B and the head: all nn.Linear
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.randn(8, 1, 16, 16), torch.zeros(8, dtype=torch.long)), batch_size=4)
    net, _, _ = make_private(model, opt, loader, request=DPRequest(1.0, 1.0),
                             generator=torch.Generator().manual_seed(0))
    assert type(net) is GradSampleModuleExpandedWeights
    net._close()
    # A trainable tensor outside nn.Linear (here a LayerNorm made trainable): hooks.
    model.base_model.model.encoder.norm.weight.requires_grad_(True)
    assert grad_sample_mode(model) == "hooks"
    net, _, _ = make_private(model, opt, loader, request=DPRequest(1.0, 1.0),
                             generator=torch.Generator().manual_seed(0))
    assert type(net) is GradSampleModule
    net._close()
    with pytest.raises(ValueError, match="mode 'ghost' is not one of"):
        make_private(model, opt, loader, request=DPRequest(1.0, 1.0),
                     generator=torch.Generator().manual_seed(0), mode="ghost")


def test_dp_sgd_is_the_same_with_expanded_weights_and_hooks():
    # Same seed → same Poisson batches (empty ones included: q = 1/4 on 4 records) and
    # the same noise; the clipped sums agree to float rounding, so the trained tensors do.
    from functools import partial

    from fedadapt.client.train import train
    from fedadapt.imaging.backbones import trainable_state
    from fedadapt.privacy.dp import DPRequest, make_private

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 16, 16, generator=g),
                                          torch.tensor([0, 1, 2, 0]))
    start = build_model(SMALL)
    randomise_lora_b(start)
    state = trainable_state(start)
    out = {}
    for mode in ("ew", "hooks"):
        model = build_model(SMALL)
        load_trainable(model, state)
        res = train(model, data, epochs=3, lr=0.5, batch_size=1, device=torch.device("cpu"),
                    seed=5, dp=DPRequest(noise_multiplier=0.5, max_grad_norm=0.1),
                    wiring=partial(make_private, mode=mode))
        assert res.steps == 12
        out[mode] = trainable_state(model)
    assert any(not torch.equal(out["ew"][n], state[n]) for n in state)
    for n in state:
        torch.testing.assert_close(out["ew"][n], out["hooks"][n], rtol=1e-5, atol=1e-6)
