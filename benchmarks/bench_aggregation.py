"""Aggregation throughput: GB/s of adapter tensors averaged by the server's FedAvg step.

Times ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` (what Flower's
``FedAvg.aggregate_train`` calls, and so what ``server.app`` runs each round) on K site
replies of P fp32 adapter parameters split into 2·L LoRA tensors, and reports the input
bytes read per second. The last line is the throughput of the largest K × P measured.

    python benchmarks/bench_aggregation.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords


def replies(k: int, p: int, tensors: int, seed: int = 0) -> list[RecordDict]:
    """K site replies, each an ArrayRecord of ``tensors`` fp32 arrays totalling ~P values."""
    rng = np.random.default_rng(seed)
    size = max(1, p // tensors)
    out = []
    for site in range(k):
        arrays = ArrayRecord({f"layer{i}.lora": Array(rng.standard_normal(size, dtype=np.float32))
                              for i in range(tensors)})
        out.append(RecordDict({"arrays": arrays,
                               "metrics": MetricRecord({"num-examples": 100 + site})}))
    return out


def measure(k: int, p: int, tensors: int, repeats: int) -> tuple[float, float]:
    """(seconds per aggregation, GB/s of input) for K sites × P params, best of ``repeats``."""
    recs = replies(k, p, tensors)
    nbytes = k * (p // tensors) * tensors * 4
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        aggregate_arrayrecords(recs, "num-examples")
        best = min(best, time.perf_counter() - t0)
    return best, nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    args = parser.parse_args()
    grid = ([(2, 10_000), (4, 100_000)] if args.quick else
            [(k, p) for k in (10, 100) for p in (100_000, 892_550, 4_000_000)])  # 892,550: ViT-B/16 LoRA r=8 + head
    repeats = 2 if args.quick else 5
    print(f"{'K sites':>8} {'P params':>10} {'MB in':>9} {'ms':>9} {'GB/s':>7}")
    last = 0.0
    for k, p in grid:
        sec, gbs = measure(k, p, tensors=24, repeats=repeats)
        print(f"{k:>8} {p:>10} {k * p * 4 / 1e6:>9.1f} {sec * 1e3:>9.2f} {gbs:>7.2f}")
        last = gbs
    k, p = grid[-1]
    print(f"aggregation throughput K={k} P={p}: {last:.3f} GB/s")


if __name__ == "__main__":
    main()
