"""DP overhead: DP-LoRA training step time ÷ non-DP LoRA step time, same model and batch.

Builds a fedadapt model (``imaging.backbones.build_model``: frozen backbone + PEFT LoRA +
head) and times the same fixed batch through (a) plain SGD, (b) Opacus DP-SGD with
per-sample-gradient hooks (``grad_sample_mode="hooks"``), (c) with PyTorch's expanded
weights (``"ew"``), and (d) Opacus ghost clipping (``grad_sample_mode="ghost"``; Li et
al., ICLR 2022, "Large Language Models Can Be Strong Differentially Private Learners").
The last line is the ratio of the mode ``privacy.dp`` trains this model with
(``privacy.dp.grad_sample_mode``: ``ew`` for the LoRA + linear-head models on the CPU).

``--threads`` sets torch's intra-op threads; ``--clock cpu`` times with the process's
CPU time instead of wall time (on a loaded shared machine, wall time with 2 threads
mostly measures how long the OpenMP threads wait for a core).

``--backbone``: ``default`` (the default small ViT, 32 px), ``vit-b16`` (the default
MONAI ViT at ViT-B/16 shape, 224 px) or ``hf-vit-b16`` (a ``transformers`` ViT-B/16 with
random weights, saved with ``save_pretrained`` and loaded through ``backbone-path``, as
a user's checkpoint would be). With ``--isolate`` each mode runs in its own process, so
its peak memory (max RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) is its own.

    python benchmarks/bench_dp_overhead.py [--quick] [--threads 1 --clock cpu]
    python benchmarks/bench_dp_overhead.py --backbone hf-vit-b16 --batch 32 --steps 2 \\
        --warmup 1 --repeats 1 --isolate
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedadapt.imaging.backbones import ModelSpec, build_model
from fedadapt.privacy.dp import grad_sample_mode

MODES = ("none", "hooks", "ew", "ghost")
BACKBONES = ("default", "vit-b16", "hf-vit-b16")


def make_spec(backbone: str, quick: bool, folder: Path, rank: int) -> ModelSpec:
    """The model spec a ``--backbone`` choice names (``hf-vit-b16`` saves into ``folder``)."""
    if backbone == "vit-b16":
        return ModelSpec(image_size=224, patch_size=16, hidden_size=768, mlp_dim=3072,
                         num_layers=12, num_heads=12, lora_rank=rank, lora_alpha=2 * rank)
    if backbone == "hf-vit-b16":
        import transformers as T

        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            T.ViTModel(T.ViTConfig(), add_pooling_layer=False).save_pretrained(folder)
            T.ViTImageProcessorPil().save_pretrained(folder)  # 224 px, mean/std 0.5
        return ModelSpec(image_size=224, backbone_path=str(folder), backbone_weights="random",
                         lora_rank=rank, lora_alpha=2 * rank)
    if quick:
        return ModelSpec(num_layers=1, hidden_size=32, mlp_dim=64, num_heads=2)
    return ModelSpec(lora_rank=rank, lora_alpha=2 * rank)


def _batch(spec: ModelSpec, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, spec.image_size, spec.image_size, generator=g),
            torch.randint(0, spec.num_classes, (n,), generator=g))


def _private(mode: str, model: nn.Module, opt, crit, x, y):
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
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
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
    return net, opt, crit


def step_time(mode: str, spec: ModelSpec, batch: int, steps: int, warmup: int = 2,
              device: str = "cpu", amp: bool = False, clock=time.perf_counter) -> float:
    """Seconds per optimiser step of ``mode`` in :data:`MODES`, timed with ``clock``."""
    torch.manual_seed(0)
    model = build_model(spec).train().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = (t.to(device) for t in _batch(spec, batch))
    crit: nn.Module = nn.CrossEntropyLoss()
    net: nn.Module = model
    if mode != "none":
        net, opt, crit = _private(mode, model, opt, crit, x, y)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = clock()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            loss = crit(net(x), y)
        loss.backward()
        opt.step()
    _sync(device)
    return (clock() - t0) / steps


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: str) -> float:
    """Peak memory of this process so far: max RSS (CPU) or CUDA allocations, in MiB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _isolated(mode: str, argv: list[str]) -> dict:
    """Run one mode in a child process; its JSON line: seconds per step and peak MiB."""
    out = subprocess.run([sys.executable, __file__, *argv, "--only", mode],
                         capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return json.loads(lines[-1])


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    parser.add_argument("--backbone", choices=BACKBONES, default="default")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per sample")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="samples per mode (best)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--isolate", action="store_true",
                        help="each mode in its own process (its own peak memory)")
    parser.add_argument("--folder", default="", help="where hf-vit-b16 is saved (kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time or the process's CPU time")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--only", choices=MODES, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    folder = Path(args.folder or Path(tempfile.gettempdir()) / "fedadapt-bench-hf-vit-b16")
    spec = make_spec(args.backbone, args.quick, folder, args.rank)
    batch = args.batch or (8 if args.quick else 32)
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 5)
    if args.only:  # child of --isolate: one mode, one JSON line
        sec = min(step_time(args.only, spec, batch, steps, args.warmup, args.device, args.amp,
                            clock) for _ in range(repeats))
        print(json.dumps({"sec": sec, "peak_mib": peak_mib(args.device)}))
        return
    used = "hooks" if args.device == "cuda" else grad_sample_mode(build_model(spec))
    modes = [m for m in MODES if m in {*args.modes.split(","), "none", used}]
    argv = [a for a in sys.argv[1:] if a != "--isolate"] + ["--folder", str(folder)]
    # Modes interleaved, best of ``repeats``: the machine is shared, so a slow spell
    # should not land on one mode only.
    samples: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    for _ in range(1 if args.isolate else repeats):
        for mode in modes:
            try:
                if args.isolate:
                    res = _isolated(mode, argv)
                    samples.setdefault(mode, []).append(res["sec"])
                    peaks[mode] = res["peak_mib"]
                else:
                    samples.setdefault(mode, []).append(step_time(
                        mode, spec, batch, steps, args.warmup, args.device, args.amp, clock))
            except Exception as err:  # noqa: BLE001 - report an unsupported mode, keep others
                print(f"{mode}: not measured ({type(err).__name__}: {err})")
    times = {mode: min(v) for mode, v in samples.items() if v}
    medians = {mode: sorted(v)[len(v) // 2] for mode, v in samples.items() if v}
    print(f"backbone {args.backbone}, image {spec.image_size}, LoRA r={spec.lora_rank}, batch "
          f"{batch}, best of {repeats} x {steps} timed steps ({args.warmup} warm-up), device "
          f"{args.device}{' bf16' if args.amp else ''}, threads {torch.get_num_threads()}, "
          f"clock {args.clock}")
    for mode, sec in times.items():
        peak = f"  peak {peaks[mode]:8.0f} MiB" if mode in peaks else ""
        print(f"{mode:>6}: {sec * 1e3:10.1f} ms/step  ratio {sec / times['none']:.3f}x  (median "
              f"{medians[mode] / medians['none']:.3f}x){peak}")
    print(f"DP-LoRA (privacy.dp: {used}) / non-DP LoRA step time: "
          f"{times[used] / times['none']:.3f}x")


if __name__ == "__main__":
    main()
