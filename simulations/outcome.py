"""Whether a finished run did its job, read from its ``summary.json``.

A run whose rounds all went by while one site failed in each of them (an exception in
its ClientApp, or no reply) did not federate that site: ``fedadapt simulate`` then
exits non-zero and names the site and the reason, instead of ending "done".
"""

from __future__ import annotations

from typing import Any, Mapping


def persistent_failures(summary: Mapping[str, Any]) -> list[str]:
    """One line per site that failed to train in every round of the run.

    A site is matched across rounds by its node id (its name is known only once it has
    replied); a site counts as failed in a round when the round's ``failures`` hold a
    ``train``-stage entry for its node. A refusal (budget spent, noise below the floor)
    is the site's decision, not a failure, and does not count.

    Args:
        summary: A parsed ``summary.json``.

    Returns:
        Messages naming the site (or node) and the last reason; empty when the run is fine.
    """
    rounds = summary.get("rounds") or []
    if not rounds:
        return []
    failed: list[dict[Any, dict[str, Any]]] = []
    for r in rounds:
        failed.append({f["node_id"]: f for f in r.get("failures", [])
                       if f.get("stage") == "train" and f.get("node_id") is not None})
    always = set(failed[0]).intersection(*failed[1:])
    out = []
    for node in sorted(always, key=str):
        last = failed[-1][node]
        who = f"site {last['site']} (node {node})" if last.get("site") else f"node {node}"
        out.append(f"{who} failed to train in all {len(rounds)} round(s); last reason: "
                   f"{_short(last.get('reason', '?'))}")
    return out


def _short(reason: str, limit: int = 600) -> str:
    """The end of a (traceback) reason, where the exception's message is."""
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= limit else "..." + reason[-limit:]
