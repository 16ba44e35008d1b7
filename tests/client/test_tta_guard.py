"""The label-free safeguard (client/tta_guard.py) and test-time BatchNorm (client/tta_bn.py)."""

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from fedadapt.client.train import train
from fedadapt.client.tta import SAR, TTAConfig, adapt_stream, predict, split_holdout
from fedadapt.client.tta_bn import TTABatchNorm2d
from fedadapt.client.tta_guard import compare
from fedadapt.imaging.backbones import ModelSpec, build_model
from fedadapt.imaging.efficientnet import FrozenBatchNorm2d
from fedadapt.imaging.synthetic import ScannerShift, SiteSpec, make_site_data

#: The default 32-px ViT with the shipped MAE-pretrained encoder (a random tiny ViT trained
#: this briefly collapses to one class, which is no classifier to guard).
SPEC = ModelSpec(num_classes=3, backbone_weights="builtin")
SCANNER = ScannerShift(1.0, 1.0, 0.03, 0.0, 0.0)


def _site(n: int, index: int):
    data, _ = make_site_data(SiteSpec("s", n, 4, SCANNER), image_size=SPEC.image_size,
                             num_classes=3, seed=0, site_index=index)
    return data.tensors


@pytest.fixture(scope="module")
def trained():
    """LoRA + head trained (no DP) on one site: a real classifier (~0.98) to guard."""
    model = build_model(SPEC)
    x, y = _site(128, 0)
    train(model, TensorDataset(x, y), epochs=3, lr=0.03, batch_size=32,
          device=torch.device("cpu"), seed=0)
    return model.eval()


def test_split_holdout_is_seeded_disjoint_and_sized():
    images = torch.arange(50, dtype=torch.float32)[:, None]
    stream, held = split_holdout(images, 0.2, seed=3)
    again, held2 = split_holdout(images, 0.2, seed=3)
    assert len(held) == 10 and len(stream) == 40 and torch.equal(held, held2)
    assert set(stream[:, 0].tolist()).isdisjoint(held[:, 0].tolist())
    assert stream[:, 0].tolist() == sorted(stream[:, 0].tolist())  # the stream keeps order
    assert len(split_holdout(images, 0.0)[1]) == 0


def test_compare_rule_counts_flips_among_confident_images():
    released = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0.1, 0, 0], [9.0, 0, 0]])
    same = compare(released, released.clone(), confident_below=0.44, tolerance=0.01,
                   max_entropy_increase=0.1, after_batches=1)
    assert not same.failed and same.flips == 0 and same.checked == 3
    # an unconfident image flipping is not counted; a confident one is
    moved = released.clone()
    moved[2] = torch.tensor([0.0, 0.1, 0])
    assert not compare(released, moved, confident_below=0.44, tolerance=0.01,
                       max_entropy_increase=10.0, after_batches=1).failed
    every = compare(released, moved, confident_below=None, tolerance=0.01,  # the default
                    max_entropy_increase=10.0, after_batches=1)
    assert every.failed and every.checked == 4 and every.flips == 1
    moved[3] = torch.tensor([0.0, 9.0, 0])
    bad = compare(released, moved, confident_below=0.44, tolerance=0.01,
                  max_entropy_increase=10.0, after_batches=1)
    assert bad.failed and bad.flips == 1 and "changed class" in bad.reason
    flat = compare(released, torch.zeros(4, 3), confident_below=0.44, tolerance=1.0 - 1e-9,
                   max_entropy_increase=0.1, after_batches=1)
    assert flat.failed and "entropy" in flat.reason


def test_a_broken_update_is_reverted_to_the_released_weights(trained):
    model = copy.deepcopy(trained)
    x, _ = _site(96, 5)
    stream, held = split_holdout(x, 0.25)
    released_held = predict(model, [held])
    sar = SAR(model, 3, TTAConfig())
    released = {n: p.detach().clone() for n, p in sar.params.items()}
    sar.step(stream[:32])
    with torch.no_grad():  # deliberately broken: scramble every adapted norm
        gen = torch.Generator().manual_seed(0)
        for p in sar.params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 5)
    check = sar.guard(released_held, [held])
    assert check.failed and sar.stats.reverted and sar.stopped
    assert all(torch.equal(sar.params[n], released[n]) for n in released)
    assert torch.equal(predict(model, [held]), released_held)
    before = {n: p.detach().clone() for n, p in sar.params.items()}
    sar.step(stream[32:64])  # stopped: no further adaptation
    assert all(torch.equal(sar.params[n], before[n]) for n in before)
    assert sar.stats.to_dict()["safeguard_reverted"] is True


def test_harmful_setting_never_costs_more_than_one_point(trained):
    """A harmful setting (Tent, lr 5, 2 passes) on an unshifted site: the
    safeguard's final model is at most 1 point worse on a labelled check split."""
    x, _ = _site(60, 7)
    xc, yc = _site(100, 8)  # labelled check split, used only to score
    harmful = TTAConfig(lr=5.0, entropy_margin=1e9, sam_rho=0.0, reset_threshold=0.0,
                        balance_weight=0.0)
    stream, held = split_holdout(x, harmful.holdout_fraction, harmful.holdout_seed)
    acc0 = float((predict(trained, [xc]).argmax(1) == yc).float().mean())
    raw = copy.deepcopy(trained)
    adapt_stream(raw, list(torch.split(stream, 16)) * 2, num_classes=3, cfg=harmful)
    acc_raw = float((predict(raw, [xc]).argmax(1) == yc).float().mean())
    assert acc_raw < acc0 - 0.01  # without the safeguard this setting hurts
    guarded = copy.deepcopy(trained)
    _, sar = adapt_stream(guarded, list(torch.split(stream, 16)) * 2, num_classes=3,
                          cfg=harmful, holdout=held)
    acc1 = float((predict(guarded, [xc]).argmax(1) == yc).float().mean())
    assert acc1 >= acc0 - 0.01, sar.stats.to_dict()
    assert sar.stats.reverted  # here by reverting (the check split agrees with held-back)


def test_efficientnet_batchnorm_becomes_test_time_bn_in_the_site_copy_only():
    base = build_model(ModelSpec(image_size=32, num_classes=2, backbone="efficientnet-lite0",
                                 backbone_weights="random", task="classification"))
    x = torch.rand(40, 1, 32, 32)
    ref = predict(base, [x])
    model = copy.deepcopy(base)
    sar = SAR(model, 2, TTAConfig(lr=1e-2, entropy_margin=1e9))
    assert sar.bn and all(isinstance(m, TTABatchNorm2d) for m in sar.bn.values())
    assert torch.allclose(predict(model, [x]), ref, atol=1e-5)  # converted = released
    assert any(isinstance(m, FrozenBatchNorm2d) for m in base.modules())  # training copy
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(sar.params) and all("_bn" in n for n in trainable)
    assert not any("lora_" in n or "classifier" in n for n in trainable)
    _, sar = adapt_stream(model, torch.split(x[:32], 16), num_classes=2, cfg=sar.cfg)
    assert sar.stats.updates == 2
    state = sar.adapted_state()
    name = next(iter(sar.bn))
    assert not torch.equal(state[f"{name}.running_mean"], sar.bn[name].released_mean)
    assert not torch.allclose(predict(model, [x]), ref)  # statistics re-estimated
    sar.reset()  # back to the released statistics and affine map
    assert torch.allclose(predict(model, [x]), ref, atol=1e-5)


def test_config_validation_of_the_safeguard_fields():
    with pytest.raises(ValueError, match="TTAConfig.tolerance"):
        TTAConfig(tolerance=1.5)
    with pytest.raises(ValueError, match="TTAConfig.holdout_fraction"):
        TTAConfig(holdout_fraction=1.0)
