"""Bytes per round per site for each aggregation strategy vs full fine-tuning.

Measured on real ``flwr.app.ArrayRecord`` payloads (the bytes Flower serialises) of a
MONAI ViT at ViT-B/16 scale (hidden 768, 12 layers, 12 heads, MLP 3072, patch 16,
224×224; instantiated locally with random weights, nothing downloaded) with PEFT LoRA
on ``qkv`` and ``out_proj`` and a trainable head, exactly as ``imaging.backbones``
builds it. One round = the server→site payload plus the site→server payload.

Usage::

    python benchmarks/bench_communication.py            # ViT-B/16 scale
    python benchmarks/bench_communication.py --quick    # small ViT (for tests)
    python benchmarks/bench_communication.py --accuracy # + fp32 vs bf16 federations

16-bit rows encode the same tensors with :mod:`strategies.wire` (the codec the apps use).
``--accuracy`` also runs the same short DP federation (ffa-lora) with ``wire-dtype``
float32 and bfloat16 side by side and prints their final accuracies.

The last line printed is the reduction ratio of the recommended DP default (ffa-lora
with bf16 transport) vs full fine-tuning in fp32.
"""

from __future__ import annotations

import argparse

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, get_peft_model

from fedadapt.imaging.backbones import HEAD, VIT_LORA_TARGETS, ModelSpec, ViTClassifier
from fedadapt.server.record import payload_bytes
from fedadapt.strategies.lora_math import LORA_A
from fedadapt.strategies.names import STRATEGIES
from fedadapt.strategies.wire import encode

VIT_B16 = ModelSpec(image_size=224, patch_size=16, hidden_size=768, mlp_dim=3072,
                    num_layers=12, num_heads=12, num_classes=3, lora_rank=8, lora_alpha=16)
QUICK = ModelSpec(image_size=32, patch_size=4, hidden_size=96, mlp_dim=192, num_layers=4,
                  num_heads=4, num_classes=3, lora_rank=8, lora_alpha=16)


def payloads(spec: ModelSpec) -> dict[str, int]:
    """Bytes per round per site (down + up) for full fine-tuning and every strategy."""
    torch.manual_seed(0)
    base = ViTClassifier(spec)  # no calibration: it changes buffers, not what travels
    full = {n: p.detach() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(
        r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
        target_modules=list(VIT_LORA_TARGETS), modules_to_save=[HEAD]))
    lora = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    ffa = {n: t for n, t in lora.items() if LORA_A not in n}
    out = {"full fine-tuning": 2 * payload_bytes(ArrayRecord(full))}
    for name in STRATEGIES:
        out[name] = 2 * payload_bytes(ArrayRecord(ffa if name == "ffa-lora" else lora))
    for dtype in ("bfloat16", "float16"):
        for name, state in (("fedavg", lora), ("ffa-lora", ffa)):
            out[f"{name} + {dtype}"] = 2 * payload_bytes(encode(state, dtype))
    return out


def accuracy_side_by_side(rounds: int = 3) -> dict[str, float]:
    """Final accuracy of the same DP ffa-lora federation with fp32 and bf16 transport."""
    import json

    from fedadapt.config import RunConfig
    from fedadapt.simulations.runner import simulate

    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = RunConfig(num_server_rounds=rounds, strategy="ffa-lora", dp=True,
                        wire_dtype=dtype, epsilon_cap=1e6, out_dir="runs/bench_wire")
        summary = json.loads((simulate(cfg) / "summary.json").read_text())
        out[dtype] = float(summary["rounds"][-1]["accuracy"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small ViT instead of ViT-B/16")
    ap.add_argument("--accuracy", action="store_true",
                    help="also run fp32 vs bf16 transport federations (minutes)")
    args = ap.parse_args(argv)
    spec = QUICK if args.quick else VIT_B16
    sizes = payloads(spec)
    full = sizes["full fine-tuning"]
    print(f"# ViT hidden {spec.hidden_size}, {spec.num_layers} layers, {spec.num_heads} heads, "
          f"patch {spec.patch_size}, {spec.image_size}x{spec.image_size}, LoRA r={spec.lora_rank}"
          f" on {'/'.join(VIT_LORA_TARGETS)}; fp32 unless a 16-bit dtype is named")
    print("| payload | bytes / round / site (down + up) | MB | reduction vs full |")
    print("|---|---:|---:|---:|")
    for name, b in sizes.items():
        print(f"| {name} | {b:,} | {b / 1e6:.3f} | {full / b:.0f}x |")
    if args.accuracy:
        acc = accuracy_side_by_side()
        print("| wire dtype (ffa-lora, DP, default scenario, 3 rounds) | final accuracy |")
        print("|---|---:|")
        for dtype, a in acc.items():
            print(f"| {dtype} | {a:.4f} |")
    print(f"reduction ffa-lora fp32 vs full fine-tuning: {full / sizes['ffa-lora']:.1f}x")
    print(f"reduction ffa-lora + bfloat16 vs full fine-tuning: "
          f"{full / sizes['ffa-lora + bfloat16']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
