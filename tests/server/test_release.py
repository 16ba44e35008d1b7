"""Release bundles: a real tiny DP run (Flower Simulation Engine) is released and
verified once per module; then each kind of file is tampered with in a copy and
``fedadapt release verify`` must name it and exit 2."""

import json
import shutil
import stat

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file, save_file

from fedadapt.cli import main
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import ModelSpec
from fedadapt.privacy.accounting import epsilon
from fedadapt.privacy.ledger import canonical, entry_hash
from fedadapt.privacy.record_budget import dataset_ledger_path
from fedadapt.server.provenance import wilson_interval
from fedadapt.server.release import MANIFEST, SIGNATURE, build_release, released_base
from fedadapt.server.release_verify import verify_release
from fedadapt.server.signing import generate_key
from fedadapt.simulations.runner import simulate

CFG = dict(num_sites=2, num_server_rounds=1, site_train_size=64, site_test_size=32,
           noise_multiplier=0.8, local_epochs=1, epsilon_cap=100.0, cross_site_eval=False)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    run_dir = simulate(RunConfig(out_dir=str(root / "runs"), **CFG))
    key = root / "keys" / "release.pem"
    assert main(["release", str(run_dir), "--out", str(root / "bundle"), "--key", str(key)]) == 0
    return run_dir, root / "bundle", key


def _copy(released, tmp_path):
    run_dir, bundle, key = released
    shutil.copytree(bundle, tmp_path / "bundle")
    shutil.copytree(run_dir / "sites", tmp_path / "sites")
    return tmp_path / "bundle", tmp_path / "sites", key


def _verify(bundle, sites, key, capsys):
    rc = main(["release", "verify", str(bundle), "--public-key", f"{key}.pub",
               "--ledgers", str(sites), "--no-rebuild-base"])
    return rc, capsys.readouterr().err


def test_wilson_interval_reference_values():
    # Brown, Cai & DasGupta (2001) / statsmodels proportion_confint(method="wilson")
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4901625, abs=1e-6), pytest.approx(0.9433178, abs=1e-6))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)


def test_release_verifies_and_records_provenance(released, capsys):
    run_dir, bundle, key = released
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["release", "verify", str(bundle), "--public-key", f"{key}.pub",
                 "--ledgers", str(run_dir / "sites")]) == 0
    assert "base model rebuilt" in capsys.readouterr().out
    m = json.loads((bundle / MANIFEST).read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert m["run"]["strategy"] == "fedavg" and m["run"]["config"] == summary["config"]
    assert m["versions"]["flwr"] == "1.41.0" and m["versions"]["opacus"] and m["versions"]["peft"]
    assert set(m["files"]) == {"README.md", "summary.json", "adapter/adapter_config.json",
                               "adapter/adapter_model.safetensors"}
    for site, info in summary["sites"].items():
        rec = m["sites"][site]
        (head,) = rec["ledgers"]
        ledger = run_dir / "sites" / site / "ledger" / head["file"]
        last = json.loads(ledger.read_text().splitlines()[-1])
        assert head["head_sha256"] == entry_hash(last)
        assert head["epsilon"] == pytest.approx(info["epsilon"], rel=1e-9)
        assert rec["num_train"] == info["num_train"] and rec["data_fingerprint_source"] == "recomputed"
        # per-record budgets (format 2): the ledger is named by the declared dataset id
        assert head["dataset_id"] and rec["dataset_id"] == head["dataset_id"]
        assert head["file"] == dataset_ledger_path(ledger.parent, site, head["dataset_id"]).name
    card = ModelCard.load(bundle / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model
    results = {r.dataset_name: r for r in card.data.eval_results}
    a = summary["sites"]["hospital-a"]
    r = results["hospital-a (held-out)"]
    assert r.metric_value == pytest.approx(a["final_accuracy"], abs=1e-6)
    lo, hi = wilson_interval(round(a["final_accuracy"] * a["num_test"]), a["num_test"])
    assert r.metric_args["ci95_low"] == pytest.approx(lo, abs=1e-6)
    assert r.metric_args["ci95_high"] == pytest.approx(hi, abs=1e-6)


def test_released_adapter_loads_with_peft(released):
    run_dir, bundle, _ = released
    m = json.loads((bundle / MANIFEST).read_text())
    spec = ModelSpec(**m["base_model"]["spec"])
    model = PeftModel.from_pretrained(released_base(spec), str(bundle / "adapter")).eval()
    saved = load_file(str(bundle / "adapter" / "adapter_model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[k.replace(".weight", ".default.weight")
                                           .replace(".bias", ".default.bias")], v)
                         for k, v in saved.items() if "lora_" in k)
    with torch.no_grad():
        out = model(torch.randn(2, 1, spec.image_size, spec.image_size))
    assert out.shape == (2, spec.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("target", ["README.md", "adapter/adapter_model.safetensors",
                                    "summary.json"])
def test_altered_file_is_named(released, tmp_path, capsys, target):
    bundle, sites, key = _copy(released, tmp_path)
    path = bundle / target
    if target.endswith(".safetensors"):
        t = load_file(str(path))
        name = sorted(t)[0]
        t[name] = t[name] + 1e-3
        save_file(t, str(path))
    else:
        path.write_text(path.read_text().replace("hospital-a", "hospital-z", 1))
    rc, err = _verify(bundle, sites, key, capsys)
    assert rc == 2 and f"{target}: sha256" in err


def test_altered_manifest_fails_signature(released, tmp_path, capsys):
    bundle, sites, key = _copy(released, tmp_path)
    m = json.loads((bundle / MANIFEST).read_text())
    m["sites"]["hospital-a"]["ledgers"][0]["epsilon"] = 0.5  # claim less spending
    (bundle / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    rc, err = _verify(bundle, sites, key, capsys)
    assert rc == 2 and f"{MANIFEST}/{SIGNATURE}: signature does not verify" in err


def test_altered_last_ledger_entry_is_named(released, tmp_path, capsys):
    bundle, sites, key = _copy(released, tmp_path)
    (ledger,) = (sites / "hospital-b" / "ledger").glob("*.jsonl")
    lines = ledger.read_text().splitlines()
    last = json.loads(lines[-1])
    last["time"] += 1.0  # chain and ε unaffected: only the release's anchor sees it
    ledger.write_text("\n".join([*lines[:-1], canonical(last).decode()]) + "\n")
    rc, err = _verify(bundle, sites, key, capsys)
    assert rc == 2 and f"ledger {ledger}" in err and "last entry at release was altered" in err
    assert "hospital-a" not in err


def test_ledger_grown_after_release_still_verifies(released, tmp_path):
    from fedadapt.privacy.accounting import Mechanism
    from fedadapt.privacy.ledger import locked, mechanism, read_entries, write_entry

    bundle, sites, key = _copy(released, tmp_path)
    (path,) = (sites / "hospital-a" / "ledger").glob("*.jsonl")
    with locked(path):  # a later round of the same records, as the site's budget writes it
        existing = read_entries(path)
        last = existing[-1]
        history = [*(mechanism(e) for e in existing), Mechanism(1.0, 0.5, 2)]
        write_entry(path, existing, {
            **{k: last[k] for k in ("v", "dataset_id", "manifest", "n_records", "delta",
                                    "accountant", "clip_norm")},
            "run_id": "later", "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.5,
            "steps": 2, "seq": last["seq"] + 1,
            "epsilon": epsilon(history, delta=last["delta"])})
    report = verify_release(bundle, ledgers=[sites], public_key=f"{key}.pub", rebuild_base=False)
    assert report.ok, report.problems


def test_wrong_key_fails(released, tmp_path, capsys):
    bundle, sites, _ = _copy(released, tmp_path)
    other = generate_key(tmp_path / "other.pem")
    rc, err = _verify(bundle, sites, other, capsys)
    assert rc == 2 and "signature does not verify" in err and "names signer" in err


def test_release_refuses_a_tampered_ledger_and_a_used_folder(released, tmp_path):
    run_dir, bundle, key = released
    with pytest.raises(ValueError, match="not empty"):
        build_release(run_dir, bundle, key_path=key)
    shutil.copytree(run_dir / "sites", tmp_path / "sites")
    (ledger,) = (tmp_path / "sites" / "hospital-a" / "ledger").glob("*.jsonl")
    entry = json.loads(ledger.read_text())
    entry["epsilon"] = 0.1
    ledger.write_text(canonical(entry).decode() + "\n")
    with pytest.raises(ValueError, match="fails its audit"):
        build_release(run_dir, tmp_path / "out", key_path=key, sites_dir=tmp_path / "sites")
    assert not (tmp_path / "out").exists()


def test_tta_cli_adapts_a_verified_release_and_refuses_a_tampered_one(released, tmp_path,
                                                                      capsys):
    bundle, sites, key = _copy(released, tmp_path)
    out = tmp_path / "norms.safetensors"
    assert main(["tta", str(bundle), "--synthetic-shift", "1,2.5,0.15,1.5,0.35", "--num", "32",
                 "--public-key", f"{key}.pub", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 32 and 0.0 <= report["accuracy_after"] <= 1.0
    assert load_file(str(out)) and all(".blocks." in k and ".norm" in k for k in load_file(str(out)))
    card = bundle / "README.md"
    card.write_text(card.read_text() + "\nextra claim\n")
    assert main(["tta", str(bundle), "--synthetic-shift", "1,2.5,0.15,1.5,0.35", "--num", "32",
                 "--public-key", f"{key}.pub"]) == 2
    err = capsys.readouterr().err
    assert "fails verification" in err and "README.md: sha256" in err
