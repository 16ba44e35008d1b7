"""Segmentation through the federation: ``fedadapt simulate --scenario`` on the real Flower
apps, UNETR + LoRA trained with DP-SGD (Opacus) on MONAI DiceCELoss at every site, Dice
per site and for the federation in ``summary.json`` and ``report.html``.

One tiny 2-D run (a synthetic hospital and a hospital reading NIfTI images and masks
from a datalist), run once for the module; a tiny 3-D round through the ClientApp's
handlers.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedadapt.client.app import handle_evaluate, handle_train
from fedadapt.client.budget import provision_simulated_sites
from fedadapt import keys
from fedadapt.cli import main
from fedadapt.cmd_simulate import _with_scenario
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, registry_base, trainable_state
from fedadapt.imaging.tasks import synthetic_segmentation
from fedadapt.privacy.audit import audit_ledger
from fedadapt.privacy.ledger import mechanism, read_entries
from fedadapt.imaging.run_spec import run_model_spec

SIGMA = 1.2


def _simulate(tmp: Path, scenario: str, *flags: str) -> tuple[Path, dict]:
    out = tmp / "runs"
    code = main(["simulate", "--scenario", scenario, "--rounds", "1", "--out", str(out),
                 "--device", "cpu", "--batch-size", "8", "--local-epochs", "1",
                 "--noise-multiplier", str(SIGMA), *flags])
    assert code == 0
    run_dir = next(out.iterdir())
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg2d")
    data = tmp / "nifti-site"
    data.mkdir()
    seg = synthetic_segmentation(24, 16, seed=5, noise=0.2)
    entries = []
    for i, (x, m) in enumerate(zip(*seg.tensors)):
        nib.save(nib.Nifti1Image(x[0].numpy(), np.eye(4)), str(data / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(m[0].numpy().astype("u1"), np.eye(4)),
                 str(data / f"mask{i}.nii.gz"))
        entries.append({"image": f"img{i}.nii.gz", "label": f"mask{i}.nii.gz"})
    (data / "datalist.json").write_text(json.dumps({"training": entries[:16],
                                                    "test": entries[16:]}))
    (tmp / "tiny-seg.toml").write_text("""
name = "tiny-seg"
task = "segmentation"
spatial_dims = 2
image_size = 16
num_classes = 2
seed = 3
[[site]]
name = "synthetic-hospital"
train_size = 16
test_size = 8
shift = { intensity_scale = 0.8, gamma = 1.2, noise_std = 0.1 }
[[site]]
name = "nifti-hospital"
datalist = "nifti-site/datalist.json"
image = { intensity = "normalize" }
""")
    return _simulate(tmp, str(tmp / "tiny-seg.toml"))


def test_dice_per_site_and_for_the_federation(run_2d):
    run_dir, summary = run_2d
    assert set(summary["sites"]) == {"synthetic-hospital", "nifti-hospital"}
    rnd = summary["rounds"][0]
    assert rnd["failures"] == [] and rnd["refusals"] == []
    for site, info in summary["sites"].items():
        assert info["num_train"] == 16 and info["num_test"] == 8
        assert 0.0 <= info["final_dice"] <= 1.0
        assert rnd["evaluate"][site]["dice"] == info["final_dice"]
    ev = rnd["evaluate"]
    assert rnd["dice"] == pytest.approx(sum(m["dice"] * m["num_examples"] for m in ev.values())
                                        / sum(m["num_examples"] for m in ev.values()))
    report = (run_dir / "report.html").read_text()
    assert "foreground Dice" in report and "final Dice" in report


def test_segmentation_model_and_wire(run_2d):
    _, summary = run_2d
    cfg = RunConfig.from_mapping(summary["config"])
    spec = run_model_spec(cfg)
    assert (spec.task, spec.spatial_dims, spec.backbone) == ("segmentation", 2, "unetr-2d")
    assert summary["config"]["backbone-weights"] == "random"  # UNETR has no shipped weights
    names = summary["wire"]["tensor_names"]
    assert names and all("lora_" in n or "out.conv.modules_to_save" in n for n in names)
    assert any("out.conv" in n for n in names)


def test_epsilon_is_opacus_rdp_of_the_round(run_2d):
    run_dir, summary = run_2d
    orders = RDPAccountant.DEFAULT_ALPHAS
    for site, info in summary["sites"].items():
        t = summary["rounds"][0]["train"][site]
        assert t["noise_multiplier"] == SIGMA and t["sample_rate"] == pytest.approx(8 / 16)
        assert t["steps"] == round(1 / t["sample_rate"])  # one epoch of Poisson batches
        eps, _ = get_privacy_spent(orders=orders, delta=info["delta"], rdp=compute_rdp(
            q=t["sample_rate"], noise_multiplier=SIGMA, steps=t["steps"], orders=orders))
        assert info["epsilon"] == pytest.approx(eps, rel=1e-9)
        ledgers = list((run_dir / "sites" / site / "ledger").glob("*.jsonl"))
        assert len(ledgers) == 1
        (entry,) = read_entries(ledgers[0])
        m = mechanism(entry)
        assert (m.noise_multiplier, m.sample_rate, m.steps) == (SIGMA, t["sample_rate"],
                                                                t["steps"])
        assert audit_ledger(ledgers[0]).to_dict()["eps_spent"] == pytest.approx(eps, rel=1e-9)


def test_saved_adapter_loads_onto_the_backbone(run_2d):
    run_dir, summary = run_2d
    spec = run_model_spec(RunConfig.from_mapping(summary["config"]))
    adapter = run_dir / summary["adapter_dir"]
    loaded = PeftModel.from_pretrained(registry_base(spec), str(adapter)).eval()
    reference = build_model(spec)
    set_peft_model_state_dict(reference, load_file(str(adapter / "adapter_model.safetensors")))
    reference.eval()
    fresh = build_model(spec).eval()  # the initial adapters: the trained ones differ
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = loaded(x)
        assert out.shape == (2, 2, 16, 16)
        torch.testing.assert_close(out, reference(x))
        assert not torch.allclose(out, fresh(x))


def test_3d_segmentation_round_at_a_site(tmp_path, task_identity):
    """A 16^3 UNETR round through the ClientApp's own handlers (guard, DP-SGD, ledger,
    Dice), without the Simulation Engine: the server side is the 2-D run's."""
    (tmp_path / "tiny-3d.toml").write_text("""
task = "segmentation"
spatial_dims = 3
image_size = 16
[[site]]
name = "a"
train_size = 8
test_size = 4
shift = { intensity_scale = 0.8, noise_std = 0.1, blur_sigma = 0.5 }
""")
    cfg, train_metrics, eval_metrics = site_round(tmp_path, tmp_path / "tiny-3d.toml", "a")
    spec = run_model_spec(cfg)
    assert (spec.spatial_dims, spec.backbone, spec.backbone_weights) == (3, "unetr-3d", "random")
    assert eval_metrics[keys.NUM_EXAMPLES] == 4
    assert 0.0 <= eval_metrics[keys.EVAL_METRICS["dice"]] <= 1.0


def site_round(tmp_path: Path, scenario: Path, site: str):
    """One DP round of scenario site 0 through ``handle_train`` then ``handle_evaluate``
    (batch 4, 1 epoch, σ = SIGMA); checks ε against Opacus' RDP accountant and the ledger.

    Returns:
        ``(run config, train MetricRecord, evaluate MetricRecord)``.
    """
    cfg = _with_scenario(RunConfig(device="cpu", batch_size=4, local_epochs=1,
                                   noise_multiplier=SIGMA, sites_dir=str(tmp_path / "sites")),
                         str(scenario), weights_given=False)
    provision_simulated_sites(cfg, tmp_path / "sites", [site])
    context = Context(run_id=1, node_id=1, node_config={keys.NODE_PARTITION_ID: 0},
                      state=RecordDict(), run_config=cfg.to_mapping())
    sent = ArrayRecord(trainable_state(build_model(run_model_spec(cfg))))
    train_cfg = ConfigRecord({
        keys.SERVER_ROUND: 1, keys.LOCAL_EPOCHS: 1, keys.LR: 0.05, keys.BATCH_SIZE: 4,
        keys.DP_ENABLED: True, keys.NOISE_MULTIPLIER: SIGMA, keys.MAX_GRAD_NORM: 1.0})
    reply = handle_train(Message(RecordDict({keys.ARRAYS: sent, keys.CONFIG: train_cfg}),
                                 dst_node_id=1, message_type="train"), context)
    assert reply.content[keys.STATUS][keys.STATE] == keys.STATE_OK
    m = reply.content[keys.METRICS]
    q, steps = float(m[keys.SAMPLE_RATE]), int(m[keys.STEPS])
    assert steps == round(1 / q)
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(orders=orders, delta=cfg.delta, rdp=compute_rdp(
        q=q, noise_multiplier=SIGMA, steps=steps, orders=orders))
    assert m[keys.EPSILON] == pytest.approx(eps, rel=1e-9)
    (ledger,) = (tmp_path / "sites" / site / "ledger").glob("*.jsonl")
    assert audit_ledger(ledger).to_dict()["eps_spent"] == pytest.approx(eps, rel=1e-9)
    trained = reply.content[keys.ARRAYS]
    assert trained.keys() == sent.keys()
    ev = handle_evaluate(Message(RecordDict({keys.ARRAYS: trained, keys.CONFIG: ConfigRecord(
        {keys.SERVER_ROUND: 1})}), dst_node_id=1, message_type="evaluate"), context)
    return cfg, m, ev.content[keys.METRICS]


def test_segmentation_refusals(tmp_path, capsys):
    # continual methods are classification-only; UNETR has no shipped checkpoint
    assert main(["simulate", "--scenario", "segmentation-2d", "--continual", "ewc"]) == 2
    assert "continual methods are classification-only" in capsys.readouterr().err
    assert main(["simulate", "--scenario", "segmentation-2d",
                 "--backbone-weights", "builtin"]) == 2
    assert "'unetr-2d' has none shipped" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "segmentation"\nimage_size = 24\n'
                   '[[site]]\nname = "a"\ntrain_size = 8\ntest_size = 4\n')
    assert main(["simulate", "--scenario", str(bad)]) == 2
    assert "image_size 24 is not a multiple of UNETR's patch size 16" in capsys.readouterr().err
    # flwr run: the run config must agree with the scenario it names
    with pytest.raises(ValueError, match="num_classes=2 but the run config has .*num-classes=3"):
        run_model_spec(RunConfig(scenario="segmentation-2d", backbone_weights="random"))
