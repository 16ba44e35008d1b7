"""End to end: secure aggregation (SecAgg+) on Flower's Simulation Engine, 3 sites, 1 round.

The real ServerApp and ClientApp run through ``simulate(apps=...)``. The server's Grid is
wrapped to record every message that reaches the server; the ClientApp records, in its
own (Ray actor) process, what each site quantised and masked — by wrapping
``client.secagg.quantised_update``, the function the site calls — so the test can check
that nothing the server received equals any site's update, and that the aggregate is
plain FedAvg of the sites' updates within the quantisation error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.serverapp import Grid, ServerApp

from fedadapt import keys
from fedadapt.client import app as client_app
from fedadapt.client import secagg as client_secagg
from fedadapt.config import RunConfig
from fedadapt.privacy.secagg import TARGET_RANGE
from fedadapt.server.app import run_federation
from fedadapt.server.checkpoint import load_checkpoint
from fedadapt.simulations.runner import simulate

BASE = dict(num_sites=3, num_server_rounds=1, site_train_size=32, site_test_size=16,
            local_epochs=1, batch_size=16, backbone_weights="random", device="cpu",
            cross_site_eval=False, secure_aggregation=True, secagg_clip_norm=5.0,
            secagg_max_weight=32)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def _client(overrides: dict, out: Path, die: int | None = None) -> ClientApp:
    """The real handlers; each site saves what it quantised (``<node>.npz``); site ``die``
    raises in its train message, i.e. after it has shared its keys."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if die is not None and int(context.node_config[keys.NODE_PARTITION_ID]) == die:
            raise RuntimeError("site died after sharing its keys")
        real = client_secagg.quantised_update

        def record(delta, names, params, weight, rng):
            q = real(delta, names, params, weight, rng)
            np.savez(out / f"{msg.metadata.dst_node_id}.npz", weight=weight,
                     **{f"q::{n}": a for n, a in zip(["factor", *names], q)},
                     **{f"d::{n}": delta[n].numpy() for n in names})
            return q

        client_secagg.quantised_update = record
        try:
            return client_app.handle_train(msg, context, overrides)
        finally:
            client_secagg.quantised_update = real

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_app.handle_evaluate(msg, context, overrides)

    for stage, fn in ((keys.QUERY_SECAGG_SETUP, client_secagg.handle_setup),
                      (keys.QUERY_SECAGG_SHARE_KEYS, client_secagg.handle_share_keys),
                      (keys.QUERY_SECAGG_UNMASK, client_secagg.handle_unmask)):
        app.query(stage.split(".", 1)[1])(fn)
    return app


class _RecordingGrid:
    """Every reply that reaches the server, kept; with ``tamper``, one share of one active
    site's mask seed is corrupted in the unmask replies (a bad share)."""

    def __init__(self, grid: Grid, seen: list, tamper: bool) -> None:
        self.grid, self.seen, self.tamper = grid, seen, tamper

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                self.seen.append(reply.content)
        if self.tamper and replies and messages[0].metadata.message_type == \
                keys.QUERY_SECAGG_UNMASK:
            rec = replies[0].content[keys.SECAGG]
            shares = list(rec[Key.SHARE_LIST])
            owner = next(i for i, o in enumerate(rec[Key.NODE_ID_LIST])
                         if o != replies[0].metadata.src_node_id)
            bad = bytearray(shares[owner])
            bad[-1] ^= 0x5A
            shares[owner] = bytes(bad)
            rec[Key.SHARE_LIST] = shares
            self.tamper = False
        return replies


def _server(overrides: dict, run_dir: Path, seen: list, tamper: bool) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(_RecordingGrid(grid, seen, tamper), RunConfig.from_mapping(overrides),
                       run_dir)

    return app


def _run(tmp: Path, *, die: int | None = None, tamper: bool = False, **cfg) -> dict:
    out = tmp / "sites-record"
    out.mkdir()
    seen: list = []
    config = RunConfig(out_dir=str(tmp / "runs"), **{**BASE, **cfg})
    run_dir = simulate(config, apps=lambda o, d: (_server(o, d, seen, tamper),
                                                  _client(o, out, die)))
    summary = json.loads((run_dir / "summary.json").read_text())
    adapter = load_checkpoint(run_dir).arrays  # the global tensors that travel
    sites = {p.stem: dict(np.load(p)) for p in out.glob("*.npz")}
    return dict(summary=summary, adapter=adapter, sites=sites, seen=seen, cfg=config)


def _initial(cfg: RunConfig) -> dict[str, torch.Tensor]:
    from fedadapt.imaging.backbones import build_model, trainable_state
    from fedadapt.imaging.run_spec import run_model_spec

    return trainable_state(build_model(run_model_spec(cfg)))


def _check_fedavg(run: dict, base: dict[str, torch.Tensor] | None = None) -> None:
    """The final adapter == base + Σ w_k Δ_k / Σ w_k over the sites that masked, within the
    quantisation error (≤ n levels per coordinate in the sum, plus the weights' rounding)."""
    cfg, sites = run["cfg"], run["sites"]
    base = base if base is not None else _initial(cfg)
    weights = {s: float(v["weight"]) for s, v in sites.items()}
    total_w = sum(weights.values())
    step = 2 * cfg.secagg_clip_norm / TARGET_RANGE
    ratio_sum = sum(w / cfg.secagg_max_weight for w in weights.values())
    names = {k[3:] for v in sites.values() for k in v if k.startswith("d::")}
    assert names
    moved = 0.0  # the test can fail: the update is far larger than the tolerance
    for name in names:
        deltas = {s: torch.from_numpy(v[f"d::{name}"]) for s, v in sites.items()}
        want = base[name] + sum(weights[s] * d for s, d in deltas.items()) / total_w
        biggest = max(float(d.abs().max()) for d in deltas.values())
        tol = len(sites) * step / ratio_sum + biggest * len(sites) * 2 / TARGET_RANGE * \
            cfg.secagg_max_weight / min(weights.values()) + 1e-6
        got = run["adapter"][name].float()
        moved = max(moved, float((want - base[name]).abs().max()) / tol)
        assert (got - want).abs().max() <= tol, (name, float((got - want).abs().max()), tol)
    assert moved > 50


def _values(content) -> list[np.ndarray]:
    out = [a.numpy() for rec in content.array_records.values() for a in rec.values()]
    for rec in content.config_records.values():
        for v in rec.values():
            if isinstance(v, list) and v and isinstance(v[0], (int, float)):
                out.append(np.asarray(v))
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("secagg"))


def test_server_never_holds_an_individual_update(plain):
    sites, seen = plain["sites"], plain["seen"]
    assert len(sites) == 3 and seen
    individual = [a for v in sites.values() for k, a in v.items() if k[:3] in ("q::", "d::")]
    received = [a for content in seen for a in _values(content)]
    for mine in individual:
        for got in received:
            assert not (got.shape == mine.shape and np.array_equal(got, mine))
    masked = [content for content in seen if keys.ARRAYS in content.array_records]
    assert len(masked) + 0 >= 3  # the train replies (then the evaluate replies: metrics)
    train = [c for c in masked if keys.SECAGG_FACTOR in c.array_records]
    assert len(train) == 3
    assert all(a.dtype == "uint32" for c in train for a in c[keys.ARRAYS].values())


def test_aggregate_is_fedavg_within_quantisation_error(plain):
    summary = plain["summary"]
    rnd = summary["rounds"][0]
    assert len(rnd["train"]) == 3 and not rnd["failures"] and not rnd["rejected"]
    assert summary["privacy"]["secure_aggregation"]["protocol"] == "secagg+"
    assert summary["cross_site"] is None  # no site's own adapter ever reached the server
    _check_fedavg(plain)


def test_a_site_that_drops_after_sharing_keys_does_not_stop_the_round(tmp_path):
    run = _run(tmp_path, die=2)
    rnd = run["summary"]["rounds"][0]
    assert len(rnd["train"]) == 2 and len(run["sites"]) == 2
    assert [f["stage"] for f in rnd["failures"]] == ["train"]
    assert "died after sharing its keys" in rnd["failures"][0]["reason"]
    _check_fedavg(run)  # its pairwise masks rebuilt from its neighbours' shares


def test_a_tampered_share_is_rejected_and_the_round_completes(tmp_path):
    run = _run(tmp_path, tamper=True, strategy="ffa-lora", wire_dtype="bfloat16")
    rnd = run["summary"]["rounds"][0]
    assert not rnd["failures"], rnd["failures"]
    (bad,) = rnd["rejected"]
    assert "does not match the secret's commitment" in bad["reason"]
    assert not any("lora_A" in n for n in run["summary"]["wire"]["tensor_names"])
    from fedadapt.strategies.wire import decode, encode
    from flwr.app import ArrayRecord
    base = decode(encode(ArrayRecord({n: t for n, t in _initial(run["cfg"]).items()
                                      if "lora_A" not in n}), "bfloat16"))
    _check_fedavg(run, base)  # FFA-LoRA: B + head; the sites received bf16-rounded tensors


def test_distributed_dp_eps_is_in_the_summary_next_to_the_record_level_eps(tmp_path):
    run = _run(tmp_path, secagg_noise="skellam", secagg_noise_multiplier=2.0,
               secagg_max_weight=0, secagg_clip_norm=1.0)
    summary, cfg = run["summary"], run["cfg"]
    block = summary["privacy"]["secure_aggregation"]["distributed_dp"]
    assert block["unit"] == "site" and summary["privacy"]["unit"] == "record"
    assert all(site["epsilon"] > 0 for site in summary["sites"].values())  # record-level
    # Independently: Δ2 = C·s + √d, Δ1 = √d·Δ2, total variance (z·Δ2)² with all 3 sites in
    # the sum; Agarwal et al. 2021 Thm 3.5 and the RDP → (ε, δ) conversion, by hand.
    dim = sum(t.numel() for t in run["adapter"].values())
    s = TARGET_RANGE / (2 * cfg.secagg_clip_norm)
    l2 = cfg.secagg_clip_norm * s + dim ** 0.5
    l1, var = dim ** 0.5 * l2, (cfg.secagg_noise_multiplier * l2) ** 2
    import math
    from fedadapt.privacy.distributed_dp import ORDERS
    eps = min(a * l2**2 / (2 * var) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * var**2),
                                           3 * l1 / (2 * var))
              + math.log((a - 1) / a) - (math.log(cfg.delta) + math.log(a)) / (a - 1)
              for a in ORDERS)
    assert block["epsilon"] == pytest.approx(eps, rel=1e-6)
    assert block["rounds"][0]["sites"] == 3
    assert 1.0 < block["epsilon"] < 3.0  # z = 2: about the Gaussian mechanism's ε


class _DyingGrid:
    """The server "dies" as round 2's first message (the setup query) is about to go out."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(m.metadata.group_id == "2" for m in messages):
            raise SystemExit("server killed before round 2")
        return self.grid.send_and_receive(messages, timeout=timeout)


def test_distributed_dp_eps_composes_across_a_server_resume(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), **{**BASE, "num_server_rounds": 2,
                                              "secagg_noise": "skellam",
                                              "secagg_max_weight": 0})

    def dying(overrides, run_dir):
        app = ServerApp()

        @app.main()
        def _main(grid: Grid, context: Context) -> None:
            run_federation(_DyingGrid(grid), RunConfig.from_mapping(overrides), run_dir)

        return app, client_app.build_client_app(overrides)

    with pytest.raises(RuntimeError, match="without writing"):
        simulate(cfg, apps=dying)
    (run_dir,) = Path(cfg.out_dir).iterdir()
    before = load_checkpoint(run_dir)
    assert before.round == 1 and len(before.extra["secagg_dp"]) == 1
    resumed = simulate(RunConfig.from_mapping({**before.config, "resume-from": str(run_dir)}))
    block = json.loads((resumed / "summary.json").read_text())["privacy"][
        "secure_aggregation"]["distributed_dp"]
    assert [r["round"] for r in block["rounds"]] == [1, 2]
    from fedadapt.privacy.distributed_dp import skellam_epsilon
    one = skellam_epsilon([(r["l2"], r["l1"], r["variance"]) for r in block["rounds"][:1]],
                          delta=cfg.delta)
    assert block["epsilon"] > one
