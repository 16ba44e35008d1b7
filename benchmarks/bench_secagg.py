"""Secure aggregation's cost per round: bytes and time vs plain aggregation, at K sites.

Drives the real stage functions of ``server/secagg.py`` and ``client/secagg.py`` in this
process, with real Flower Messages and one Context per site, without the Simulation Engine
or training (so 50 sites fit on a laptop): setup, share keys, masked vectors of P
parameters, unmask. Bytes are the serialised payloads the server sends and receives in
one round (adapter down in fp32, masked ``uint32`` vectors + key material up; plain
FedAvg: the adapter down and each fp32 update up). Times: the server's work per round
(plain: Flower's ``aggregate_arrayrecords``; SecAgg+: its four stages without the sites'
work), and one site's work (keys, shares, quantise, mask), the mean over sites.

    python benchmarks/bench_secagg.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from fedadapt import keys
from fedadapt.client import secagg as site
from fedadapt.config import RunConfig
from fedadapt.messages import TrainReply
from fedadapt.server import secagg as server
from fedadapt.server.record import payload_bytes

HANDLERS = {keys.QUERY_SECAGG_SETUP: site.handle_setup,
            keys.QUERY_SECAGG_SHARE_KEYS: site.handle_share_keys,
            keys.QUERY_SECAGG_UNMASK: site.handle_unmask}


def _state(p: int, tensors: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.lora": torch.randn(p // tensors, generator=gen) * 0.01
            for i in range(tensors)}


def plain(k: int, p: int, tensors: int) -> tuple[int, float]:
    """(bytes per round, server seconds) of plain FedAvg."""
    base = ArrayRecord(_state(p, tensors, 0))
    recs = [RecordDict({"arrays": ArrayRecord(_state(p, tensors, s + 1)),
                        "metrics": MetricRecord({"num-examples": 100 + s})}) for s in range(k)]
    t0 = time.perf_counter()
    aggregate_arrayrecords(recs, "num-examples")
    took = time.perf_counter() - t0
    return k * payload_bytes(base) + sum(payload_bytes(r["arrays"]) for r in recs), took


def secure(k: int, p: int, tensors: int, shares: int) -> tuple[int, float, float]:
    """(bytes per round, server seconds, mean seconds per site) of one SecAgg+ round."""
    cfg = RunConfig(secure_aggregation=True, num_sites=k, secagg_num_shares=shares,
                    secagg_max_weight=1000)
    nodes = list(range(1, k + 1))
    ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
           for n in nodes}
    arrays = {n: t * 0 for n, t in _state(p, tensors, 0).items()}
    site_s, nbytes = 0.0, 0

    def send(messages: list[Message], stage: str) -> list[Message]:
        nonlocal site_s, nbytes
        out = []
        for m in messages:
            t0 = time.perf_counter()
            out.append(HANDLERS[m.metadata.message_type](m, ctx[m.metadata.dst_node_id]))
            site_s += time.perf_counter() - t0
            nbytes += (server.record_bytes(m.content[keys.SECAGG])
                       + server.record_bytes(out[-1].content[keys.SECAGG]))
        return out

    t_start = time.perf_counter()
    session = server.new_session(cfg, 1, arrays, nodes)
    server.setup(session, send, cfg)
    server.share_keys(session, send)
    replies, rng = [], np.random.default_rng(0)
    for n in nodes:
        msg = server.attach(Message(RecordDict({keys.ARRAYS: ArrayRecord(arrays)}),
                                    dst_node_id=n, message_type="train"), session)
        t0 = time.perf_counter()
        site.receive_shares(msg, ctx[n])
        reply = TrainReply(site_id=str(n), arrays=ArrayRecord(), num_examples=100 + n,
                           train_loss=0.0, epsilon=0.0, epsilon_round=0.0, delta=1e-5,
                           steps=1, sample_rate=0.1, partition_id=n)
        trained = {name: arrays[name] + t for name, t in _state(p, tensors, n).items()}
        replies.append(site.masked_reply(msg, ctx[n], reply, arrays, trained, rng))
        site_s += time.perf_counter() - t0
        nbytes += (payload_bytes(msg.content[keys.ARRAYS]) + server.record_bytes(
            msg.content[keys.SECAGG]) + payload_bytes(replies[-1].content[keys.ARRAYS])
            + payload_bytes(replies[-1].content[keys.SECAGG_FACTOR]))
    total, active = server.collect(session, replies)
    server.unmask(session, send, total, active)
    server_s = time.perf_counter() - t_start - site_s
    return nbytes, server_s, site_s / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    parser.add_argument("--params", type=int, default=100_000, help="adapter parameters P")
    args = parser.parse_args()
    for attr in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp would stamp
        setattr(TaskIdentity, attr, 1)
    p, tensors = (2_000, 4) if args.quick else (args.params, 16)
    grid = [(3, 0)] if args.quick else [(3, 0), (10, 0), (50, 0), (50, 7)]
    print(f"P = {p} parameters in {tensors} tensors; bytes = one round, server <-> all sites")
    print("| sites | graph | plain bytes | secagg bytes | x | plain server s | "
          "secagg server s | secagg s / site |")
    ratio = 0.0
    for k, shares in grid:
        pb, ps = plain(k, p, tensors)
        sb, ss, per_site = secure(k, p, tensors, shares)
        ratio = sb / pb
        print(f"| {k} | {'all' if not shares else f'k={shares}'} | {pb:,} | {sb:,} | "
              f"{ratio:.2f} | {ps:.4f} | {ss:.3f} | {per_site:.3f} |")
    print(f"bytes secagg / plain at {grid[-1][0]} sites: {ratio:.2f}x")


if __name__ == "__main__":
    main()
