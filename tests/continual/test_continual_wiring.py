"""Continual learning wired into the apps: the site-side DP Fisher, the server's R matrix,
the run config's rules, and per-phase site data."""

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fedadapt.client.continual import dp_diagonal_fisher, normalised
from fedadapt.client.site import site_from_context
from fedadapt.continual.ewc import diagonal_fisher
from fedadapt import keys
from fedadapt.config import ConfigError, RunConfig
from fedadapt.server.continual import ContinualTracker, phase_scores


pytestmark = pytest.mark.usefixtures("task_identity")


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    data = TensorDataset(torch.randn(12, 5), torch.randint(0, 3, (12,)))
    return model, data


def test_dp_fisher_without_noise_or_clipping_is_the_empirical_fisher():
    model, data = _tiny()
    ref = diagonal_fisher(model, [data.tensors])
    got = dp_diagonal_fisher(model, data, clip_norm=1e9, noise_multiplier=0.0,
                             generator=torch.Generator().manual_seed(0))
    assert set(got) == set(ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-7)


def test_dp_fisher_clips_each_example_to_c_squared():
    model, data = _tiny()
    c = 1e-3
    got = dp_diagonal_fisher(model, data, clip_norm=c, noise_multiplier=0.0,
                             generator=torch.Generator().manual_seed(0))
    # each example contributes at most C² in total (Σ g_i² ≤ C²): the mean is ≤ C²
    total = sum(float(t.sum()) for t in got.values())
    assert 0 < total <= c ** 2 * (1 + 1e-6)


def test_dp_fisher_noise_is_calibrated_and_clamped():
    model, data = _tiny()
    clean = dp_diagonal_fisher(model, data, clip_norm=0.5, noise_multiplier=0.0,
                               generator=torch.Generator().manual_seed(0))
    noisy = dp_diagonal_fisher(model, data, clip_norm=0.5, noise_multiplier=2.0,
                               generator=torch.Generator().manual_seed(1))
    assert all((t >= 0).all() for t in noisy.values())
    diff = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    unclamped = diff[torch.cat([noisy[n].flatten() for n in clean]) > 0]
    # std of the noise on the mean: σ·C²/N = 2·0.25/12 ≈ 0.0417 (unclamped part is biased up)
    assert 0.02 < unclamped.abs().mean() < 0.1


def test_dp_fisher_per_tensor_is_the_tensor_mean_of_the_diagonal():
    model, data = _tiny()
    gen = torch.Generator().manual_seed(0)
    diag = dp_diagonal_fisher(model, data, clip_norm=0.5, noise_multiplier=0.0, generator=gen)
    block = dp_diagonal_fisher(model, data, clip_norm=0.5, noise_multiplier=0.0, generator=gen,
                               per_tensor=True)
    for n, t in diag.items():
        assert torch.allclose(block[n], torch.full_like(t, float(t.mean())), rtol=1e-6)


def test_dp_fisher_per_tensor_noise_is_one_draw_per_tensor():
    model, data = _tiny()
    clean = dp_diagonal_fisher(model, data, clip_norm=0.5, noise_multiplier=0.0,
                               generator=torch.Generator().manual_seed(0), per_tensor=True)
    noisy = dp_diagonal_fisher(model, data, clip_norm=0.5, noise_multiplier=2.0,
                               generator=torch.Generator().manual_seed(3), per_tensor=True)
    for n, t in noisy.items():  # constant within each tensor; noise σC²/(N·|t|) on it
        assert torch.unique(t).numel() == 1
        if float(t[(0,) * t.dim()]) > 0:
            dev = abs(float(t.flatten()[0] - clean[n].flatten()[0])) * 12 * t.numel()
            assert dev < 6 * 2.0 * 0.25  # within 6 standard deviations of σC²


def test_normalised_fisher_has_max_one_and_keeps_zeros():
    g = normalised({"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([[1.0, 2.0]])})
    assert torch.equal(g["a"], torch.tensor([0.0, 1.0]))
    assert torch.equal(g["b"], torch.tensor([[0.25, 0.5]]))
    assert all(float(t.abs().sum()) == 0 for t in normalised({"a": torch.zeros(3)}).values())


def _reply(accs: dict[int, tuple[float, int]]):
    m = MetricRecord({})
    for j, (a, n) in accs.items():
        m[keys.EVAL_ACC_PHASE.format(j)] = a
        m[keys.NUM_EXAMPLES_PHASE.format(j)] = n
    msg = Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type="evaluate")
    return Message(RecordDict({keys.METRICS: m}), reply_to=msg)


def test_phase_scores_weight_by_test_size():
    replies = [_reply({0: (1.0, 30), 1: (0.5, 10)}), _reply({0: (0.0, 10)})]
    assert phase_scores(replies, 3) == [pytest.approx(0.75), pytest.approx(0.5), None]


def test_tracker_builds_r_bwt_and_heatmap(tmp_path):
    cfg = RunConfig(scenario="domain-incremental", phases=2, num_server_rounds=4, num_sites=1)
    t = ContinualTracker(cfg)
    t.evaluated(0, [_reply({0: (0.3, 10), 1: (0.4, 10)})])
    t.evaluated(1, [_reply({0: (0.5, 10), 1: (0.5, 10)})])  # mid-phase: ignored
    t.evaluated(2, [_reply({0: (0.9, 10), 1: (0.5, 10)})])
    t.evaluated(3, [_reply({0: (0.1, 10), 1: (0.1, 10)})])
    t.evaluated(4, [_reply({0: (0.6, 10), 1: (0.8, 10)})])
    sec = t.section(tmp_path)
    assert sec["R"] == [[0.9, 0.5], [0.6, 0.8]]
    assert sec["BWT"] == pytest.approx(-0.3) and sec["ACC"] == pytest.approx(0.7)
    assert sec["FWT"] == pytest.approx(0.5 - 0.4)
    assert (tmp_path / sec["heatmap"]).stat().st_size > 1000


@pytest.mark.parametrize("kw, fragment", [
    (dict(scenario="domain-incremental", phases=3, num_server_rounds=5), "multiple of 'phases'"),
    (dict(scenario="site-incremental", phases=3, num_server_rounds=3, num_sites=2), "num-sites"),
    (dict(scenario="site-incremental", phases=3, num_server_rounds=3, num_sites=3,
          continual="ewc", lora_rank=8, site_ranks="8,4,8"), "one LoRA rank"),
    (dict(continual="magic"), "'continual' must be one of"),
])
def test_continual_config_errors(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig(**kw)


def test_rounds_map_to_phases():
    cfg = RunConfig(scenario="domain-incremental", phases=3, num_server_rounds=6)
    assert [cfg.phase_of_round(r) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert RunConfig().phase_of_round(4) == 0


def test_site_data_follows_the_phase_domain():
    run = RunConfig(scenario="domain-incremental", phases=3, num_server_rounds=3, num_sites=2,
                    site_train_size=32, site_test_size=16).to_mapping()
    site = site_from_context(run, {"partition-id": 0, "num-partitions": 2})
    x0, x2 = site.datasets(0)[0].tensors[0], site.datasets(2)[0].tensors[0]
    assert not torch.allclose(x0, x2)
    assert torch.equal(site.datasets(1)[1].tensors[0], site.datasets(1)[1].tensors[0])
    si = RunConfig(scenario="site-incremental", phases=2, num_server_rounds=2, num_sites=2,
                   site_train_size=32, site_test_size=16).to_mapping()
    late = site_from_context(si, {"partition-id": 1, "num-partitions": 2})
    assert late.continual().join_phase(1) == 1 and late.continual().active_sites(0) == (0,)
