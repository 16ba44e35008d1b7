"""End-to-end one-run canary audits of the real site training path (tiny, CPU, seed 0).

The scenario is a site's run config shrunk to seconds on a CPU (``TINY``: 16-pixel
images, 8 real records, one round of 6 local epochs, σ=4, C=1) with the default game:
m=96 Dirac gradient canaries (half the head's slots) and r=48 guesses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from fedadapt.cli import main
from fedadapt.imaging.backbones import ModelSpec, build_model
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.audit_bounds import one_run_epsilon_lower
from fedadapt.privacy.canaries import (dirac_capacity, dirac_hooks, helmert, make_canaries,
                              public_feature_basis)
from fedadapt.privacy.policy import SitePolicy, write_policy

TINY = ["--run-config", "image-size=16 site-train-size=8 num-server-rounds=1 local-epochs=6 "
        "batch-size=16 noise-multiplier=4.0 backbone-weights=random seed=0"]


def _audit(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    code = main(["audit", "--empirical", "--json", *TINY, *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dirac_canary_gradient_is_exact() -> None:
    """Through Opacus' per-sample gradients: norm = scale, along v_k ⊗ u_j, zero on LoRA."""
    spec = ModelSpec(image_size=16, backbone_weights="random")
    model = build_model(spec)
    u, var = public_feature_basis(model, spec)
    assert torch.allclose(u.T @ u, torch.eye(spec.hidden_size), atol=1e-4)
    assert bool((var[1:] >= var[:-1]).all())  # least-used directions first
    can = make_canaries("dirac", 6, spec, norm=50.0, seed=0, basis=u)
    gsm = GradSampleModule(model)
    x = torch.cat([torch.randn(3, 1, 16, 16), can.data.tensors[0][:4]])
    y = torch.cat([torch.tensor([0, 1, 2]), can.data.tensors[1][:4]])
    with dirac_hooks(model, can):
        torch.nn.functional.cross_entropy(gsm(x), y).backward()
    sq = torch.zeros(7)
    for name, p in gsm.named_parameters():
        if p.requires_grad:
            gs = p.grad_sample.reshape(7, -1)
            sq += gs.pow(2).sum(1)
            if "lora_" in name:
                assert gs[3:].abs().max() == 0  # a canary touches only the head
            if name.endswith("head.modules_to_save.default.weight"):
                w = p.grad_sample
    assert sq[3:].sqrt().tolist() == pytest.approx([50.0] * 4, rel=1e-4)
    basis = helmert(3)
    for i in range(4):
        j, k = int(can.columns[i]), int(can.kinds[i])
        along = float(basis[k - 1] @ w[3 + i] @ u[:, j])
        assert along == pytest.approx(float(w[3 + i].norm()), rel=1e-6)
        assert along > 49.9


def test_correct_dp_path_is_consistent(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    png = tmp_path / "scores.png"
    code, out = _audit(capsys, "--plot", str(png))
    assert code == 0
    assert out["canary"] == "dirac"
    assert (out["canaries"], out["guesses"]) == (dirac_capacity(ModelSpec()) // 2, 48)
    assert out["violated"] is False
    assert 0 <= out["epsilon_lower"] <= out["epsilon_claimed"] < out["epsilon_ceiling"]
    assert out["epsilon_claimed"] == pytest.approx(epsilon(
        [Mechanism(4.0, out["sample_rate"], out["steps"])], delta=1e-5))
    assert out["epsilon_lower"] == pytest.approx(
        one_run_epsilon_lower(out["canaries"], out["guesses"], out["correct"],
                              delta=1e-5, confidence=0.95))
    assert len(out["scores_in"]) + len(out["scores_out"]) == out["canaries"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "does NOT prove" in out["statement"]


@pytest.mark.parametrize("broken", ["noise-zero", "no-clip"])
def test_broken_wiring_is_caught(capsys: pytest.CaptureFixture[str], broken: str) -> None:
    code, out = _audit(capsys, "--broken", broken)
    assert code == 1
    assert out["violated"] is True
    assert out["epsilon_lower"] > out["epsilon_claimed"] + 1.0
    assert out["correct"] == out["guesses"]
    assert out["auroc"] > 0.99


def test_non_private_training_gives_a_large_lower_bound(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _audit(capsys, "--run-config", "dp=false")
    assert code == 0  # no claim to violate
    assert out["epsilon_claimed"] is None
    assert out["epsilon_lower"] == pytest.approx(out["epsilon_ceiling"])  # all 48 right
    assert out["epsilon_lower"] > 2.5


def test_site_dir_policy_sets_delta_and_accountant(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    write_policy(tmp_path / "policy.toml", SitePolicy(epsilon_cap=50.0, delta=1e-4,
                                                      accountant="prv"))
    code, out = _audit(capsys, "--site-dir", str(tmp_path), "--canary", "input",
                       "--canaries", "32", "--guesses", "16")
    assert code == 0
    assert (out["canary"], out["canaries"], out["guesses"]) == ("input", 32, 16)
    assert out["config"]["accountant"] == "prv" and out["config"]["delta"] == 1e-4
    assert out["epsilon_claimed"] == pytest.approx(epsilon(
        [Mechanism(4.0, out["sample_rate"], out["steps"])], delta=1e-4, accountant="prv"))


@pytest.mark.parametrize("argv, fragment", [
    (["--empirical", "--run-config", "noise-multiplier"], "expects KEY=VALUE"),
    (["--empirical", "--run-config", "no-such-key=1"], "unknown run config key"),
    (["--empirical", "--run-config", "dp=false", "--broken", "no-clip"],
     "broken wiring only applies to DP training"),
    (["--empirical", *TINY, "--canaries", "500"], "holds at most 192"),
    (["--empirical", *TINY, "--canaries", "10", "--guesses", "12"], "guesses"),
    (["--empirical", "x.jsonl"], "reads no ledgers"),
    (["--broken", "noise-zero", "x.jsonl"], "--broken: option(s) of the empirical audit"),
    ([], "nothing to audit"),
    (["--empirical", "--site-dir", "/no/such/site"], "does not exist"),
])
def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                           fragment: str) -> None:
    assert main(["audit", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_site_policy_refusal_is_an_error(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    write_policy(tmp_path / "policy.toml", SitePolicy(epsilon_cap=50.0, delta=1e-4,
                                                      min_noise_multiplier=5.0))
    assert main(["audit", "--empirical", *TINY, "--site-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "would refuse round 1" in err and "below the site's floor 5.0" in err


def test_site_policy_target_raises_sigma_as_the_client_app_does(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_policy(tmp_path / "policy.toml", SitePolicy(epsilon_cap=50.0, delta=1e-4,
                                                      target_epsilon_per_round=0.5))
    code, out = _audit(capsys, "--site-dir", str(tmp_path), "--canaries", "8",
                       "--guesses", "4")
    assert code == 0
    sigma = out["config"]["noise_multiplier_used"]
    assert sigma > 4.0  # the site's own σ for ε = 0.5 per round, above the run's 4.0
    assert 0.48 < out["epsilon_claimed"] <= 0.5  # Opacus' σ search stops within 0.01


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")
def test_fixed_batch_emulation_swaps_poisson_sampling_out_and_back() -> None:
    """``--broken fixed-batch`` really trains on fixed-size batches, and only inside."""
    import fedadapt.client.train as site_train
    from fedadapt.client.train import train
    from fedadapt.privacy.dp import DPRequest, make_private
    from fedadapt.privacy.empirical import fixed_batches

    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 16, 16), torch.randint(0, 3, (40,)))
    sizes: list[int] = []
    model = build_model(ModelSpec(image_size=16, backbone_weights="random"))
    model.register_forward_pre_hook(lambda _m, a: sizes.append(len(a[0])))
    res = train(model, data, epochs=2, lr=0.1, batch_size=16, device=torch.device("cpu"),
                seed=0, dp=DPRequest(1.0, 1.0), wiring=fixed_batches)
    assert sizes == [16, 16, 8, 16, 16, 8]  # Poisson sampling would vary the sizes
    assert (res.steps, res.sample_rate) == (6, pytest.approx(1 / 3))
    assert site_train.make_private is make_private
