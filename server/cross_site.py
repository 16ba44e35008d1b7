"""Cross-site evaluation (as NVIDIA FLARE does): every model on every site's test split.

After the last round, the global adapter and each site's own last locally trained
adapter (the update it sent, a DP-SGD output already accounted in its ledger) are each
sent to every site for evaluation on its held-out split. The result is a
(1 + K) × K accuracy matrix: row ``global`` and one row per site's local model.
"""

from __future__ import annotations

from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedadapt.messages import EvaluateReply

MAX_SITES = 16  # (1 + K)·K evaluations: skipped above this many sites


def cross_site_eval(grid: Grid, strategy: Strategy, rnd: int, global_arrays: ArrayRecord,
                    local: dict[str, ArrayRecord], config: ConfigRecord, *,
                    encode: Any, timeout: float, ok: Any) -> dict[str, Any]:
    """Evaluate the global and each site's local adapter at every site.

    Args:
        grid: Flower's Grid.
        strategy: The run's strategy (its ``configure_evaluate`` addresses the sites).
        rnd: The last round (for message configuration).
        global_arrays: The final global adapter.
        local: Site name → the adapter it sent in its last training round.
        config: The evaluate ConfigRecord of the last round.
        encode: The wire encoder for outgoing messages (16-bit transport).
        timeout: Seconds to wait for the replies of one model.
        ok: Predicate for a successful reply.

    Returns:
        ``{"models": [...], "sites": [...], "accuracy": [[...]]}`` (None where a site
        did not answer).
    """
    models = {"global": global_arrays, **{f"local:{s}": a for s, a in sorted(local.items())}}
    scores: dict[str, dict[str, float]] = {}
    for name, arrays in models.items():
        replies: Iterable[Message] = grid.send_and_receive(
            encode(strategy.configure_evaluate(rnd, arrays, config, grid)), timeout=timeout)
        scores[name] = {e.site_id: e.accuracy for e in
                        (EvaluateReply.from_message(r) for r in replies if ok(r))}
    sites = sorted({s for row in scores.values() for s in row})
    return {"models": list(models), "sites": sites,
            "accuracy": [[scores[m].get(s) for s in sites] for m in models]}
