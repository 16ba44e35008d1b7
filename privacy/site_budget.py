"""A site's budget: its policy, its ledger and the guard, in one place for the ClientApp.

Layout at the site: ``<site_dir>/policy.toml`` and ``<site_dir>/ledger/<site>-<fp>.jsonl``.
Opening fails closed: a missing/invalid policy or a corrupt ledger raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from privacy.accounting import Mechanism, epsilon
from privacy.guard import Decision, TrainRequest, check
from privacy.ledger import Ledger, ledger_path
from privacy.policy import SitePolicy, load_policy


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
        """Append the trained round durably (before the update leaves); returns total ε."""
        history = [*self.ledger.history(),
                   Mechanism(request.noise_multiplier, request.sample_rate, request.steps)]
        eps = epsilon(history, delta=self.policy.delta, accountant=self.policy.accountant)
        if eps > self.policy.epsilon_cap:
            raise ValueError(f"refusing to record: epsilon {eps} exceeds cap "
                             f"{self.policy.epsilon_cap} (the guard was bypassed)")
        self.ledger.append(run_id=run_id, round=round, noise_multiplier=request.noise_multiplier,
                           sample_rate=request.sample_rate, steps=request.steps,
                           clip_norm=request.clip_norm, delta=self.policy.delta,
                           accountant=self.policy.accountant, epsilon=eps)
        return eps


def open_site_budget(site_dir: str | Path, site: str, data_fingerprint: str, *,
                     n_records: int) -> SiteBudget:
    """Load the policy and open (and verify) the ledger; raises on any fault."""
    site_dir = Path(site_dir)
    policy = load_policy(site_dir / "policy.toml", n_records=n_records)
    ledger = Ledger(ledger_path(site_dir / "ledger", site, data_fingerprint))
    ledger.entries()  # verify the chain now: a corrupt ledger stops the site
    return SiteBudget(site, policy, ledger)
