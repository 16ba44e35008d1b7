"""Sending a round's messages and sorting out who answered (faults are recorded, not raised)."""

from __future__ import annotations

from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedadapt import keys
from fedadapt.config import RunConfig
from fedadapt.messages import reply_site
from fedadapt.server.record import RoundLog

ROUND_TIMEOUT_S = RunConfig.round_timeout  # the default of run config `round-timeout`


def exchange(grid: Grid, messages: list[Message], rlog: RoundLog, stage: str,
             node_sites: dict[int, str], timeout: float = ROUND_TIMEOUT_S) -> list[Message]:
    """Send ``messages``; return the replies that are not errors, record the others.

    A site that dies mid-round never replies. Flower's SuperLink answers in its place with
    an error (``NODE_UNAVAILABLE``) once the node has missed its heartbeats (every ~20 s,
    offline after 2 × 30 s in flwr 1.41, ``flwr/server/superlink/linkstate/utils.py``); a
    reply still missing after ``timeout`` (run config ``round-timeout``) is a failure too.
    Both go to ``rlog.failures`` with the node the message went to and that site's name
    when it has replied before (``node_sites``, which this fills from every site's status).
    """
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
           if m.metadata.message_id}  # the Grid sets message ids as it pushes
    answered, ok = set(), []
    for reply in replies:
        answered.add(reply.metadata.reply_to_message_id)
        node = dst.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():  # from the site's ClientApp, or from the SuperLink for it
            rlog.failures.append({"node_id": node, "site": node_sites.get(node),
                                  "stage": stage,
                                  "reason": f"{reply.error.code}: {reply.error.reason}"})
            continue
        if reply.has_content() and keys.STATUS in reply.content:
            node_sites[reply.metadata.src_node_id] = reply_site(reply)
        ok.append(reply)
    for mid, node in dst.items():
        if mid not in answered:
            rlog.failures.append({"node_id": node, "site": node_sites.get(node),
                                  "stage": stage,
                                  "reason": f"no reply within {timeout:g} s"})
    return ok


def go_on_without_dead_sites(strategy: Any, fewest: int) -> None:
    """Let later rounds go on with the sites that are online.

    ``build_strategy`` sets Flower's ``min_available_nodes`` to ``num-sites``, so a run
    starts only once every site has joined. Flower's ``sample_nodes`` waits for that many
    online nodes before every round, so a site that dies mid-run (its node marked offline)
    would stall the federation until it rejoins. Once a run's first round is configured,
    a round needs only ``fewest`` (min-train-sites) online sites.
    """
    while strategy is not None:
        if "min_available_nodes" in vars(strategy):
            strategy.min_available_nodes = fewest
        strategy = vars(strategy).get("inner")
