"""Heterogeneous LoRA ranks end to end: simulated sites of ranks 8 and 4 (``site-ranks``)
and a deployed site folder of rank 2 (its ``site.toml``), exact aggregation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedadapt.client.app import handle_evaluate, handle_train
from fedadapt.client.site import _simulated_site, site_from_context
from fedadapt.deploy.site_config import SiteConfig
from fedadapt.deploy.site_folder import init_site
from fedadapt import keys
from fedadapt.config import ConfigError, RunConfig
from fedadapt.server.app import build_server_app
from fedadapt.simulations.runner import simulate
from fedadapt.strategies.lora_math import LORA_A, LORA_B, change_rank, exact_aggregate, lora_pairs


def _adapter(rank, seed, out=12, inp=10):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.w": torch.randn(rank, inp, generator=g),
            "m.lora_B.w": torch.randn(out, rank, generator=g), "head.w": torch.randn(3)}


def _update(state, rank, alpha=4.0):  # PEFT: ΔW = (α / r) B A
    return (alpha / rank) * state["m.lora_B.w"] @ state["m.lora_A.w"]


def test_site_rank_comes_from_site_ranks():
    cfg = RunConfig(num_sites=2, site_ranks="8, 4", strategy="exact")
    ranks = [_simulated_site(cfg, {keys.NODE_PARTITION_ID: i}).model_spec().lora_rank
             for i in range(2)]
    assert ranks == [8, 4]
    assert _simulated_site(RunConfig(), {keys.NODE_PARTITION_ID: 1}).lora_rank == 8


@pytest.mark.parametrize("bad,match", [
    (dict(num_sites=2, site_ranks="8"), "site-ranks"),
    (dict(num_sites=2, site_ranks="8,16"), "1..lora-rank=8"),
    (dict(num_sites=2, site_ranks="8,x"), "site-ranks"),
    (dict(num_sites=2, site_ranks="8,4", strategy="ffa-lora"), "ffa-lora")])
def test_bad_site_ranks_are_clear_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**bad)


def test_small_site_round_trip_keeps_the_update():
    # The global rank-8 adapter at a rank-4 site: the best rank-4 update (SVD), same scale.
    glob = _adapter(8, 0)
    small, resid = change_rank(glob, 4, 8)
    assert small["m.lora_A.w"].shape == (4, 10) and small["m.lora_B.w"].shape == (12, 4)
    err = torch.linalg.norm(_update(small, 4) - _update(glob, 8)) / torch.linalg.norm(
        _update(glob, 8))
    assert err == pytest.approx(resid, rel=1e-4) and 0 < resid < 1
    # Back to the global rank: zero-padding, exact.
    back, resid = change_rank(small, 8, 4)
    assert resid == 0 and back["m.lora_A.w"].shape == (8, 10)
    assert torch.allclose(_update(back, 8), _update(small, 4), atol=1e-6)
    assert torch.equal(back["head.w"], glob["head.w"])


def test_exact_aggregation_of_mixed_ranks_is_the_weighted_product_sum():
    # Sites of ranks 8 and 4 reply at the global rank; with a sum of rank ≤ 8 the SVD
    # re-factorisation reproduces Σ p_k ΔW_k exactly.
    big = _adapter(8, 1)
    big["m.lora_B.w"][:, 6:] = 0  # rank 6 ...
    small = _adapter(2, 2)  # ... + rank 2 = 8
    padded, _ = change_rank(small, 8, 2)
    agg, resid = exact_aggregate([big, padded], [0.25, 0.75], 8)
    target = 0.25 * _update(big, 8) + 0.75 * _update(small, 2)
    assert resid < 1e-5
    assert torch.allclose(_update(agg, 8), target, rtol=1e-4, atol=1e-5)


def _deployed(tmp_path, name="small-gpu", **kw):
    d = tmp_path / name
    init_site(d, SiteConfig(name=name, data="synthetic", partition_id=2, num_sites=3, **kw),
              {"epsilon_cap": 100.0})
    return d


def test_deployed_site_trains_at_its_own_rank(tmp_path):
    run = RunConfig(num_sites=3, lora_rank=8, strategy="exact").to_mapping()
    node = {keys.NODE_SITE_DIR: str(_deployed(tmp_path, lora_rank=2))}
    site = site_from_context(run, node)
    assert site.lora_rank == 2 and site.model_spec().lora_rank == 2
    assert site_from_context(run, {keys.NODE_SITE_DIR: str(_deployed(tmp_path, "any"))}
                             ).lora_rank == 8  # lora_rank = 0: the run's rank


def test_deployed_site_refuses_a_run_below_its_rank_or_ffa_lora_or_scaffold(tmp_path):
    node = {keys.NODE_SITE_DIR: str(_deployed(tmp_path, lora_rank=4))}
    with pytest.raises(ValueError, match=r"small-gpu refuses the run: .*site.toml sets "
                                         r"lora_rank = 4, above the run's LoRA rank 2; .* "
                                         r"at most 2"):
        site_from_context(RunConfig(num_sites=3, lora_rank=2).to_mapping(), node)
    with pytest.raises(ValueError, match="strategy ffa-lora keeps lora_A frozen at the run's "
                                         "rank 8; set lora_rank = 0 .* strategy exact"):
        site_from_context(RunConfig(num_sites=3, strategy="ffa-lora").to_mapping(), node)
    scaffold = RunConfig(num_sites=3, strategy="scaffold").to_mapping()
    with pytest.raises(ValueError, match=r"sets lora_rank = 4 \(below the run's 8\), but the "
                                         r"run's strategy scaffold"):
        site_from_context(scaffold, node)
    personal = {keys.NODE_SITE_DIR: str(_deployed(tmp_path, "own-head",
                                                  personalised_keys=("classifier",)))}
    with pytest.raises(ValueError, match=r"personalised_keys = \['classifier'\], but the run's "
                                         r"strategy scaffold"):
        site_from_context(scaffold, personal)
    assert site_from_context(scaffold, {keys.NODE_SITE_DIR: str(_deployed(tmp_path, "plain"))})


DEPLOYED = 2  # partition 2 runs from a deployed site folder (site.toml lora_rank = 2)


def _client_app(overrides: dict, folder: str) -> ClientApp:
    """The site's real handlers; partition 2's SuperNode names its site folder, as
    ``fedadapt site start`` does with ``--node-config site-dir=...``."""
    app = ClientApp()

    def _ctx(context: Context) -> Context:
        if int(context.node_config[keys.NODE_PARTITION_ID]) == DEPLOYED:
            context.node_config[keys.NODE_SITE_DIR] = folder
        return context

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle_train(msg, _ctx(context), overrides)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, _ctx(context), overrides)

    return app


@pytest.fixture(scope="module")
def hetero_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hetero")
    folder = str(_deployed(tmp, lora_rank=2))
    cfg = RunConfig(out_dir=str(tmp / "runs"), num_sites=3, num_server_rounds=2,
                    site_train_size=64, site_test_size=32, dp=True, strategy="exact",
                    site_ranks="8,4,8", local_epochs=1)
    run_dir = simulate(cfg, apps=lambda ov, rd: (build_server_app(ov, rd),
                                                 _client_app(ov, folder)))
    return cfg, run_dir, json.loads((run_dir / "summary.json").read_text())


def test_ranks_8_4_and_deployed_2_federate_with_exact_aggregation(hetero_run):
    cfg, run_dir, summary = hetero_run
    for rnd in summary["rounds"]:
        # Every site trained (the smaller ones loaded their own-rank adapter strictly) and
        # every reply passed validation (same names and shapes: the global rank).
        assert len(rnd["train"]) == 3 and rnd["rejected"] == [] and rnd["failures"] == []
        assert len(rnd["evaluate"]) == 3
    # Each site reports the rank it trained at: site-ranks, and the deployed site.toml.
    ranks = {name: info["lora_rank"] for name, info in summary["sites"].items()}
    assert ranks == {"hospital-a": 8, "hospital-b": 4, "small-gpu": 2}, ranks
    resid = summary["strategy"]["exact_residual"]
    assert set(resid) == {"1", "2"} and all(0 <= v < 1 for v in resid.values())
    adapter = {}
    for f in (run_dir / summary["adapter_dir"]).glob("*.safetensors"):
        adapter.update(load_file(str(f)))
    pairs = lora_pairs(adapter)
    assert pairs, sorted(adapter)[:3]
    for a_name, b_name in pairs.values():  # the global adapter has the global rank
        assert adapter[a_name].shape[0] == cfg.lora_rank == adapter[b_name].shape[1]
    assert any(LORA_A in n for n in adapter) and any(LORA_B in n for n in adapter)
