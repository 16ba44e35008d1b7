"""A site's budget per record: the ledger of a declared dataset, accounted per record.

Layout at the site::

    <site_dir>/policy.toml
    <site_dir>/ledger/<site>-ds-<sha256(dataset_id)[:16]>.jsonl   # format 2
    <site_dir>/ledger/manifests/<sha256>.json                     # record manifests
    <site_dir>/ledger/<site>-<fingerprint[:16]>.jsonl             # format 1 (older)
    <site_dir>/ledger/site.lock                                   # one lock per site

A round is allowed only if, for every record it may touch, the composition of every
entry of *any* ledger of the site whose manifest contains that record (format-1 entries:
every record, ``privacy.record_groups``) plus this round stays within the cap. The
check is made again under the site's lock when the round is recorded, so concurrent
runs (processes) at one site cannot both pass it on a stale history.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedadapt.privacy.accounting import Mechanism
from fedadapt.privacy.guard import Decision, TrainRequest, check_groups
from fedadapt.identity import DatasetIdentity
from fedadapt.privacy.ledger import FORMAT, Ledger, locked, read_entries, write_entry
from fedadapt.privacy.manifests import ManifestStore
from fedadapt.privacy.policy import SitePolicy
from fedadapt.privacy.record_groups import (RecordGroup, Touch, group_epsilons, record_groups,
                                            site_history)

SITE_LOCK = "site"  # <ledger dir>/site.lock


class BudgetExceeded(RuntimeError):
    """A round would take a site's records past its ε cap."""


def dataset_ledger_path(ledger_dir: str | Path, site: str, dataset_id: str) -> Path:
    """The format-2 ledger of ``site`` for a declared dataset id."""
    digest = hashlib.sha256(dataset_id.encode()).hexdigest()[:16]
    return Path(ledger_dir) / f"{site}-ds-{digest}.jsonl"


@dataclass(frozen=True)
class RecordBudget:
    """Policy + the site's ledgers, accounted per record of one declared dataset."""

    site: str
    policy: SitePolicy
    ledger: Ledger
    identity: DatasetIdentity

    @property
    def ledger_dir(self) -> Path:
        return self.ledger.path.parent

    def _groups(self) -> tuple[list[Touch], list[RecordGroup]]:
        history = site_history(self.ledger_dir)
        return history, record_groups(self.identity.records, history)

    def decide(self, request: TrainRequest, *, run_id: str) -> Decision:
        """Run the guard for every record group of the dataset (all ledgers, all runs)."""
        history, groups = self._groups()
        rounds = sum(1 for t in history
                     if t.ledger == self.ledger.path and t.entry["run_id"] == str(run_id))
        return check_groups(self.policy, [[history[i].mechanism for i in g.entries]
                                          for g in groups], request, rounds_this_run=rounds)

    def record(self, request: TrainRequest, *, run_id: str, round: int) -> float:
        """Append the trained round durably, with its manifest; returns the largest ε of
        the dataset's records after it.

        Raises:
            BudgetExceeded: If, on the history as it is under the lock, a record would
                pass the cap; nothing is written and the update must not leave the site.
        """
        if request.noise_multiplier == 0:
            raise ValueError("a non-DP round has no ε to record; it is allowed only by "
                             "allow_non_dp and is not accounted (see the policy)")
        mech = Mechanism(request.noise_multiplier, request.sample_rate, request.steps)
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        store = ManifestStore(self.ledger_dir)
        digest = store.put(self.identity.records)  # durable before the entry naming it
        with locked(self.ledger_dir / SITE_LOCK), locked(self.ledger.path):
            history = site_history(self.ledger_dir, store)
            groups = record_groups(self.identity.records, history)
            eps = max(group_epsilons(groups, history, [mech], delta=self.policy.delta,
                                     accountant=self.policy.accountant))
            if eps > self.policy.epsilon_cap:
                raise BudgetExceeded(
                    f"site {self.site}: recording this round would make the epsilon of "
                    f"some records of dataset {self.identity.dataset_id!r} {eps:.4g}, over "
                    f"the cap {self.policy.epsilon_cap}; the update is withheld")
            entry = write_entry(self.ledger.path, read_entries(self.ledger.path), {
                "run_id": str(run_id), "round": int(round),
                "noise_multiplier": float(request.noise_multiplier),
                "sample_rate": float(request.sample_rate), "steps": int(request.steps),
                "clip_norm": float(request.clip_norm), "delta": float(self.policy.delta),
                "accountant": str(self.policy.accountant), "epsilon": float(eps),
                "v": FORMAT, "dataset_id": self.identity.dataset_id, "manifest": digest,
                "n_records": len(self.identity.records),
                "seq": sum(1 for t in history if not t.legacy)})
        return float(entry["epsilon"])

    def spent(self) -> float:
        """The largest ε of any record of the dataset so far (all ledgers, all runs)."""
        history, groups = self._groups()
        return max(group_epsilons(groups, history, delta=self.policy.delta,
                                  accountant=self.policy.accountant), default=0.0)

    def spent_by_group(self) -> list[tuple[RecordGroup, float]]:
        """Each record group of the dataset with its ε so far."""
        history, groups = self._groups()
        return list(zip(groups, group_epsilons(groups, history, delta=self.policy.delta,
                                               accountant=self.policy.accountant)))
