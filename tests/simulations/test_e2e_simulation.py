"""End to end: the real ServerApp and ClientApp on Flower's Simulation Engine (Ray).

One tiny DP federation is run once for the module; the tests then check what it wrote:
learning happened, only adapter and head tensors crossed the wire, and each site's ε is
what an Opacus accountant gives for the (σ, q, steps) it actually ran.
"""

import json

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from peft import PeftModel

from flwr.app import ArrayRecord

from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import ViTClassifier, build_model, is_adapter_or_head, trainable_state
from fedadapt.server.record import payload_bytes
from fedadapt.simulations.runner import simulate
from fedadapt.imaging.run_spec import run_model_spec

CFG = dict(num_sites=2, num_server_rounds=3, site_train_size=240, site_test_size=96,
           noise_multiplier=0.8, local_epochs=2, lr=0.03, epsilon_cap=100.0)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    cfg = RunConfig(out_dir=str(tmp_path_factory.mktemp("runs")), **CFG)
    run_dir = simulate(cfg)
    return cfg, run_dir, json.loads((run_dir / "summary.json").read_text())


def test_accuracy_improves_and_beats_chance(dp_run):
    cfg, _, summary = dp_run
    first, last = summary["rounds"][0]["accuracy"], summary["rounds"][-1]["accuracy"]
    chance = 1 / cfg.num_classes
    assert last > first
    assert last > chance + 0.1
    assert len(summary["rounds"]) == cfg.num_server_rounds
    assert set(summary["sites"]) == {"hospital-a", "hospital-b"}


def test_only_adapter_and_head_tensors_on_the_wire(dp_run):
    cfg, _, summary = dp_run
    model = build_model(run_model_spec(cfg))
    expected = trainable_state(model)
    names = summary["wire"]["tensor_names"]
    assert names == sorted(expected)
    assert all(is_adapter_or_head(n) for n in names)
    backbone = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert backbone and not set(backbone) & set(names)
    per_site = sum(t.numel() * t.element_size() for t in expected.values())
    assert summary["wire"]["bytes_per_direction_per_site"] == per_site
    wire = payload_bytes(ArrayRecord(expected))  # tensor bytes + a small header each
    assert per_site < wire < per_site + 256 * len(expected)
    for rnd in summary["rounds"]:
        # down: train + evaluate messages to each site; up: one update per site
        assert rnd["bytes"]["up"] == wire * cfg.num_sites
        assert rnd["bytes"]["down"] == 2 * wire * cfg.num_sites
    total_params = sum(p.numel() for p in model.parameters())
    assert per_site < 0.1 * total_params * 4


def test_epsilon_matches_opacus_accountant(dp_run):
    cfg, _, summary = dp_run
    orders = RDPAccountant.DEFAULT_ALPHAS
    for site, info in summary["sites"].items():
        rdp = 0.0
        for rnd in summary["rounds"]:
            t = rnd["train"][site]
            assert t["steps"] == cfg.local_epochs * round(1 / t["sample_rate"])
            rdp = rdp + compute_rdp(q=t["sample_rate"], noise_multiplier=cfg.noise_multiplier,
                                    steps=t["steps"], orders=orders)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=cfg.delta)
        assert info["epsilon"] > 0
        assert info["epsilon"] == pytest.approx(eps, rel=1e-9)
        assert summary["rounds"][-1]["train"][site]["epsilon"] == pytest.approx(eps, rel=1e-9)


def test_cross_site_matrix_in_summary_and_report(dp_run):
    _, run_dir, summary = dp_run
    cs = summary["cross_site"]
    assert cs["models"] == ["global", "local:hospital-a", "local:hospital-b"]
    assert cs["sites"] == ["hospital-a", "hospital-b"]
    # the global row is the last round's federated evaluation, site by site
    last = summary["rounds"][-1]["evaluate"]
    assert cs["accuracy"][0] == [pytest.approx(last[s]["accuracy"]) for s in cs["sites"]]
    assert all(0.0 <= a <= 1.0 for row in cs["accuracy"] for a in row)
    assert 'src="cross_site.png"' in (run_dir / "report.html").read_text()
    assert (run_dir / "cross_site.png").stat().st_size > 1000


def test_one_ledger_per_site_and_audit_agrees(dp_run):
    from fedadapt.privacy.audit import audit_ledger

    cfg, run_dir, summary = dp_run
    assert summary["config"]["sites-dir"] == str(run_dir / "sites")
    for site, info in summary["sites"].items():
        ledgers = list((run_dir / "sites" / site / "ledger").glob("*.jsonl"))
        assert len(ledgers) == 1
        audit = audit_ledger(ledgers[0]).to_dict()
        assert audit["ok"] and audit["rounds"] == cfg.num_server_rounds
        assert audit["cap"] == cfg.epsilon_cap == info["epsilon_cap"]
        assert audit["eps_spent"] == pytest.approx(info["epsilon"], rel=1e-9)
        assert info["rounds_trained"] == cfg.num_server_rounds and "refused_from_round" not in info


def test_adapter_saved_in_peft_format_and_reloads(dp_run):
    import torch

    cfg, run_dir, summary = dp_run
    adapter = run_dir / summary["adapter_dir"]
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    torch.manual_seed(cfg.seed)
    spec = run_model_spec(cfg)
    reference = build_model(spec)  # the backbone every site rebuilds from the spec
    base = reference.get_base_model()
    fresh = ViTClassifier(spec)
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in base.state_dict().items()
                           if "lora_" not in k and "modules_to_save" not in k
                           and "original_module" not in k} |
                          {k.replace("head.original_module.", "head."): v
                           for k, v in base.state_dict().items() if "original_module" in k})
    loaded = PeftModel.from_pretrained(fresh, str(adapter)).eval()
    x = torch.randn(4, 1, cfg.image_size, cfg.image_size)
    from safetensors.torch import load_file
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and all("lora_" in k or "head" in k for k in saved)
    with torch.no_grad():
        out = loaded(x)
    assert out.shape == (4, cfg.num_classes) and torch.isfinite(out).all()


def test_no_dp_run_completes(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), num_sites=2, num_server_rounds=1,
                    site_train_size=64, site_test_size=32, dp=False)
    summary = json.loads((simulate(cfg) / "summary.json").read_text())
    assert summary["privacy"]["dp"] is False
    assert all(s["epsilon"] == 0.0 for s in summary["sites"].values())
    # The simulated sites' policies allow non-DP rounds only because DP is off; such
    # rounds are not accounted, so no ledger entry is written.
    assert not list((tmp_path / summary["run_dir"].split("/")[-1] / "sites").glob("*/ledger/*"))
    assert summary["rounds"][0]["accuracy"] is not None
