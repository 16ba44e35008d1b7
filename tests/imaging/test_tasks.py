"""Segmentation with UNETR + LoRA under DP-SGD through the site's training loop, task
losses and metrics, and classification metrics."""

import pytest
import torch

from fedadapt.client.train import evaluate, evaluate_metrics, train
from fedadapt.imaging.backbones import ModelSpec, backbone_for, build_model, trainable_state
from fedadapt.imaging.registry import attach_peft, build_backbone, check_dp
from fedadapt.imaging.tasks import TaskScores, classification_metrics, synthetic_segmentation, task_loss
from fedadapt.privacy.dp import DPRequest

CPU = torch.device("cpu")


def train_segmentation(model, data, *, epochs, lr, batch_size, seed, dp):
    return train(model, data, epochs=epochs, lr=lr, batch_size=batch_size, device=CPU,
                 seed=seed, dp=dp, loss_fn=task_loss("segmentation"))


def evaluate_segmentation(model, data, *, num_classes):
    loss, m = evaluate_metrics(model, data, batch_size=4, device=CPU, task="segmentation",
                               num_classes=num_classes)
    return loss, m["dice"]


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


def test_dice_and_voxel_accuracy_exact():
    y = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    y[0, 0, :2, :2] = 1  # 4 foreground pixels in image 0
    y[1, 0, 0, :] = 1  # 4 in image 1
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[0, :2, :2] = 1  # image 0: perfect
    pred[1, 0, :2] = 1  # image 1: 2 of 4 found, no false positive: Dice 2*2/(2+4)
    logits = torch.nn.functional.one_hot(pred, 2).movedim(-1, 1).float()
    scores = TaskScores("segmentation", 2)
    scores.update(logits[:1], y[:1])
    scores.update(logits[1:], y[1:])
    m = scores.result()
    assert m["dice"] == pytest.approx((1.0 + 4 / 6) / 2)
    assert m["accuracy"] == pytest.approx(30 / 32)


def test_task_losses_are_per_example_means():
    logits, y = torch.randn(4, 3), torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    bce = task_loss("multilabel")(logits, y)
    per = torch.stack([task_loss("multilabel")(logits[i:i + 1], y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(bce, per.mean())
    seg_logits, mask = torch.randn(3, 2, 8, 8), torch.randint(0, 2, (3, 1, 8, 8))
    seg = task_loss("segmentation")
    torch.testing.assert_close(seg(seg_logits, mask), torch.stack(
        [seg(seg_logits[i:i + 1], mask[i:i + 1]) for i in range(3)]).mean())
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        task_loss("detection")


def test_multilabel_classification_trains_under_dp(one_thread):
    spec = ModelSpec(image_size=16, num_classes=4, task="multilabel", lora_rank=2)
    model = build_model(spec)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 2, (16, 4), generator=g)
    data = torch.utils.data.TensorDataset(x, y.float())
    before = trainable_state(model)
    res = train(model, data, epochs=1, lr=0.05, batch_size=8, device=CPU, seed=0,
                dp=DPRequest(1.0, 1.0), loss_fn=task_loss("multilabel"))
    assert res.steps == 2
    assert any(not torch.equal(a, before[n]) for n, a in trainable_state(model).items())
    loss, m = evaluate_metrics(model, data, batch_size=8, device=CPU, task="multilabel")
    assert loss > 0 and set(m) == {"accuracy", "balanced_accuracy", "auc"}
    assert evaluate(model, data, batch_size=8, device=CPU, task="multilabel")[1] == m["accuracy"]


def test_model_spec_dispatches_to_the_registry():
    assert backbone_for("classification", 2) == ""
    assert (backbone_for("segmentation", 2), backbone_for("segmentation", 3),
            backbone_for("classification", 3)) == ("unetr-2d", "unetr-3d", "vit-3d")
    spec = ModelSpec(image_size=16, num_classes=2, task="segmentation", spatial_dims=3,
                     backbone="unetr-3d", hidden_size=32, mlp_dim=64, num_heads=2)
    a, b = trainable_state(build_model(spec)), trainable_state(build_model(spec))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # seeded
    with pytest.raises(ValueError, match="not a multiple of UNETR's patch size 16"):
        ModelSpec(image_size=24, task="segmentation", backbone="unetr-2d")
    with pytest.raises(ValueError, match="has none shipped"):
        ModelSpec(task="segmentation", backbone="unetr-2d", backbone_weights="builtin")
    with pytest.raises(ValueError, match="is 2-D segmentation; the spec is 3-D"):
        ModelSpec(task="segmentation", spatial_dims=3, backbone="unetr-2d")
    with pytest.raises(ValueError, match="names a registry backbone"):
        ModelSpec(task="segmentation")
