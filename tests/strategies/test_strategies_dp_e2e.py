"""End to end with DP on: median, trimmed-mean, fedprox, fedadam and fedyogi on Flower's
Simulation Engine.

(fedavg, ffa-lora and exact have their own DP runs in ``test_e2e_simulation.py``,
``test_strategies_e2e.py`` and ``test_hetero_ranks.py``.) One simulation of two sites:
the test ServerApp runs the real ``run_federation`` once per strategy, one after the other
on the same Grid (one DP round each, its own run directory), so Ray starts once. The sites
are the real ``handle_train``/``handle_evaluate`` with their own policies and ledgers,
so each site's ε composes over the five federations; the test ClientApp only writes down
the train config each site received, to see what each strategy sent (FedProx's μ).

A sixth federation asks for bfloat16 on the wire and one site replies in float32 (the
test ClientApp re-encodes its real reply): update validation rejects it on the real
server path, with the site and the reason in ``summary.json``. A seventh runs
``scaffold`` for two DP rounds: the test ClientApp also keeps the control-variate
correction each site received.
"""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedadapt.client.app import handle_evaluate, handle_train
from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, trainable_state
from fedadapt.server.app import run_federation
from fedadapt.server.checkpoint import load_checkpoint
from fedadapt.server.record import payload_bytes
from fedadapt.simulations.runner import simulate
from fedadapt.strategies import wire
from fedadapt.strategies.scaffold import received_correction
from fedadapt.imaging.run_spec import run_model_spec

STRATEGIES = ("median", "trimmed-mean", "fedprox", "fedadam", "fedyogi")
WIRE_RUN, WRONG_DTYPE_SITE = "wire-dtype", 1  # bf16 run; partition 1 replies in float32
SCAFFOLD_RUN = "scaffold"  # two rounds, after the others: train messages 7 and 8
CFG = dict(num_sites=2, num_server_rounds=1, site_train_size=32, site_test_size=16, dp=True,
           local_epochs=1, batch_size=16, cross_site_eval=False, proximal_mu=0.05,
           backbone_weights="random", device="cpu", epsilon_cap=100.0)


def _server_app(overrides: dict, run_dir: Path) -> ServerApp:
    """One federation per strategy, in order, each in ``run_dir / <strategy>``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping(overrides)
        for name in STRATEGIES:
            (run_dir / name).mkdir()
            run_federation(grid, cfg.replace(strategy=name), run_dir / name)
        (run_dir / WIRE_RUN).mkdir()
        run_federation(grid, cfg.replace(strategy="fedavg", wire_dtype="bfloat16"),
                       run_dir / WIRE_RUN)
        (run_dir / SCAFFOLD_RUN).mkdir()
        run_federation(grid, cfg.replace(strategy="scaffold", num_server_rounds=2),
                       run_dir / SCAFFOLD_RUN)
        (run_dir / "summary.json").write_text(json.dumps({"federations": STRATEGIES}))

    return app


def _recording_client_app(overrides: dict, seen: Path) -> ClientApp:
    """The site's real handlers; train also appends the config it received to ``seen``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[keys.NODE_PARTITION_ID])
        log = seen / f"site{pid}.jsonl"
        federation = len(log.read_text().splitlines()) if log.exists() else 0
        with open(log, "a") as f:
            f.write(json.dumps(dict(msg.content[keys.CONFIG])) + "\n")
        correction = received_correction(msg)
        if correction is not None:
            torch.save(correction, seen / f"site{pid}-message{federation}.pt")
        reply = handle_train(msg, context, overrides)
        if federation == len(STRATEGIES) and pid == WRONG_DTYPE_SITE:
            reply.content[keys.ARRAYS] = wire.encode(wire.decode(reply.content[keys.ARRAYS]),
                                                     "float32")
        return reply

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    return app


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp-strategies")
    seen = out / "seen"
    seen.mkdir()
    cfg = RunConfig(out_dir=str(out / "runs"), **CFG)
    run_dir = simulate(cfg, apps=lambda ov, rd: (_server_app(ov, rd),
                                                 _recording_client_app(ov, seen)))
    summaries = {n: json.loads((run_dir / n / "summary.json").read_text())
                 for n in (*STRATEGIES, WIRE_RUN, SCAFFOLD_RUN)}
    # Federation k's train message is line k at every site (they run one after the other).
    received = [[json.loads(line) for line in p.read_text().splitlines()]
                for p in sorted(seen.glob("site*.jsonl"))]
    return cfg, run_dir, summaries, received, seen


@pytest.fixture(scope="module")
def initial(runs):
    """The adapter and head every federation started from (the shared seed)."""
    return trainable_state(build_model(run_model_spec(runs[0])))


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_runs_with_dp(runs, name):
    _, _, summaries, received, _ = runs
    summary = summaries[name]
    assert summary["strategy"]["name"] == name and summary["privacy"]["dp"]
    rnd = summary["rounds"][-1]
    assert len(rnd["train"]) == 2 and len(rnd["evaluate"]) == 2
    assert rnd["rejected"] == [] and rnd["failures"] == [] and rnd["accuracy"] is not None
    assert len(received) == 2 and all(len(r) == len(STRATEGIES) + 3 for r in received)
    assert all(r[STRATEGIES.index(name)][keys.DP_ENABLED] for r in received)


def test_each_sites_epsilon_is_opacus_rdp_composed_over_the_federations(runs):
    cfg, _, summaries, _, _ = runs
    orders = RDPAccountant.DEFAULT_ALPHAS
    for site in summaries[STRATEGIES[0]]["sites"]:
        rdp = 0.0
        for name in STRATEGIES:  # the site's ledger composes every round it trained
            summary = summaries[name]
            t = summary["rounds"][-1]["train"][site]
            assert t["noise_multiplier"] >= cfg.noise_multiplier > 0
            rdp = rdp + compute_rdp(q=t["sample_rate"], noise_multiplier=t["noise_multiplier"],
                                    steps=t["steps"], orders=orders)
            eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=t["delta"])
            assert summary["sites"][site]["epsilon"] == pytest.approx(eps, rel=1e-9), name


@pytest.mark.parametrize("name", STRATEGIES)
def test_global_adapter_changed(runs, initial, name):
    _, run_dir, _, _, _ = runs
    start = initial
    after = load_checkpoint(run_dir / name).arrays
    assert set(after) == set(start)
    assert all(torch.isfinite(t).all() for t in after.values())
    moved = [n for n in start if not torch.equal(after[n].float(), start[n].float())]
    assert any("lora_B" in n for n in moved) and any("head" in n for n in moved), moved[:5]


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_specific_state(runs, name):
    cfg, run_dir, _, received, _ = runs
    mus = {r[STRATEGIES.index(name)].get(keys.PROXIMAL_MU) for r in received}
    state = load_checkpoint(run_dir / name).strategy
    if name == "fedprox":  # Flower's FedProx sends μ; the site's train uses it
        assert mus == {cfg.proximal_mu}
    else:
        assert mus == {None}
    if name in ("fedadam", "fedyogi"):  # the server optimiser's moments
        inner = state["FedAdam" if name == "fedadam" else "FedYogi"]
        m_t, v_t = inner["m_t"], inner["v_t"]
        assert m_t and v_t and set(m_t) == set(v_t)
        assert any(float(t.abs().max()) > 0 for t in m_t.values())
        assert all(float(t.min()) >= 0 for t in v_t.values())  # second moments
    else:
        assert not any("m_t" in s for s in state.values())
    if name in ("median", "trimmed-mean"):  # fedadapt's adapter aggregation
        assert "AdapterAggregation" in state


def test_reply_in_another_wire_dtype_is_rejected_on_the_server_path(runs):
    _, _, summaries, received, _ = runs
    summary = summaries[WIRE_RUN]
    assert summary["wire"]["dtype"] == "bfloat16"
    assert all(r[len(STRATEGIES)][keys.WIRE_DTYPE] == "bfloat16" for r in received)
    names = {v["partition_id"]: k for k, v in summary["sites"].items()}
    rnd = summary["rounds"][-1]
    assert len(rnd["train"]) == 2 and rnd["failures"] == [] and rnd["accuracy"] is not None
    [rejected] = rnd["rejected"]
    assert rejected["site"] == names[WRONG_DTYPE_SITE]
    assert "sent as float32 on the wire, the run's wire-dtype is bfloat16" in rejected["reason"]


def test_scaffold_sends_each_site_its_correction_at_no_privacy_cost(runs, initial):
    """Round 1 carries no correction; round 2 gives each site c − c_i, whose size-weighted
    sum is 0 (c is the weighted mean of the c_i); the server's checkpoint holds the
    variates; the sites' ledgers charge the same mechanism as any DP round (the correction
    is post-processing); the down-link carries the correction on top of the adapter."""
    _, run_dir, summaries, _, seen = runs
    summary = summaries[SCAFFOLD_RUN]
    assert summary["strategy"]["name"] == "scaffold" and summary["privacy"]["dp"]
    r1, r2 = summary["rounds"]
    for rnd in (r1, r2):
        assert len(rnd["train"]) == 2 and rnd["rejected"] == [] and rnd["failures"] == []
    first, second = len(STRATEGIES) + 1, len(STRATEGIES) + 2  # message index at each site
    assert not list(seen.glob(f"site*-message{first}.pt"))
    corrections = {pid: torch.load(seen / f"site{pid}-message{second}.pt") for pid in (0, 1)}
    names = {v["partition_id"]: k for k, v in summary["sites"].items()}
    n = {pid: r1["train"][names[pid]]["num_examples"] for pid in (0, 1)}
    adapter = set(initial)
    for pid, corr in corrections.items():
        assert set(corr) == adapter and any(float(t.abs().max()) > 0 for t in corr.values())
    for name in adapter:
        total = sum(n[pid] * corrections[pid][name] for pid in (0, 1))
        scale = max(float(corrections[pid][name].abs().max()) for pid in (0, 1)) + 1e-12
        assert float(total.abs().max()) / scale < 1e-4, name
    ck = load_checkpoint(run_dir / SCAFFOLD_RUN)
    state = ck.strategy["Scaffold"]
    assert len(state["site_c"]) == 2 and set(state["c"]) == adapter
    sent = sum(payload_bytes(ArrayRecord(c)) for c in corrections.values())
    assert r2["bytes"]["down"] - r1["bytes"]["down"] == sent  # the corrections are counted
    assert r2["bytes"]["up"] == r1["bytes"]["up"]
    for site in names.values():  # the same DP round as without scaffold: σ, q, steps
        t1, t2 = r1["train"][site], r2["train"][site]
        assert (t1["noise_multiplier"], t1["sample_rate"], t1["steps"]) == \
            (t2["noise_multiplier"], t2["sample_rate"], t2["steps"])
        assert t2["epsilon_round"] == pytest.approx(t1["epsilon_round"], rel=1e-12)
    moved = [k for k in adapter if not torch.equal(ck.arrays[k].float(), initial[k].float())]
    assert any("lora_B" in k for k in moved)
