"""A site's budget: its policy, its ledger and the guard, in one place for the ClientApp.

Layout at the site: ``<site_dir>/policy.toml`` and ``<site_dir>/ledger/``. Given a
dataset identity (:class:`~fedadapt.identity.DatasetIdentity`), the budget is
kept per record in the dataset's format-2 ledger (``privacy.record_budget``); without one
it is the format-1 ledger ``<site>-<fp>.jsonl`` keyed by a fingerprint (older callers).
Opening fails closed: a missing/invalid policy or any corrupt ledger or manifest raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.guard import Decision, TrainRequest, check
from fedadapt.layout import ledger_dir, policy_path
from fedadapt.identity import DatasetIdentity
from fedadapt.privacy.ledger import Ledger, ledger_path
from fedadapt.privacy.policy import SitePolicy, load_policy
from fedadapt.privacy.record_budget import BudgetExceeded, RecordBudget, dataset_ledger_path
from fedadapt.privacy.record_groups import site_history

__all__ = ["BudgetExceeded", "RecordBudget", "SiteBudget", "open_site_budget"]


@dataclass(frozen=True)
class SiteBudget:
    """Policy + ledger of one site for one dataset."""

    site: str
    policy: SitePolicy
    ledger: Ledger

    def decide(self, request: TrainRequest, *, run_id: str) -> Decision:
        """Run the guard against the ledger's full history (all runs)."""
        entries = self.ledger.entries()
        rounds = sum(1 for e in entries if e["run_id"] == str(run_id))
        return check(self.policy, self.ledger.history(), request, rounds_this_run=rounds)

    def record(self, request: TrainRequest, *, run_id: str, round: int) -> float:
        """Append the trained round durably (before the update leaves); returns total ε.

        The cap is checked again under the ledger's lock, on the history as it is then
        (another run at the same site may have spent budget since ``decide``).

        Raises:
            BudgetExceeded: If the round would take the site past its cap; nothing is
                written and the update must not leave the site.
        """
        if request.noise_multiplier == 0:
            raise ValueError("a non-DP round has no ε to record; it is allowed only by "
                             "allow_non_dp and is not accounted (see the policy)")

        def checked(history: list[Mechanism]) -> float:
            eps = epsilon(history, delta=self.policy.delta, accountant=self.policy.accountant)
            if eps > self.policy.epsilon_cap:
                raise BudgetExceeded(
                    f"site {self.site}: recording this round would make epsilon {eps:.4g} "
                    f"exceed the cap {self.policy.epsilon_cap}; the update is withheld")
            return eps

        entry = self.ledger.append(
            run_id=run_id, round=round, noise_multiplier=request.noise_multiplier,
            sample_rate=request.sample_rate, steps=request.steps,
            clip_norm=request.clip_norm, delta=self.policy.delta,
            accountant=self.policy.accountant, epsilon=checked)
        return float(entry["epsilon"])

    def spent(self) -> float:
        """ε spent so far on this dataset (all runs)."""
        return epsilon(self.ledger.history(), delta=self.policy.delta,
                       accountant=self.policy.accountant)


def open_site_budget(site_dir: str | Path, site: str, data_fingerprint: str, *,
                     n_records: int, identity: DatasetIdentity | None = None
                     ) -> SiteBudget | RecordBudget:
    """Load the policy and open (and verify) the ledger(s); raises on any fault.

    Args:
        site_dir: The site's folder (``policy.toml``, ``ledger/``).
        site: The site's name (ledger file names).
        data_fingerprint: The training tensors' sha256 (format-1 ledgers only).
        n_records: Training records (the policy's δ bound 1/(10·N)).
        identity: The dataset's declared identity: the budget is then kept per record
            (format 2), composed with every ledger of the site.
    """
    site_dir = Path(site_dir)
    policy = load_policy(policy_path(site_dir), n_records=n_records)
    if identity is not None:
        folder = ledger_dir(site_dir)
        site_history(folder)  # verify every ledger and manifest now: fail closed
        return RecordBudget(site, policy, Ledger(dataset_ledger_path(
            folder, site, identity.dataset_id)), identity)
    ledger = Ledger(ledger_path(ledger_dir(site_dir), site, data_fingerprint))
    ledger.entries()  # verify the chain now: a corrupt ledger stops the site
    return SiteBudget(site, policy, ledger)
