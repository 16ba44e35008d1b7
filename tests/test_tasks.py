"""Segmentation with UNETR + LoRA under DP-SGD, and classification metrics."""

import pytest
import torch

from fedimaging.registry import attach_peft, build_backbone, check_dp
from fedimaging.tasks import (classification_metrics, evaluate_segmentation,
                              synthetic_segmentation, train_segmentation)
from privacy.dp import DPRequest


@pytest.fixture
def one_thread():
    """Tiny convolutions are faster on one thread than contending for shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_unetr_lora_dp_step_and_dice(one_thread):
    check_dp("unetr-2d", "lora")
    model = attach_peft(build_backbone("unetr-2d", num_classes=2, img_size=(32, 32),
                                       hidden_size=32, mlp_dim=64, num_heads=2,
                                       feature_size=8), "unetr-2d", rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = synthetic_segmentation(8, 32, seed=0)
    res = train_segmentation(model, data, epochs=1, lr=0.05, batch_size=4, seed=0,
                             dp=DPRequest(noise_multiplier=1.0, max_grad_norm=1.0))
    assert res.steps >= 1 and res.loss > 0
    model = getattr(model, "_module", model)
    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_" in n for n in changed) and any("out.conv" in n for n in changed)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(not p.requires_grad for p in frozen)
    loss, dice = evaluate_segmentation(model, synthetic_segmentation(4, 32, seed=1),
                                       num_classes=2)
    assert loss > 0 and 0.0 <= dice <= 1.0


def test_classification_metrics_multiclass_and_multilabel():
    y = torch.tensor([0, 0, 0, 1, 2])
    logits = torch.eye(3)[torch.tensor([0, 0, 0, 1, 1])] * 5
    m = classification_metrics(logits, y)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert 0.5 < m["auc"] <= 1.0
    yl = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    ml = classification_metrics(torch.where(yl == 1, 3.0, -3.0), yl, multilabel=True)
    assert ml == {"accuracy": 1.0, "balanced_accuracy": 1.0, "auc": 1.0}


def test_3d_segmentation_and_classification_under_dp(one_thread):
    from client.train import train

    dp = DPRequest(noise_multiplier=1.0, max_grad_norm=1.0)
    seg = attach_peft(build_backbone("unetr-3d", num_classes=2, img_size=(16, 16, 16),
                                     hidden_size=32, mlp_dim=64, num_heads=2, feature_size=8),
                      "unetr-3d", rank=4)
    res = train_segmentation(seg, synthetic_segmentation(4, 16, seed=0, spatial_dims=3),
                             epochs=1, lr=0.05, batch_size=2, seed=0, dp=dp)
    assert res.steps >= 1
    _, dice = evaluate_segmentation(getattr(seg, "_module", seg),
                                    synthetic_segmentation(2, 16, seed=1, spatial_dims=3),
                                    num_classes=2)
    assert 0.0 <= dice <= 1.0
    check_dp("vit-3d", "lora")
    cls = attach_peft(build_backbone("vit-3d", num_classes=3, img_size=(16, 16, 16),
                                     num_layers=1, hidden_size=32, mlp_dim=64, num_heads=2),
                      "vit-3d", rank=4)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16, 16),
                                          torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    before = [p.detach().clone() for p in cls.parameters() if p.requires_grad]
    train(cls, data, epochs=1, lr=0.05, batch_size=4, device=torch.device("cpu"), seed=0, dp=dp)
    after = [p for p in cls.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
