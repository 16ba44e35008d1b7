"""A deployed site's folder: ``site.toml``, ``policy.toml``, ``ledger/``, ``data/``.

``init_site`` writes it (``fedadapt site init``); ``check_site`` is what ``fedadapt
site start`` runs before the SuperNode connects, so that a broken site fails at the
hospital, in front of its engineer, not in the middle of a federated round.
"""

from __future__ import annotations

import secrets
import textwrap
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedadapt import atomic
from fedadapt.deploy.site_config import (SiteConfig, SiteConfigError, load_site_config,
                                         write_site_config)
from fedadapt.layout import DATA_DIR, LEDGER_DIR, POLICY_TOML, SITE_TOML, SUPEREXEC_SECRET
from fedadapt.privacy.record_groups import site_history
from fedadapt.privacy.policy import SitePolicy, policy_from_dict


# What each policy field means, for the comments of a written policy.toml.
_POLICY_DOC = {
    "epsilon_cap": "Total record-level epsilon this site will ever spend on this dataset, "
                   "across all rounds, runs and federations.",
    "delta": "delta of every epsilon statement; at most 1/(10*N) for N training records. "
             "Leave it out to use 1/(10*N).",
    "min_noise_multiplier": "Noise floor: a round asking for a smaller DP-SGD noise "
                            "multiplier is refused.",
    "clip_norm_min": "Smallest per-sample clipping norm C the site accepts.",
    "clip_norm_max": "Largest per-sample clipping norm C the site accepts.",
    "accountant": "Privacy accountant: \"rdp\" (Mironov 2017) or \"prv\" (Gopi et al. 2021).",
    "max_rounds_per_run": "Most rounds this site trains in within one run.",
    "target_epsilon_per_round": "> 0: the site picks its own noise multiplier for this "
                                "epsilon per round (and uses the larger of it and the "
                                "server's); 0: off.",
    "target_epsilon_per_run": "> 0: the site picks its own noise multiplier so that "
                              "max_rounds_per_run rounds reach this epsilon (and uses "
                              "the larger of it and the server's); 0: off.",
    "allow_non_dp": "true only for research sites: rounds without DP-SGD are not covered "
                    "by any accountant.",
}


@dataclass(frozen=True)
class SiteFolder:
    """The paths of one site folder."""

    root: Path

    @property
    def site_toml(self) -> Path:
        return self.root / SITE_TOML

    @property
    def policy_toml(self) -> Path:
        return self.root / POLICY_TOML

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_DIR

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def superexec_secret(self) -> Path:
        return self.root / SUPEREXEC_SECRET


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{v}"' if isinstance(v, str) else repr(v)


def render_policy(values: dict[str, Any]) -> str:
    """A commented ``policy.toml`` for ``values`` (validated first).

    Every field of :class:`privacy.policy.SitePolicy` is written with its comment; δ is
    written only when given (else the site uses 1/(10·N) for its N training records).

    Raises:
        privacy.policy.PolicyError: If ``values`` is not a valid policy.
    """
    # n_records=1: validates every field now; δ ≤ 1/(10·N) is checked against the real
    # data size when the site opens its budget.
    policy = policy_from_dict(values, n_records=1)
    lines = ["# fedadapt site privacy policy. Owned by this site: the server can ask, never",
             "# decide. A missing or invalid policy stops the site from training.", ""]
    for f in fields(SitePolicy):
        doc = _POLICY_DOC.get(f.name, "See privacy/policy.py.")
        lines += textwrap.wrap(doc, 88, initial_indent="# ", subsequent_indent="# ")
        value = getattr(policy, f.name)
        if f.name == "delta" and "delta" not in values:
            lines.append("# delta = 1e-6")
        else:
            lines.append(f"{f.name} = {_toml(value)}")
        lines.append("")
    return "\n".join(lines)


def init_site(site_dir: str | Path, cfg: SiteConfig, policy: dict[str, Any], *,
              force: bool = False) -> SiteFolder:
    """Create a site folder: ``site.toml``, ``policy.toml``, ``ledger/``, ``data/`` and
    the SuperExec secret.

    Args:
        site_dir: The folder (created if needed).
        cfg: The site config to write.
        policy: Policy fields (``epsilon_cap`` at least), see ``privacy/policy.py``.
        force: Overwrite an existing ``site.toml``/``policy.toml``. The ledger is never
            touched: spent budget stays spent.

    Raises:
        SiteConfigError: If the folder already has a config or policy and not ``force``.
        privacy.policy.PolicyError: On an invalid policy.
    """
    folder = SiteFolder(Path(site_dir))
    existing = [p for p in (folder.site_toml, folder.policy_toml) if p.exists()]
    if existing and not force:
        raise SiteConfigError(f"{', '.join(map(str, existing))} already exist(s); this "
                              "folder is a site already. Edit the files, or pass --force to "
                              "rewrite them (the ledger is kept either way)")
    policy_text = render_policy(policy)  # validate before writing anything
    folder.root.mkdir(parents=True, exist_ok=True)
    write_site_config(folder.root, cfg)
    atomic.write_text(folder.policy_toml, policy_text)
    folder.ledger.mkdir(exist_ok=True)
    folder.data.mkdir(exist_ok=True)
    if not folder.superexec_secret.exists():
        atomic.write_text(folder.superexec_secret, secrets.token_hex(32), mode=0o600)
    return folder


def check_site(site_dir: str | Path) -> SiteConfig:
    """Everything ``fedadapt site start`` verifies before connecting (fails closed).

    Checks that ``site.toml`` is valid, its data file exists and a ``cuda`` device is
    there, that ``policy.toml``
    parses and is a valid policy, and that every ledger in ``ledger/`` has an intact
    hash chain and every record manifest its entries name is there and unaltered.

    Returns:
        The site config.

    Raises:
        SiteConfigError: On a missing/invalid config or data file or a missing ledger dir.
        privacy.policy.PolicyError: On a missing or invalid policy.
        privacy.ledger.LedgerError: On a corrupt ledger.
    """
    folder = SiteFolder(Path(site_dir))
    cfg = load_site_config(folder.root)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SiteConfigError(f"{folder.site_toml}: device = \"cuda\" but torch sees no "
                                  "CUDA device here; install a CUDA build of torch, or set "
                                  "device = \"auto\" or \"cpu\"")
    try:
        doc = tomllib.loads(folder.policy_toml.read_text())
    except FileNotFoundError as err:
        raise SiteConfigError(f"site privacy policy {folder.policy_toml} not found; the site "
                              "refuses to train without one (`fedadapt site init` writes "
                              "one)") from err
    except tomllib.TOMLDecodeError as err:
        raise SiteConfigError(f"site privacy policy {folder.policy_toml} is not valid "
                              f"TOML: {err}") from err
    policy_from_dict(doc, n_records=1)
    if not folder.ledger.is_dir():
        raise SiteConfigError(f"ledger folder {folder.ledger} not found; create it (mkdir) "
                              "or restore it from backup: it holds the budget this site "
                              "has already spent")
    site_history(folder.ledger)  # LedgerError on a broken chain or a bad record manifest
    return cfg
