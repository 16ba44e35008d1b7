"""Test-time BatchNorm for BatchNorm backbones (EfficientNet-Lite0), at the site only.

During the federation every BatchNorm of EfficientNet-Lite0 is a
:class:`fedadapt.imaging.efficientnet.FrozenBatchNorm2d` (the pretrained statistics and
affine map as fixed buffers), so DP-SGD sees a per-example function. Test-time
adaptation runs after the release, on the site's own unlabelled images, and swaps each of
them (and any ``nn.BatchNorm2d``) for a :class:`TTABatchNorm2d` in the site's copy of the
model:

* **statistics re-estimation** (Schneider et al., NeurIPS 2020, "Improving robustness
  against common corruptions by covariate shift adaptation"; Nado et al. 2020): while
  adapting, a layer normalises with the statistics of the current batch, mixed with the
  released ones as ``prior · released + (1 - prior) · batch`` (``prior = 0``: pure batch
  statistics, as Tent), and accumulates a cumulative average of the batch statistics;
  after the stream a no-gradient recalibration pass re-estimates them under the final
  affine parameters, and evaluation uses them: the adapted model is again a per-image
  function;
* **Tent on the BN affine** (Wang et al., ICLR 2021): ``weight``/``bias`` become
  trainable parameters (entropy minimisation in ``client.tta``).

Nothing here changes the model used for training; nothing leaves the site.
"""

from __future__ import annotations

import torch
from torch import nn

from fedadapt.imaging.efficientnet import FrozenBatchNorm2d


class TTABatchNorm2d(nn.Module):
    """A BatchNorm2d whose statistics and affine map adapt at test time.

    Attributes:
        weight, bias: The affine map (trainable parameters, started from the released).
        running_mean, running_var: The statistics used outside adaptation (start: the
            released; after :func:`recalibrate`: the site's).
        adapting: Normalise with batch statistics (mixed with the released) when true.
        track: Accumulate the batch statistics into the site's estimate when adapting.
    """

    def __init__(self, src: nn.Module, prior: float = 0.0) -> None:
        super().__init__()
        self.eps, self.prior = float(src.eps), float(prior)
        w = src.weight if src.weight is not None else torch.ones_like(src.running_mean)
        b = src.bias if src.bias is not None else torch.zeros_like(src.running_mean)
        self.weight = nn.Parameter(w.detach().clone().float())
        self.bias = nn.Parameter(b.detach().clone().float())
        for name in ("mean", "var"):
            value = getattr(src, f"running_{name}").detach().clone().float()
            self.register_buffer(f"released_{name}", value)
            self.register_buffer(f"running_{name}", value.clone())
            self.register_buffer(f"_sum_{name}", torch.zeros_like(value))
        self.register_buffer("_batches", torch.tensor(0, dtype=torch.long))
        self.adapting, self.track = False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapting:
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            if self.track:
                with torch.no_grad():
                    self._sum_mean += mean.detach()
                    self._sum_var += var.detach()
                    self._batches += 1
            mean = self.prior * self.released_mean + (1 - self.prior) * mean
            var = self.prior * self.released_var + (1 - self.prior) * var
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    @torch.no_grad()
    def restart_estimate(self) -> None:
        """Forget the accumulated batch statistics."""
        self._sum_mean.zero_()
        self._sum_var.zero_()
        self._batches.zero_()

    @torch.no_grad()
    def commit_estimate(self) -> None:
        """Use the (prior-mixed) average of the accumulated statistics from now on."""
        if int(self._batches) == 0:
            return
        n = float(self._batches)
        for name in ("mean", "var"):
            site = getattr(self, f"_sum_{name}") / n
            getattr(self, f"running_{name}").copy_(
                self.prior * getattr(self, f"released_{name}") + (1 - self.prior) * site)

    @torch.no_grad()
    def release(self) -> None:
        """Back to the released statistics (the affine map is restored by the caller)."""
        self.running_mean.copy_(self.released_mean)
        self.running_var.copy_(self.released_var)
        self.restart_estimate()


def convert_batchnorm(model: nn.Module, prior: float = 0.0) -> dict[str, TTABatchNorm2d]:
    """Swap every FrozenBatchNorm2d / BatchNorm2d of ``model`` for a TTABatchNorm2d, in
    place (idempotent). Returns the test-time BN layers by module name (empty if none)."""
    out: dict[str, TTABatchNorm2d] = {}
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                child = TTABatchNorm2d(child, prior)
                setattr(mod, child_name, child)
            if isinstance(child, TTABatchNorm2d):
                out[full] = child
    return out


def set_adapting(layers: dict[str, TTABatchNorm2d], adapting: bool, track: bool = False
                 ) -> None:
    """Batch statistics on/off (and whether they accumulate) for every layer."""
    for layer in layers.values():
        layer.adapting, layer.track = adapting, track and adapting


@torch.no_grad()
def recalibrate(model: nn.Module, layers: dict[str, TTABatchNorm2d], batches) -> None:
    """Re-estimate every layer's statistics over ``batches`` under the current affine
    parameters (cumulative average of batch statistics, as ``torch.optim.swa_utils.update_bn``),
    then use them for evaluation."""
    if not layers:
        return
    for layer in layers.values():
        layer.restart_estimate()
    set_adapting(layers, True, track=True)
    try:
        for x in batches:
            model(x)
    finally:
        set_adapting(layers, False)
    for layer in layers.values():
        layer.commit_estimate()
