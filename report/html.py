"""A self-contained ``report.html`` (inline CSS, PNGs next to it; no external resources)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from fedadapt import atomic
from fedadapt.layout import REPORT_HTML, SUMMARY_JSON
from fedadapt.report.plots import DRIFT_PLOT, all_plots, score_name

REQUIRED = ("config", "sites", "rounds")
CAPTIONS = {
    "metrics": "Evaluation accuracy and loss per site over rounds",
    "epsilon": "Cumulative privacy loss ε per site over rounds (dotted: the site's cap)",
    "bytes": "Bytes sent per round",
    "cross_site": "Cross-site evaluation: each model on every site's test split",
    "continual": "Continual learning accuracy matrix",
}
CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
       "padding:3px 8px;text-align:right}th{background:#eee}img{max-width:100%}"
       ".warn{color:#a00}")


_EXTRA = {"dice": "Dice", "balanced_accuracy": "balanced accuracy", "auc": "AUC"}
_SCORE_LABEL = {"accuracy": "accuracy", "dice": "foreground Dice (segmentation)"}


class ReportError(ValueError):
    """The run directory or its ``summary.json`` cannot make a report."""


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Read and check ``run_dir/summary.json``; errors name the file and what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    path = run_dir / SUMMARY_JSON
    if not path.is_file():
        raise ReportError(f"{path} is missing: the run did not finish or this is not a run "
                          f"directory")
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err}); the run may have been cut off")
    if not isinstance(summary, dict):
        raise ReportError(f"{path} must hold a JSON object, got {type(summary).__name__}")
    missing = [k for k in REQUIRED if k not in summary]
    if missing:
        raise ReportError(f"{path} is partial: missing key(s) {', '.join(missing)}")
    if not isinstance(summary["rounds"], list) or not summary["rounds"]:
        raise ReportError(f"{path} has no rounds: 'rounds' must be a non-empty list")
    for i, r in enumerate(summary["rounds"]):
        if not isinstance(r, dict) or "round" not in r:
            raise ReportError(f"{path} is partial: rounds[{i}] has no 'round' number")
    return summary


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def render(summary: dict[str, Any], plots: dict[str, Path]) -> str:
    """The report's HTML; ``plots`` are referenced by file name relative to the report."""
    cfg = summary.get("config", {})
    priv = summary.get("privacy", {})
    last = summary["rounds"][-1]
    parts = [f"<h1>fedadapt run report</h1><p>Run {html.escape(str(summary.get('run_dir', '')))}"
             f", started {html.escape(str(summary.get('started', '?')))}, "
             f"{_fmt(summary.get('duration_s'))} s, {len(summary['rounds'])} round(s), "
             f"strategy {html.escape(str(summary.get('strategy', {}).get('name', '?')))}.</p>",
             f"<p>Final weighted {_SCORE_LABEL[score_name(summary)]}: "
             f"<b>{_fmt(last.get(score_name(summary)))}</b>. Privacy: "
             f"{'DP-SGD' if priv.get('dp') else 'no DP'}, "
             f"σ = {_fmt(priv.get('noise_multiplier'))}, accountant "
             f"{html.escape(str(priv.get('accountant', '?')))}.</p>"]
    sites = summary.get("sites", {})
    # The task's further metrics, where sites report them (Dice, balanced accuracy, AUC).
    extra = [m for m in _EXTRA if any(f"final_{m}" in i for i in sites.values())]
    parts.append("<h2>Sites</h2>" + _table(
        ["site", "train", "test", "final accuracy"] + [f"final {_EXTRA[m]}" for m in extra]
        + ["ε spent", "ε cap", "ε remaining", "δ", "rounds trained", "refused from round"],
        [[s, _fmt(i.get("num_train")), _fmt(i.get("num_test")), _fmt(i.get("final_accuracy"))]
         + [_fmt(i.get(f"final_{m}")) for m in extra] + [
          _fmt(i.get("epsilon")), _fmt(i.get("epsilon_cap")), _fmt(i.get("epsilon_remaining")),
          _fmt(i.get("delta")), _fmt(i.get("rounds_trained")),
          _fmt(i.get("refused_from_round"))] for s, i in sorted(sites.items())]))
    events = [(r["round"], kind, json.dumps(e)) for r in summary["rounds"]
              for kind in ("refusals", "failures", "rejected") for e in r.get(kind, [])]
    if events:
        parts.append("<h2 class=warn>Refusals, failures, rejected updates</h2>"
                     + _table(["round", "kind", "detail"], events))
    parts.append("<h2>Plots</h2>")
    for name, path in plots.items():
        if name.startswith(DRIFT_PLOT):
            continue  # in the drift panels below
        parts.append(f"<figure><img src=\"{html.escape(path.name)}\" alt=\"{name}\">"
                     f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>")
    for name in ("cross_site", "continual"):
        if name not in plots:
            parts.append(f"<p><i>{CAPTIONS[name]}: not recorded in this run.</i></p>")
    parts.append(_drift_panels(summary, plots))
    parts.append("<h2>Configuration</h2>" + _table(
        ["key", "value"], [[k, _fmt(v)] for k, v in sorted(cfg.items())]))
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>fedadapt report</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def _drift_panels(summary: dict[str, Any], plots: dict[str, Path]) -> str:
    """One panel per site: its drift monitor's p-values and alert, round by round."""
    drift = summary.get("drift")
    if not isinstance(drift, dict):
        return "<p><i>Drift monitor: off in this run.</i></p>"
    alerts = drift.get("alerts", [])
    out = [f"<h2{' class=warn' if alerts else ''}>Drift</h2><p>Each site tests a window of "
           f"{_fmt(drift.get('window'))} records against the reference it keeps; alert "
           f"level α = {_fmt(drift.get('alpha'))} per round (α/3 per test). "
           f"{len(alerts)} alert(s)"
           + (f"; injected shift {html.escape(str(drift['shift']))}" if drift.get("shift")
              else "") + ". Only these p-values and the alert left the sites "
           "(a known leak).</p>"]
    for site, entries in sorted(drift.get("sites", {}).items()):
        out.append(f"<h3>{html.escape(site)}</h3>" + _table(
            ["round", "alert", "MMD p", "KS p (BH)", "prediction p", "reference round"],
            [[e["round"], ("ALERT" if e["alert"] else "—") if e.get("tested") else
              "reference built", _fmt(e["mmd_p"]), _fmt(e["ks_p"]), _fmt(e["pred_p"]),
              e["reference_round"]] for e in entries]))
        path = plots.get(DRIFT_PLOT + site)
        if path is not None:
            out.append(f"<figure><img src=\"{html.escape(path.name)}\" alt=\"drift at "
                       f"{html.escape(site)}\"><figcaption>Drift p-values at "
                       f"{html.escape(site)}</figcaption></figure>")
    return "".join(out)


def build_report(run_dir: Path) -> Path:
    """Write the PNG plots and ``report.html`` into ``run_dir``; returns the HTML's path."""
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    plots = all_plots(summary, run_dir)
    out = run_dir / REPORT_HTML
    atomic.write_text(out, render(summary, plots))
    return out
