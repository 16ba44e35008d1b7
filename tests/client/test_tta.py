"""Test-time adaptation (client/tta.py) on a tiny ViT + LoRA built from a spec."""

import copy
import math

import pytest
import torch

from fedadapt.client.tta import SAR, TTAConfig, adapt_stream, entropy, norm_parameters, sar_loss
from fedadapt.imaging.backbones import ModelSpec, build_model
from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, make_site_data

SPEC = ModelSpec(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=4,
                 num_heads=2, num_classes=3, lora_rank=2, backbone_weights="random")


@pytest.fixture(scope="module")
def images():
    data, _ = make_site_data(SiteSpec("shifted", 64, 4, ScannerShift(1.0, 2.5, 0.15, 1.5, 0.35)),
                             image_size=16, num_classes=3, seed=0, site_index=7)
    return data.tensors[0]


@pytest.fixture(scope="module")
def built():
    return build_model(SPEC)


def _model(built):
    model = copy.deepcopy(built)
    with torch.no_grad():  # a confident head, so that some samples pass the entropy filter
        for n, p in model.named_parameters():
            if "head" in n and "modules_to_save" in n and n.endswith("weight"):
                p.mul_(20.0)
    return model


def test_entropy_reference_values():
    assert entropy(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    assert entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_only_early_and_middle_block_norms_adapt(built):
    model = _model(built)
    params = norm_parameters(model, 0.75)
    names = sorted(params)
    assert names and all(".blocks." in n and (".norm1." in n or ".norm2." in n
                                              or "norm_cross_attn" in n) for n in names)
    assert {int(n.split(".blocks.")[1].split(".")[0]) for n in names} == {0, 1, 2}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)  # LoRA, head, final norm and the rest: frozen
    assert not any("lora_" in n or "head" in n or n.endswith("encoder.norm.weight")
                   for n in trainable)


def test_entropy_filter_and_class_balance():
    confident = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    uncertain = torch.zeros(2, 3)
    margin = 0.4 * math.log(3)
    loss, keep = sar_loss(torch.cat([confident, uncertain]), margin=margin, balance_weight=0.0)
    assert keep.tolist() == [True, True, False, False]
    assert loss.item() == pytest.approx(entropy(confident).mean().item())
    none, keep = sar_loss(uncertain, margin=margin, balance_weight=1.0)
    assert none is None and not keep.any()
    # the balance term is the negative entropy of the mean prediction: lowest when balanced
    one_class = torch.tensor([[8.0, 0.0, 0.0], [8.0, 0.0, 0.0]])
    lb, _ = sar_loss(confident, margin=margin, balance_weight=1.0)
    lo, _ = sar_loss(one_class, margin=margin, balance_weight=1.0)
    assert lb.item() < lo.item()


def test_adaptation_changes_only_norms_and_never_reads_labels(built, images):
    model = _model(built)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits, sar = adapt_stream(model, torch.split(images, 16), num_classes=3,
                               cfg=TTAConfig(lr=0.05, reset_threshold=0.0))
    assert logits.shape == (64, 3) and sar.stats.updates >= 1 and sar.stats.resets == 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(sar.params)
    assert set(sar.adapted_state()) == set(sar.params)


def test_collapse_resets_to_released_weights(built, images):
    model = _model(built)
    released = {n: p.detach().clone() for n, p in norm_parameters(model, 0.75).items()}
    sar = SAR(model, 3, TTAConfig(lr=0.05, reset_threshold=10.0))  # every EMA is "collapsed"
    sar.step(images[:16])
    assert sar.stats.updates == 1 and sar.stats.resets == 1 and sar.ema is None
    assert all(torch.equal(sar.params[n], released[n]) for n in released)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="TTAConfig.adapt_fraction"):
        TTAConfig(adapt_fraction=0.0)
