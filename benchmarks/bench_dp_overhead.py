"""DP overhead: DP-LoRA training step time ÷ non-DP LoRA step time, same model and batch.

Builds the default fedadapt model (``imaging.backbones.build_model(ModelSpec())``:
frozen MONAI ViT + PEFT LoRA + head) and times the same fixed batch through
(a) plain SGD, (b) Opacus DP-SGD with per-sample-gradient hooks (``grad_sample_mode="hooks"``)
and (c) Opacus ghost clipping (``grad_sample_mode="ghost"``; Li et al., ICLR 2022,
"Large Language Models Can Be Strong Differentially Private Learners"), one after the other
in the same process. The last line is the hooks ratio (the mode ``privacy.dp`` uses).

    python benchmarks/bench_dp_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedadapt.imaging.backbones import ModelSpec, build_model


def _batch(spec: ModelSpec, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, spec.image_size, spec.image_size, generator=g),
            torch.randint(0, spec.num_classes, (n,), generator=g))


def step_time(mode: str, spec: ModelSpec, batch: int, steps: int, warmup: int = 2) -> float:
    """Seconds per optimiser step of ``mode`` in {"none", "hooks", "ghost"}."""
    torch.manual_seed(0)
    model = build_model(spec).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = _batch(spec, batch)
    crit: nn.Module = nn.CrossEntropyLoss()
    net: nn.Module = model
    if mode != "none":
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        engine = PrivacyEngine(accountant="rdp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "ghost":
                net, opt, crit, _ = engine.make_private(
                    module=model, optimizer=opt, data_loader=loader, criterion=crit,
                    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                    grad_sample_mode="ghost")
            else:
                net, opt, _ = engine.make_private(
                    module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                    max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = crit(net(x), y)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = ModelSpec(num_layers=1, hidden_size=32, mlp_dim=64, num_heads=2) if args.quick \
        else ModelSpec()
    batch = args.batch or (8 if args.quick else 32)
    steps, repeats = (3, 1) if args.quick else (10, 5)
    # Modes interleaved, best of ``repeats``: the machine is shared, so a slow spell
    # should not land on one mode only.
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        for mode in ("none", "hooks", "ghost"):
            try:
                samples.setdefault(mode, []).append(step_time(mode, spec, batch, steps))
            except Exception as err:  # noqa: BLE001 - report an unsupported mode, keep others
                print(f"{mode}: not measured ({type(err).__name__}: {err})")
    times = {mode: min(v) for mode, v in samples.items() if v}
    print(f"model {spec}, batch {batch}, best of {repeats} x {steps} timed steps, threads "
          f"{torch.get_num_threads()}")
    for mode, sec in times.items():
        print(f"{mode:>6}: {sec * 1e3:8.2f} ms/step  ratio {sec / times['none']:.3f}x")
    print(f"DP-LoRA (opacus hooks) / non-DP LoRA step time: {times['hooks'] / times['none']:.3f}x")


if __name__ == "__main__":
    main()
