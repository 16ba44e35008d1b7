"""Site training: only adapters and head move, DP steps match Poisson sampling, devices."""

import pytest
import torch

from fedadapt.client.train import evaluate, resolve_device, train
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import ModelSpec, build_model, load_trainable, trainable_state
from fedadapt.imaging.synthetic import default_sites, make_site_data
from fedadapt.privacy.dp import DPRequest
from fedadapt.simulations.runner import backend_config

SPEC = ModelSpec(image_size=16, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)


def _data(n=64):
    site = default_sites(1, n, 16, seed=0)[0]
    return make_site_data(site, image_size=16, num_classes=3, seed=0, site_index=0)


@pytest.mark.parametrize("dp", [None, DPRequest(noise_multiplier=1.0, max_grad_norm=1.0)])
def test_only_trainable_tensors_change(dp):
    model = build_model(SPEC)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable_state(model)
    train_set, test_set = _data()
    res = train(model, train_set, epochs=2, lr=0.05, batch_size=16, device=torch.device("cpu"),
                seed=1, dp=dp)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    after = trainable_state(model)
    assert set(after) == set(before)
    assert any(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n)
    assert res.num_examples == 64
    # Poisson sampling: q = 1 / len(loader) = 16 / 64; steps = epochs * len(loader)
    assert res.sample_rate == pytest.approx(0.25)
    assert res.steps == 8
    loss, acc = evaluate(model, test_set, batch_size=16, device=torch.device("cpu"))
    assert loss > 0 and 0 <= acc <= 1
    # Opacus hooks are removed: the model trains again without DP afterwards
    train(model, train_set, epochs=1, lr=0.05, batch_size=16, device=torch.device("cpu"), seed=2)


def test_load_trainable_is_strict():
    model = build_model(SPEC)
    state = trainable_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_trainable(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="shape mismatches"):
        load_trainable(model, {**state, name: torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        load_trainable(model, {**state, "encoder.patch_embedding.weight": torch.zeros(1)})


def test_same_spec_same_backbone():
    a, b = build_model(SPEC), build_model(SPEC)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_device_selection_and_resources():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
        res = backend_config(RunConfig(device="auto"), gpu_fraction=0.5)
        assert res["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_simulation_cpus_from_the_environment_or_the_affinity_mask(monkeypatch):
    import os

    from fedadapt.config import ConfigError
    from fedadapt.simulations.runner import SIMULATION_CPUS_ENV, simulate, simulation_cpus

    monkeypatch.setenv(SIMULATION_CPUS_ENV, "3")
    assert simulation_cpus() == 3
    assert backend_config(RunConfig(device="cpu"), gpu_fraction=0.5)["init_args"][
        "num_cpus"] == 3
    monkeypatch.delenv(SIMULATION_CPUS_ENV)
    assert simulation_cpus() == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(SIMULATION_CPUS_ENV, bad)
        with pytest.raises(ConfigError, match=f"{SIMULATION_CPUS_ENV} must be a positive"):
            simulation_cpus()
    with pytest.raises(ConfigError, match=SIMULATION_CPUS_ENV):  # before any run dir
        simulate(RunConfig(out_dir="/nonexistent/never-created"))


def test_empty_poisson_batches_are_noisy_steps():
    # 4 records, expected batch 1: q = 1/4, so about a third of the steps draw no record.
    model = build_model(SPEC)
    train_set, _ = _data(n=8)
    small = torch.utils.data.TensorDataset(*(t[:4] for t in train_set.tensors))
    before = trainable_state(model)
    res = train(model, small, epochs=5, lr=0.05, batch_size=1, device=torch.device("cpu"),
                seed=3, dp=DPRequest(noise_multiplier=1.0, max_grad_norm=1.0))
    assert res.steps == 20 and res.sample_rate == pytest.approx(0.25)
    after = trainable_state(model)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)
