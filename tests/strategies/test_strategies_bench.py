"""benchmarks/bench_communication.py runs once (quick ViT) on real ArrayRecord payloads."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_communication.py"


def test_quick_benchmark_prints_ratio(capsys):
    spec = importlib.util.spec_from_file_location("bench_communication", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    sizes = mod.payloads(mod.QUICK)
    assert sizes["ffa-lora"] < sizes["fedavg"] < sizes["full fine-tuning"]
    ratio = sizes["full fine-tuning"] / sizes["ffa-lora"]
    assert lines[-2].endswith(f"{ratio:.1f}x") and ratio > 10
    # 16-bit transport: half the fp32 payload up to Flower's per-array NumPy headers.
    bf16 = sizes["ffa-lora + bfloat16"]
    assert 0.45 * sizes["ffa-lora"] < bf16 < 0.5 * sizes["ffa-lora"]
    assert lines[-1].endswith(f"{sizes['full fine-tuning'] / bf16:.1f}x")
