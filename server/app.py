"""The fedadapt ServerApp: runs the rounds of a federation on Flower's Grid.

``run_federation`` reads top to bottom: start (or resume), then each round as the
named steps of :mod:`server.round` (configure, exchange, validate + aggregate,
evaluate, record, checkpoint), then cross-site evaluation, the final adapter and
``summary.json`` (:mod:`server.summary`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.messages import reply_state
from fedadapt.server import round as rounds
from fedadapt.server.cross_site import MAX_SITES, cross_site_eval
from fedadapt.server.progress import Progress
from fedadapt.server.report_hook import write_report
from fedadapt.server.round import Federation, RoundState
from fedadapt.server.rundir import new_run_dir, save_adapter
from fedadapt.server.summary import (StrategySection, Summary, WireSection, drift_section,
                                     privacy_section, timestamp, write_summary)
from fedadapt.strategies.wire import bytes_per_element


def cross_site(fed: Federation, st: RoundState) -> dict[str, Any] | None:
    """Every site's last local adapter and the global one at every site, if asked."""
    cfg = fed.cfg
    if not (cfg.cross_site_eval and st.last_local and len(st.log.sites) <= MAX_SITES):
        return None
    return cross_site_eval(fed.grid, fed.strategy, cfg.num_server_rounds, st.arrays,
                           st.last_local, fed.eval_config(cfg.num_server_rounds),
                           encode=fed.encode, timeout=cfg.round_timeout,
                           ok=lambda r: reply_state(r) == keys.STATE_OK)


def summarise(fed: Federation, st: RoundState, adapter: Path,
              cross: dict[str, Any] | None) -> Summary:
    """The run's :class:`Summary` (``summary.json``)."""
    cfg, strategy, log = fed.cfg, fed.strategy, st.log
    arrays = st.arrays.to_torch_state_dict()
    return Summary(
        run_dir=str(fed.run_dir), started=timestamp(fed.started),
        duration_s=round(time.time() - fed.started, 3), config=cfg.to_mapping(),
        privacy=privacy_section(cfg, log, strategy.site_level_report() if cfg.site_dp
                                else None, st.distributed.report() if st.distributed
                                else None),
        stopped_early=st.stopped, cross_site=cross,
        continual=st.tracker.section(fed.run_dir) if st.tracker is not None else None,
        strategy=StrategySection(name=cfg.strategy, exact_residual={
            str(k): v for k, v in getattr(strategy, "residuals", {}).items()}),
        sites=log.sites, rounds=[r.to_json() for r in log.rounds],
        wire=WireSection(tensor_names=sorted(log.wire_tensors),
                         num_tensors=len(log.wire_tensors), dtype=cfg.wire_dtype,
                         bytes_per_direction_per_site=sum(
                             a.numel() * (bytes_per_element(cfg.wire_dtype)
                                          if a.is_floating_point() else a.element_size())
                             for a in arrays.values())),
        adapter_dir=str(adapter.relative_to(fed.run_dir)), drift=drift_section(cfg, log))


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``cfg.num_server_rounds`` rounds of federated adapter training.

    Args:
        grid: Flower's Grid (simulation or deployment).
        cfg: The run config.
        run_dir: Where ``summary.json`` and the adapter go.

    Returns:
        The summary that was written to ``run_dir / "summary.json"``.
    """
    fed, st = rounds.start(grid, cfg, run_dir)
    progress = Progress(cfg.num_server_rounds, dp=cfg.dp)
    rounds.baseline(fed, st)  # continual: the initial model's scores (FWT)
    rounds.finish_unevaluated(fed, st, progress)  # a resume after a crash mid-round
    for rnd in range(st.first, cfg.num_server_rounds + 1):
        if not rounds.run_round(fed, st, rnd, progress):
            break  # every site's budget is spent
    cross = cross_site(fed, st)
    adapter = save_adapter(run_dir, cfg, ArrayRecord(
        {**fed.kept_a, **st.arrays.to_torch_state_dict()}) if fed.kept_a else st.arrays)
    summary = write_summary(run_dir, summarise(fed, st, adapter, cross))
    write_report(run_dir)
    progress.done(summary)
    return summary


def build_server_app(run_config: Mapping[str, Any] | None = None,
                     run_dir: Path | None = None) -> ServerApp:
    """A ServerApp; ``run_config`` overrides ``context.run_config`` (used by ``simulate``)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**context.run_config, **(run_config or {})})
        run_federation(grid, cfg, run_dir or (Path(cfg.resume_from) if cfg.resume_from
                                              else new_run_dir(cfg.out_dir)))

    return server_app


app = build_server_app()
