"""``fedadapt audit --empirical``: ε_lower (one-run canary audit) vs ε_claimed.

Options, config building, table and plot of the empirical audit; ``fedadapt.cmd_audit``
owns the ``audit`` command and calls ``run_empirical`` when ``--empirical`` is given.
The exit code is 1 when the lower bound exceeds the claim (the privacy claim is false
for the audited code path), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from typing import Any

from fedadapt import atomic
from fedadapt.config import RunConfig
from fedadapt.privacy.canaries import CANARY_TYPES
from fedadapt.privacy.empirical import BROKEN, STATEMENT, AuditConfig, AuditResult

_D = AuditConfig()
#: argparse dest of every empirical-only option (None when not given on the command line).
EMPIRICAL_ONLY = ("run_config", "site_dir", "partition_id", "canary", "canaries", "guesses",
                  "canary_scale", "confidence", "broken")
_CANARY_WORDS = {"dirac": "dirac (white-box gradient-space canaries on the head)",
                 "input": "input (black-box noise-image canaries, loss scores)"}


def add_empirical_args(p: argparse.ArgumentParser) -> None:
    """The empirical audit's options; all default to None so misuse can be detected."""
    g = p.add_argument_group("empirical audit (--empirical; Steinke, Nasr & Jagielski 2023)")
    g.add_argument("--empirical", action="store_true",
                   help="run a one-run canary audit of a site's training path instead of "
                   "reading ledgers")
    g.add_argument("--run-config", action="append", metavar="KEY=VALUE",
                   help="the site's run config, as for `flwr run --run-config` (repeatable; "
                   "e.g. noise-multiplier=2.0 num-server-rounds=3); unset keys keep the "
                   "defaults of [tool.flwr.app.config]")
    g.add_argument("--site-dir", metavar="DIR",
                   help="the site's folder (policy.toml, ledger/, site.toml if any): delta, "
                   "accountant and noise floor come from its policy")
    g.add_argument("--partition-id", type=int, metavar="N",
                   help="which site of the run config's federation (default: the one "
                   "site.toml names, else 0)")
    g.add_argument("--canary", choices=CANARY_TYPES,
                   help=f"canary type (default {_D.canary}: gradient-space Dirac canaries)")
    g.add_argument("--canaries", type=int, metavar="M",
                   help="m, canaries each included with probability 1/2 (default: half "
                   "of the head's h*(K-1) Dirac slots, the least-used ones; or 128 input "
                   "canaries)")
    g.add_argument("--guesses", type=int, metavar="R",
                   help="r, even: guesses (half in, half out; default about m/2)")
    g.add_argument("--canary-scale", type=float,
                   help=f"raw Dirac canary gradient norm in units of C (default "
                   f"{_D.canary_scale:g})")
    g.add_argument("--confidence", type=float,
                   help=f"confidence of the lower bound (default {_D.confidence})")
    g.add_argument("--broken", choices=BROKEN,
                   help="emulate broken wiring to test the audit: noise-zero, no-clip or "
                   "fixed-batch (the claim still assumes the configured mechanism)")


def parse_run_config(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` items (each may hold several, space-separated) to a mapping.

    Values are read as TOML (``2``, ``0.5``, ``true``, ``"x"``); anything else is a string.

    Raises:
        ValueError: On an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        for pair in item.split():
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"--run-config expects KEY=VALUE, got {pair!r} "
                                 f"(e.g. --run-config noise-multiplier=2.0)")
            try:
                out[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = raw
    return out


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """Build the audit of the site that the command line describes."""
    run = RunConfig.from_mapping(parse_run_config(args.run_config))
    audit: dict[str, Any] = {k: getattr(args, k) for k in
                             ("partition_id", "canary", "canaries", "guesses", "canary_scale",
                              "confidence", "broken") if getattr(args, k) is not None}
    from fedadapt.client.empirical import for_site  # torch/MONAI only when it runs

    return for_site(run, site_dir=args.site_dir, **audit)


def format_table(r: AuditResult) -> str:
    cfg = r.config
    run = cfg["run"]
    sigma = cfg["noise_multiplier_used"]
    mode = ("non-private" if not run["dp"] else
            f"DP-SGD sigma={sigma:g} C={run['max-grad-norm']:g}"
            + ("" if cfg["broken"] == "none" else f" BROKEN={cfg['broken']}"))
    claimed = "none (no DP)" if r.epsilon_claimed == float("inf") else f"{r.epsilon_claimed:.3f}"
    rows = [
        ("site", f"{r.site}" + (f" ({cfg['site_dir']})" if cfg["site_dir"] else "")),
        ("training", f"{mode}, {run['num-server-rounds']} round(s) x "
                     f"{run['local-epochs']} epoch(s), lr {run['lr']:g}"),
        ("canaries", _CANARY_WORDS[r.canary]),
        ("canaries m / guesses r / correct v", f"{r.canaries} / {r.guesses} / {r.correct}"),
        ("steps / sample rate q", f"{r.steps} / {r.sample_rate:.4f}"),
        (f"eps_lower (one-run, {cfg['confidence']:.0%}, delta={cfg['delta']:g})",
         f"{r.epsilon_lower:.3f}"),
        (f"eps_claimed ({cfg['accountant'].upper()} accountant)", claimed),
        ("audit ceiling (all r guesses right)", f"{r.epsilon_ceiling:.3f}"),
        ("AUROC", f"{r.auroc:.3f}"),
        ("TPR / FPR at the r/2 threshold", f"{r.tpr:.3f} / {r.fpr:.3f}"),
        ("eps_lower (TPR/FPR, Clopper-Pearson)", f"{r.epsilon_lower_tpr_fpr:.3f}"),
        ("verdict", "VIOLATION: eps_lower > eps_claimed" if r.violated
         else "consistent: eps_lower <= eps_claimed"),
    ]
    if run["dp"] and r.epsilon_ceiling <= r.epsilon_claimed:
        rows.append(("note", "eps_claimed >= the ceiling: this game cannot show a violation; "
                             "use a config with a smaller claim or more canaries"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def write_plot(r: AuditResult, path: str) -> None:
    """Histogram of included vs excluded canary scores (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(r.scores_in + r.scores_out), max(r.scores_in + r.scores_out), 41)
    ax.hist(r.scores_in, bins=bins, alpha=0.6, label=f"included ({len(r.scores_in)})")
    ax.hist(r.scores_out, bins=bins, alpha=0.6, label=f"excluded ({len(r.scores_out)})")
    ax.set_xlabel("canary score (update along the canary gradient)" if r.canary == "dirac"
                  else "canary score (label-centred loss decrease)")
    ax.set_ylabel("canaries")
    claimed = "none" if r.epsilon_claimed == float("inf") else f"{r.epsilon_claimed:.2f}"
    ax.set_title(f"{r.canary} canaries: eps_lower={r.epsilon_lower:.2f}  "
                 f"eps_claimed={claimed}  AUROC={r.auroc:.2f}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=100)
    plt.close(fig)


def run_empirical(args: argparse.Namespace) -> int:
    """Run the audit; print table or JSON; exit 1 when ε_lower > ε_claimed."""
    import warnings

    import torch

    cfg = config_from_args(args)  # bad input fails here, before any training
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    from fedadapt.client.empirical import run_audit

    result = run_audit(cfg)
    if args.plot:
        write_plot(result, args.plot)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_table(result))
        print()
        print(STATEMENT)
    if result.violated:
        print("fedadapt audit: the empirical lower bound on epsilon exceeds the claimed "
              "epsilon: the privacy claim does not hold for this code path", file=sys.stderr)
        return 1
    return 0
