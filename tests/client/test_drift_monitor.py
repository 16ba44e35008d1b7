"""The site's drift monitor (client/drift_monitor.py) on the real model and data generator:
frozen-backbone embeddings, the reference kept at the site, the false-alarm rate over 20
rounds without shift, and the alert after an injected shift."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from scipy import stats

from fedadapt import keys
from fedadapt.client.drift import prediction_permutation_test
from fedadapt.client.drift_monitor import (MonitorConfig, current_window, embed, load_reference,
                                           monitor_round)
from fedadapt.client.site import site_from_context
from fedadapt.config import ConfigError, RunConfig
from fedadapt.imaging.backbones import build_model
from fedadapt.layout import DRIFT_DIR, DRIFT_REFERENCE
from fedadapt.messages import DriftReport, TrainReply

CPU = torch.device("cpu")
RUN = RunConfig(drift_monitor=True, device="cpu", site_train_size=16, site_test_size=8)


@pytest.fixture(scope="module")
def site_c():
    """hospital-c (blurred scanner, skewed label mix) of the default federation."""
    torch.set_num_threads(1)
    site = site_from_context(RUN.to_mapping(), {keys.NODE_PARTITION_ID: 2})
    return site, build_model(site.model_spec())


def test_embedding_is_the_frozen_backbone_and_predictions_the_model(site_c):
    site, model = site_c
    images = current_window(site, MonitorConfig(), 1)
    emb, pred = embed(model, images, device=CPU, batch_size=32)
    assert emb.shape == (64, site.model_spec().hidden_size) and pred.shape == (64,)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        with torch.no_grad():  # a trained-looking adapter and head
            g = torch.Generator().manual_seed(0)
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g))
        emb2, pred2 = embed(model, images, device=CPU, batch_size=32)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
    torch.testing.assert_close(emb2, emb)  # adapters off: the backbone alone
    assert (pred2 != pred).any()  # predictions are the received model's


def test_false_alarm_rate_over_20_rounds_without_shift(site_c, tmp_path):
    site, model = site_c
    alpha = 0.05
    cfg = MonitorConfig(alpha=alpha)
    reports = [monitor_round(site, model, cfg, rnd=r, run_key="run-1", site_dir=tmp_path)
               for r in range(1, 22)]
    assert reports[0] == DriftReport(False, 1.0, 1.0, 1.0, reference_round=1)
    tested = reports[1:]
    assert all(r.reference_round == 1 for r in tested) and len(tested) == 20
    alarms = sum(r.alert for r in tested)
    # Under no shift each round alarms with probability <= alpha: P(Bin(20, .05) >= 4) =
    # 0.016, so 3 is the bound; the fixed seeds give exactly this count.
    assert stats.binom.sf(3, 20, alpha) < 0.02
    assert alarms <= 3
    assert alarms == 0
    # each test alone holds its share alpha/3
    for name in ("mmd_p", "ks_p", "pred_p"):
        assert sum(getattr(r, name) <= alpha / 3 for r in tested) <= 2


def test_injected_shift_raises_the_alert_from_its_round(site_c, tmp_path):
    site, model = site_c
    cfg = MonitorConfig.from_run(RUN.replace(drift_shift="hospital-c:3"))
    assert cfg is not None and cfg.shifted(site, 3) and not cfg.shifted(site, 2)
    reports = [monitor_round(site, model, cfg, rnd=r, run_key="run-2", site_dir=tmp_path)
               for r in range(1, 5)]
    assert [r.alert for r in reports] == [False, False, True, True]
    assert all(r.mmd_p <= cfg.alpha / 3 and r.ks_p <= cfg.alpha / 3 for r in reports[2:])


def test_reference_is_kept_in_the_site_folder(site_c, tmp_path):
    site, model = site_c
    cfg = MonitorConfig(window=16)
    monitor_round(site, model, cfg, rnd=2, run_key="run-3", site_dir=tmp_path)
    path = tmp_path / DRIFT_DIR / "run-3" / DRIFT_REFERENCE
    images, emb, rnd = load_reference(path)
    assert rnd == 2 and images.shape[0] == emb.shape[0] == 16 * cfg.reference_factor
    assert not list(path.parent.glob("*.tmp*"))  # written atomically
    later = monitor_round(site, model, cfg, rnd=3, run_key="run-3", site_dir=tmp_path)
    assert later.reference_round == 2
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable.*move it away"):
        monitor_round(site, model, cfg, rnd=4, run_key="run-3", site_dir=tmp_path)
    with pytest.raises(ValueError, match="has no folder"):
        monitor_round(site, model, cfg, rnd=1, run_key="run-3", site_dir=None)


def test_prediction_permutation_test():
    g = torch.Generator().manual_seed(0)
    same = prediction_permutation_test(np.array([0, 1, 2] * 20), np.array([2, 1, 0] * 10),
                                       permutations=199, generator=g)
    moved = prediction_permutation_test(np.array([0, 1, 2] * 20), np.array([0] * 30),
                                        permutations=199, generator=g)
    assert same == 1.0 and moved == pytest.approx(1 / 200)
    with pytest.raises(ValueError, match="class indices"):
        prediction_permutation_test(np.array([]), np.array([1]), permutations=19, generator=g)


def test_drift_report_travels_in_the_train_reply():
    report = DriftReport(alert=True, mmd_p=0.004, ks_p=1e-9, pred_p=0.5, reference_round=1)
    reply = TrainReply(site_id="s", arrays=ArrayRecord(), num_examples=3, train_loss=0.1,
                       epsilon=1.0, epsilon_round=0.5, delta=1e-5, steps=2, sample_rate=0.5,
                       partition_id=0, drift=report)
    m = reply.metrics()
    assert m[keys.DRIFT_ALERT] == 1 and m[keys.DRIFT_KS_P] == 1e-9
    back = TrainReply.from_records(ArrayRecord(), m, reply.status())
    assert back.drift == report
    plain = TrainReply.from_records(ArrayRecord(), {k: v for k, v in m.items()
                                                    if not k.startswith("drift-")},
                                    reply.status())
    assert plain.drift is None


@pytest.mark.parametrize("mapping, fragment", [
    ({"drift-shift": "hospital-b:2"}, "empty unless 'drift-monitor' is true"),
    ({"drift-monitor": True, "drift-shift": "hospital-b"}, "'SITE:ROUND'"),
    ({"drift-monitor": True, "drift-shift": "hospital-b:0"}, "'SITE:ROUND'"),
    ({"drift-alpha": 0.0}, "'drift-alpha' must be a number in (0, 1)"),
    ({"drift-window": 4}, "'drift-window' must be an integer in 8..4096"),
])
def test_drift_config_errors(mapping, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(mapping)
    assert fragment in str(err.value)
