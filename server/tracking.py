"""Optional experiment tracking of a run: TensorBoard scalars and MLflow metrics, per round.

Turned on from the run config (``tensorboard = true``, ``mlflow = true``; both off by
default). At the end of every round the ServerApp calls :func:`track_round`, which logs
what the server saw that round (``server.record.RoundLog``): each site's training loss,
ε (total and this round's, record-level, as the site reported it), evaluation loss and
accuracy; the accuracy weighted by held-out size; bytes sent down and up; and how many
sites trained, refused or failed. Nothing here is kept between calls: each call opens
its writer, appends the round and closes it, so a crash loses at most the last round.

* TensorBoard: event files in ``<run dir>/tensorboard/``; ``tensorboard --logdir
  <out_dir>`` shows every run side by side.
* MLflow: the local file store ``<out_dir>/mlruns`` (experiment ``fedadapt``, one MLflow
  run per fedadapt run, named after the run directory); ``mlflow ui --backend-store-uri
  <out_dir>/mlruns``. MLflow 3 keeps the file store in maintenance mode and refuses it
  unless ``MLFLOW_ALLOW_FILE_STORE=true``; asking for ``mlflow = true`` is taken as that
  opt-in for this process.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from fedadapt.config import RunConfig
from fedadapt.server.record import RoundLog

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_EXPERIMENT = "fedadapt"
_RUN_DIR_TAG = "fedadapt.run_dir"


class TrackingError(RuntimeError):
    """Tracking was asked for in the run config but cannot be done; says how to fix it."""


def round_scalars(log: RoundLog) -> dict[str, float]:
    """The scalars of one round, keyed ``<metric>/<site>`` or ``<group>/<name>``.

    Args:
        log: What the server recorded in the round.

    Returns:
        ``accuracy/weighted`` (when any site evaluated), ``accuracy/<site>``,
        ``eval_loss/<site>``, ``train_loss/<site>``, ``epsilon/<site>``,
        ``epsilon_round/<site>``, ``bytes/down``, ``bytes/up``, ``bytes/total``,
        ``sites/trained``, ``sites/evaluated``, ``sites/refused``, ``sites/failed``,
        ``sites/rejected``.
    """
    out: dict[str, float] = {}
    acc = log.accuracy()
    if acc is not None:
        out["accuracy/weighted"] = float(acc)
    for site, m in sorted(log.evaluate.items()):
        out[f"accuracy/{site}"] = float(m["accuracy"])
        out[f"eval_loss/{site}"] = float(m["loss"])
    for site, m in sorted(log.train.items()):
        out[f"train_loss/{site}"] = float(m["loss"])
        out[f"epsilon/{site}"] = float(m["epsilon"])
        out[f"epsilon_round/{site}"] = float(m["epsilon_round"])
    out["bytes/down"] = float(log.bytes_down)
    out["bytes/up"] = float(log.bytes_up)
    out["bytes/total"] = float(log.bytes_down + log.bytes_up)
    out["sites/trained"] = float(len(log.train))
    out["sites/evaluated"] = float(len(log.evaluate))
    out["sites/refused"] = float(len(log.refusals))
    out["sites/failed"] = float(len(log.failures))
    out["sites/rejected"] = float(len(log.rejected))
    return out


def track_round(cfg: RunConfig, run_dir: Path, log: RoundLog) -> None:
    """Append one finished round to the trackers the run config turns on.

    Args:
        cfg: The run config (``tensorboard``, ``mlflow``, the rest logged as MLflow params).
        run_dir: The run directory.
        log: The round just finished.

    Raises:
        TrackingError: If a tracker is on but its package is not installed.
    """
    if not (cfg.tensorboard or cfg.mlflow):
        return
    scalars = round_scalars(log)
    if cfg.tensorboard:
        _tensorboard(Path(run_dir) / TENSORBOARD_DIR, log.round, scalars)
    if cfg.mlflow:
        _mlflow(cfg, Path(run_dir), log.round, scalars)


def _missing(option: str, install: str) -> TrackingError:
    return TrackingError(
        f"run config '{option}' is true but the Python package '{option}' cannot be imported "
        f"in this environment; install it (pip install 'fedadapt[tracking]', or pip install "
        f"{install}) or set {option} = false")


def _tensorboard(log_dir: Path, step: int, scalars: dict[str, float]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's writer needs the tensorboard package
        raise _missing("tensorboard", "tensorboard") from err
    # One event file per round (suffix keeps names distinct); TensorBoard reads them all.
    writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=f".round{step:04d}")
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()


def _mlflow_key(tag: str) -> str:
    # MLflow names allow alphanumerics, _ - . space and /; a scenario's site name may not.
    return re.sub(r"[^\w\-. /]", "_", tag)


def _mlflow(cfg: RunConfig, run_dir: Path, step: int, scalars: dict[str, float]) -> None:
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise _missing("mlflow", "mlflow-skinny") from err
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the opt-in, see module doc
    store = (run_dir.parent / MLFLOW_DIR).resolve()
    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(MLFLOW_EXPERIMENT)
    key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()  # no quoting issues
    found = client.search_runs([exp_id], filter_string=f"tags.`{_RUN_DIR_TAG}` = '{key}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        params: list = []
    else:
        run_id = client.create_run(exp_id, run_name=run_dir.name,
                                   tags={_RUN_DIR_TAG: key}).info.run_id
        params = [Param(k, str(v)) for k, v in sorted(cfg.to_mapping().items())]
    now = int(time.time() * 1000)
    metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    if step >= cfg.num_server_rounds:
        client.set_terminated(run_id)
