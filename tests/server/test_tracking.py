"""server.tracking: TensorBoard event files and MLflow metrics per round, read back."""

from __future__ import annotations

import sys

import pytest

from fedadapt.config import RunConfig
from fedadapt.server.record import RoundLog
from fedadapt.server.tracking import TrackingError, round_scalars, track_round


def _round(rnd: int) -> RoundLog:
    log = RoundLog(rnd, bytes_down=1000 * rnd, bytes_up=800 * rnd)
    log.train = {
        "hospital-a": {"loss": 1.0 / rnd, "epsilon": 0.5 * rnd, "epsilon_round": 0.5},
        "hospital-b": {"loss": 2.0 / rnd, "epsilon": 0.7 * rnd, "epsilon_round": 0.7},
    }
    log.evaluate = {
        "hospital-a": {"loss": 0.9, "accuracy": 0.5 + 0.1 * rnd, "num_examples": 30},
        "hospital-b": {"loss": 1.1, "accuracy": 0.25, "num_examples": 10},
    }
    log.refusals = [{"site": "hospital-c", "reason": "budget: spent"}]
    return log


def test_round_scalars_exact():
    s = round_scalars(_round(2))
    assert s["accuracy/weighted"] == pytest.approx((0.7 * 30 + 0.25 * 10) / 40)
    assert s["accuracy/hospital-a"] == pytest.approx(0.7)
    assert s["eval_loss/hospital-b"] == 1.1
    assert s["train_loss/hospital-b"] == 1.0
    assert s["epsilon/hospital-a"] == 1.0
    assert s["epsilon_round/hospital-b"] == 0.7
    assert (s["bytes/down"], s["bytes/up"], s["bytes/total"]) == (2000.0, 1600.0, 3600.0)
    assert (s["sites/trained"], s["sites/evaluated"], s["sites/refused"],
            s["sites/failed"], s["sites/rejected"]) == (2.0, 2.0, 1.0, 0.0, 0.0)


def test_no_round_accuracy_when_no_site_evaluated():
    assert "accuracy/weighted" not in round_scalars(RoundLog(1))


def test_off_by_default_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    track_round(RunConfig(out_dir=str(tmp_path)), run_dir, _round(1))
    assert list(run_dir.iterdir()) == []
    assert not (tmp_path / "mlruns").exists()


def test_tensorboard_event_files_hold_every_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = RunConfig(out_dir=str(tmp_path), num_server_rounds=2, tensorboard=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for rnd in (1, 2):
        track_round(cfg, run_dir, _round(rnd))
    events = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(round_scalars(_round(1)))
    assert {"accuracy/weighted", "epsilon/hospital-a", "epsilon/hospital-b",
            "bytes/total", "train_loss/hospital-a"} <= tags
    eps = [(e.step, e.value) for e in acc.Scalars("epsilon/hospital-b")]
    assert eps == [(1, pytest.approx(0.7)), (2, pytest.approx(1.4))]
    total = [(e.step, e.value) for e in acc.Scalars("bytes/total")]
    assert total == [(1, 1800.0), (2, 3600.0)]


def test_mlflow_file_store_one_run_per_fedadapt_run(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow (or mlflow-skinny) is optional")
    from mlflow.tracking import MlflowClient

    cfg = RunConfig(out_dir=str(tmp_path), num_server_rounds=2, mlflow=True)
    run_dir = tmp_path / "20260101-000000"
    run_dir.mkdir()
    for rnd in (1, 2):
        track_round(cfg, run_dir, _round(rnd))
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("fedadapt")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == run_dir.name
    assert run.info.status == "FINISHED"  # terminated after the last round
    assert run.data.params["num-server-rounds"] == "2"
    hist = client.get_metric_history(run.info.run_id, "epsilon/hospital-a")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.5), (2, 1.0)]


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    cfg = RunConfig(out_dir=str(tmp_path), mlflow=True)
    with pytest.raises(TrackingError, match="'mlflow' is true.*'mlflow' cannot be imported"
                       ".*pip install mlflow-skinny.*mlflow = false"):
        track_round(cfg, tmp_path, _round(1))
