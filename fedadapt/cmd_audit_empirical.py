"""Empirical privacy audit from the CLI: ε_lower (one-run canary audit) vs ε_claimed.

``add_empirical_args`` / ``run_empirical`` are shared by ``fedadapt audit --empirical``
(when the ledger-audit command exists) and by ``fedadapt audit-empirical``. The exit
code is 1 when the lower bound exceeds the claim (the privacy claim is false for the
audited code path), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from privacy.empirical import BROKEN, STATEMENT, AuditConfig, AuditResult, run_audit

_D = AuditConfig()


def add_empirical_args(p: argparse.ArgumentParser) -> None:
    """The empirical audit's options (defaults: the scenario in ``AuditConfig``)."""
    g = p.add_argument_group("empirical audit (Steinke, Nasr & Jagielski 2023)")
    g.add_argument("--canaries", type=int, default=_D.canaries,
                   help=f"m, canaries each included with probability 1/2 (default {_D.canaries})")
    g.add_argument("--guesses", type=int, default=_D.guesses,
                   help=f"r, guesses (half in, half out; default {_D.guesses})")
    g.add_argument("--confidence", type=float, default=_D.confidence,
                   help=f"confidence of the lower bound (default {_D.confidence})")
    g.add_argument("--rounds", dest="audit_rounds", type=int, default=_D.rounds,
                   help=f"rounds of site training (default {_D.rounds})")
    g.add_argument("--local-epochs", dest="audit_local_epochs", type=int,
                   default=_D.local_epochs, help=f"local epochs (default {_D.local_epochs})")
    g.add_argument("--lr", dest="audit_lr", type=float, default=_D.lr,
                   help=f"site learning rate (default {_D.lr})")
    g.add_argument("--noise-multiplier", dest="audit_noise_multiplier", type=float,
                   default=_D.noise_multiplier,
                   help=f"configured sigma (default {_D.noise_multiplier})")
    g.add_argument("--max-grad-norm", dest="audit_max_grad_norm", type=float,
                   default=_D.max_grad_norm, help=f"configured C (default {_D.max_grad_norm})")
    g.add_argument("--delta", dest="audit_delta", type=float, default=_D.delta,
                   help=f"delta (default {_D.delta})")
    g.add_argument("--audit-seed", type=int, default=_D.seed, help=f"seed (default {_D.seed})")
    g.add_argument("--broken", choices=BROKEN, default="none",
                   help="emulate broken wiring for testing the audit: noise-zero or no-clip "
                   "(the claim still uses the configured sigma)")
    g.add_argument("--no-dp", dest="audit_no_dp", action="store_true",
                   help="audit non-private training (shows the audit has power)")
    g.add_argument("--json", dest="audit_json", action="store_true",
                   help="print the result as JSON")
    g.add_argument("--plot", dest="audit_plot", metavar="FILE.png",
                   help="write a histogram of included vs excluded canary scores")


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    return AuditConfig(canaries=args.canaries, guesses=args.guesses,
                       confidence=args.confidence, rounds=args.audit_rounds,
                       local_epochs=args.audit_local_epochs, lr=args.audit_lr,
                       noise_multiplier=args.audit_noise_multiplier,
                       max_grad_norm=args.audit_max_grad_norm, delta=args.audit_delta,
                       seed=args.audit_seed, broken=args.broken, dp=not args.audit_no_dp)


def format_table(r: AuditResult) -> str:
    cfg = r.config
    mode = ("non-private" if not cfg["dp"] else
            f"DP-SGD sigma={cfg['noise_multiplier']} C={cfg['max_grad_norm']}"
            + ("" if cfg["broken"] == "none" else f" BROKEN={cfg['broken']}"))
    claimed = "none (no DP)" if r.epsilon_claimed == float("inf") else f"{r.epsilon_claimed:.3f}"
    rows = [
        ("training", mode),
        ("canaries m / guesses r / correct v", f"{r.canaries} / {r.guesses} / {r.correct}"),
        ("steps / sample rate q", f"{r.steps} / {r.sample_rate:.4f}"),
        (f"eps_lower (one-run, {cfg['confidence']:.0%}, delta={cfg['delta']:g})",
         f"{r.epsilon_lower:.3f}"),
        ("eps_claimed (RDP accountant)", claimed),
        ("AUROC", f"{r.auroc:.3f}"),
        ("TPR / FPR at the r/2 threshold", f"{r.tpr:.3f} / {r.fpr:.3f}"),
        ("eps_lower (TPR/FPR, Clopper-Pearson)", f"{r.epsilon_lower_tpr_fpr:.3f}"),
        ("verdict", "VIOLATION: eps_lower > eps_claimed" if r.violated
         else "consistent: eps_lower <= eps_claimed"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def write_plot(r: AuditResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = 30
    ax.hist(r.scores_in, bins=bins, alpha=0.6, label=f"included ({len(r.scores_in)})")
    ax.hist(r.scores_out, bins=bins, alpha=0.6, label=f"excluded ({len(r.scores_out)})")
    ax.set_xlabel("canary score (label-centred loss decrease)")
    ax.set_ylabel("canaries")
    ax.set_title(f"eps_lower={r.epsilon_lower:.2f}  eps_claimed={r.epsilon_claimed:.2f}  "
                 f"AUROC={r.auroc:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_empirical(args: argparse.Namespace) -> int:
    """Run the audit; print table or JSON; exit 1 when ε_lower > ε_claimed."""
    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    result = run_audit(config_from_args(args))
    if args.audit_plot:
        write_plot(result, args.audit_plot)
    if args.audit_json:
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedadapt audit-empirical`` to the CLI."""
    p = sub.add_parser("audit-empirical", help="empirical privacy audit: eps_lower vs eps_claimed",
                       description="One-run canary audit (Steinke, Nasr & Jagielski 2023) of a "
                       "site's real DP-SGD training path. " + STATEMENT)
    add_empirical_args(p)
    p.set_defaults(func=run_empirical)
