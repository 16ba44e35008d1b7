"""Scale: 10 → 100 simulated sites on one machine: time per round and peak memory.

Each size is one real federation, ``simulations.runner.simulate`` (ServerApp and
ClientApps on Flower's Ray backend, one Ray worker per CPU core), with tiny sites so
the numbers show the framework's cost per site rather than training: DP-SGD on, few
training records per site, one local epoch, two rounds. Every site trains and is
evaluated in every round.

* **Time per round** comes from the run's own TensorBoard events (``server.tracking``,
  run config ``tensorboard = true``): the wall time at which the server finished each
  round. Round 1 is measured from the call to ``simulate`` and so includes Ray start-up
  and every worker's first imports; round 2 onwards is the steady cost.
* **Peak memory** is sampled every 0.25 s from ``/proc`` with psutil over this process
  and all its descendants (Ray's GCS server, raylet and worker processes): the largest
  sum of RSS seen, and of PSS (proportional set size: shared pages split between the
  processes that map them, so the sum does not count shared libraries and Ray's
  shared-memory object store more than once).

The last line is the growth from the smallest to the largest federation: time per
(steady) round and peak PSS, largest ÷ smallest (``--quick`` runs one size and prints
its own figures instead).

    python benchmarks/bench_scale.py [--quick] [--sites 10,25,50,100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedadapt.config import RunConfig
from fedadapt.server.tracking import TENSORBOARD_DIR
from fedadapt.simulations.runner import simulate


class MemorySampler:
    """Peak summed RSS and PSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        rss = pss = n = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()  # has pss on Linux
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # a worker that just exited
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            n += 1
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, n)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass(frozen=True)
class ScaleResult:
    """One federation size: round end times (s from start), peak memory in bytes."""

    sites: int
    round_ends_s: list[float]
    total_s: float
    peak_rss: int
    peak_pss: int
    peak_procs: int

    @property
    def round_times_s(self) -> list[float]:
        ends = self.round_ends_s
        return [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]

    @property
    def steady_round_s(self) -> float:
        """Mean time of the rounds after the first (the first includes start-up)."""
        later = self.round_times_s[1:]
        return sum(later) / len(later) if later else self.round_times_s[0]


def round_end_times(run_dir: Path) -> list[float]:
    """Wall-clock times at which the server logged each round, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    if "bytes/total" not in acc.Tags()["scalars"]:
        raise RuntimeError(f"{run_dir / TENSORBOARD_DIR} holds no 'bytes/total' scalars: "
                           "the run's tracking did not write its rounds")
    return [e.wall_time for e in sorted(acc.Scalars("bytes/total"), key=lambda e: e.step)]


def run_size(base: RunConfig, sites: int) -> ScaleResult:
    """One federation of ``sites`` sites; its round times and peak memory."""
    import json

    cfg = base.replace(num_sites=sites)
    with MemorySampler() as mem:
        t0 = time.time()
        run_dir = simulate(cfg)
        total = time.time() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    for r in summary["rounds"]:
        if len(r["train"]) != sites or len(r["evaluate"]) != sites:
            raise RuntimeError(f"round {r['round']} at {sites} sites: {len(r['train'])} trained,"
                               f" {len(r['evaluate'])} evaluated; see {run_dir}")
    ends = [t - t0 for t in round_end_times(run_dir)]
    if len(ends) != cfg.num_server_rounds:
        raise RuntimeError(f"{len(ends)} rounds logged at {sites} sites, expected "
                           f"{cfg.num_server_rounds}")
    return ScaleResult(sites, ends, total, mem.peak_rss, mem.peak_pss, mem.peak_procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 2-site federation, for the test suite")
    parser.add_argument("--sites", default=None, help="comma-separated federation sizes "
                        "(default 10,25,50,100; quick: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per federation (default 2)")
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sites or ("2" if args.quick else "10,25,50,100")).split(",")]
    with tempfile.TemporaryDirectory() as out:
        base = RunConfig(num_server_rounds=args.rounds, local_epochs=1, site_train_size=16,
                         site_test_size=8, batch_size=8, dp=True, epsilon_cap=1e6,
                         device="cpu", out_dir=out, tensorboard=True)
        results = []
        for k in sizes:
            res = run_size(base, k)
            results.append(res)
            print(f"{k} sites: rounds {', '.join(f'{t:.1f}' for t in res.round_times_s)} s; "
                  f"peak PSS {res.peak_pss / 2**20:.0f} MiB", flush=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          f"{base.num_server_rounds} rounds, DP on (sigma {base.noise_multiplier}), "
          f"{base.site_train_size} training / {base.site_test_size} test records at the "
          f"largest site, batch {base.batch_size}, 1 local epoch")
    print("| sites | start-up + round 1 s | later rounds s / round | s / round / site | "
          "total s | peak RSS sum MiB | peak PSS sum MiB | processes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.sites} | {r.round_times_s[0]:.1f} | {r.steady_round_s:.1f} | "
              f"{r.steady_round_s / r.sites:.2f} | {r.total_s:.1f} | {r.peak_rss / 2**20:.0f} | "
              f"{r.peak_pss / 2**20:.0f} | {r.peak_procs} |")
    lo, hi = results[0], results[-1]
    if lo is hi:
        print(f"{hi.sites} sites: {hi.steady_round_s:.2f} s per round, peak memory (PSS) "
              f"{hi.peak_pss / 2**20:.0f} MiB")
        return
    print(f"{hi.sites} vs {lo.sites} sites ({hi.sites / lo.sites:g}x sites): time per round "
          f"{hi.steady_round_s / lo.steady_round_s:.2f}x, peak memory (PSS) "
          f"{hi.peak_pss / lo.peak_pss:.2f}x")


if __name__ == "__main__":
    main()
