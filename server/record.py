"""What the server saw during a run, kept per round and per site, for ``summary.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message

from fedadapt import keys
from fedadapt.messages import EvaluateReply, Refusal, TrainReply, reply_site


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in an ArrayRecord, as serialised on the wire."""
    return sum(len(array.data) for array in record.values())


@dataclass
class RoundLog:
    """One round: per-site training and evaluation metrics, bytes, refusals, failures."""

    round: int
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # by update validation

    def accuracy(self) -> float | None:
        """Evaluation accuracy weighted by each site's held-out size."""
        return self.weighted("accuracy")

    def weighted(self, metric: str) -> float | None:
        """``metric`` over the sites that report it, weighted by held-out size (the
        federation's Dice of a segmentation run is ``weighted("dice")``)."""
        ms = [m for m in self.evaluate.values() if metric in m]
        n = sum(m["num_examples"] for m in ms)
        if not n:
            return None
        return sum(m[metric] * m["num_examples"] for m in ms) / n

    def accuracy_personal(self) -> float | None:
        """As :meth:`accuracy`, with each site's personal tensors (None if none has them)."""
        ms = [m for m in self.evaluate.values() if "accuracy_personal" in m]
        n = sum(m["num_examples"] for m in ms)
        if not n:
            return None
        return sum(m["accuracy_personal"] * m["num_examples"] for m in ms) / n

    def to_json(self) -> dict[str, Any]:
        extra = {k: self.weighted(k) for k in keys.EVAL_METRICS
                 if any(k in m for m in self.evaluate.values())}
        return {"round": self.round, "train": self.train, "evaluate": self.evaluate,
                "accuracy": self.accuracy(), "accuracy_personal": self.accuracy_personal(),
                **extra,
                "bytes": {"down": self.bytes_down, "up": self.bytes_up,
                          "total": self.bytes_down + self.bytes_up},
                "refusals": self.refusals, "failures": self.failures,
                "rejected": self.rejected}


@dataclass
class RunLog:
    """All rounds of a run plus the names of every tensor that crossed the wire."""

    rounds: list[RoundLog] = field(default_factory=list)
    wire_tensors: set[str] = field(default_factory=set)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Per site, what its drift monitor reported each round it trained (``drift-monitor``).
    drift: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def new_round(self, rnd: int) -> RoundLog:
        self.rounds.append(RoundLog(rnd))
        return self.rounds[-1]

    def sent(self, log: RoundLog, messages: list[Message]) -> None:
        for msg in messages:  # the adapter, and any Fisher sum or SCAFFOLD correction
            self.wire_tensors.update(msg.content[keys.ARRAYS].keys())
            log.bytes_down += sum(payload_bytes(rec)
                                  for rec in msg.content.array_records.values())

    def site_of(self, reply: Message) -> str:
        return reply_site(reply)

    def trained(self, log: RoundLog, reply: Message) -> None:
        r = TrainReply.from_message(reply)
        self.wire_tensors.update(r.arrays.keys())
        log.bytes_up += payload_bytes(r.arrays)
        log.train[r.site_id] = {"loss": r.train_loss, "epsilon": r.epsilon,
                                "epsilon_round": r.epsilon_round, "delta": r.delta,
                                "steps": r.steps, "sample_rate": r.sample_rate,
                                "num_examples": r.num_examples,
                                "noise_multiplier": r.noise_multiplier}
        info = self.sites.setdefault(r.site_id, {"partition_id": r.partition_id})
        info.update(num_train=r.num_examples, epsilon=r.epsilon, delta=r.delta,
                    rounds_trained=info.get("rounds_trained", 0) + 1)
        if r.lora_rank is not None:  # heterogeneous ranks: the rank the site trained at
            info["lora_rank"] = r.lora_rank
        if r.epsilon_cap is not None:
            info.update(epsilon_cap=r.epsilon_cap, epsilon_remaining=r.epsilon_cap - r.epsilon)
        if r.accountant is not None:
            info["accountant"] = r.accountant
        if r.drift is not None:
            d = r.drift
            self.drift.setdefault(r.site_id, []).append({
                "round": log.round, "alert": d.alert, "tested": log.round > d.reference_round,
                "mmd_p": d.mmd_p, "ks_p": d.ks_p, "pred_p": d.pred_p,
                "reference_round": d.reference_round})

    def refused(self, log: RoundLog, reply: Message) -> bool:
        """Record a site's structured refusal; True if its budget is spent for good."""
        r = Refusal.from_message(reply)
        entry = {"site": r.site_id, "node_id": reply.metadata.src_node_id, "reason": r.reason,
                 "epsilon_spent": r.epsilon_spent, "epsilon_remaining": r.epsilon_remaining,
                 "epsilon_cap": r.epsilon_cap, "budget_spent": r.budget_spent}
        log.refusals.append(entry)
        info = self.sites.setdefault(r.site_id, {"partition_id": r.partition_id})
        info.setdefault("refused_from_round", log.round)
        info.update(epsilon=entry["epsilon_spent"], epsilon_cap=entry["epsilon_cap"],
                    epsilon_remaining=entry["epsilon_remaining"], refusal=entry["reason"])
        info.setdefault("rounds_trained", 0)
        return r.budget_spent

    def evaluated(self, log: RoundLog, reply: Message) -> None:
        r = EvaluateReply.from_message(reply)
        log.evaluate[r.site_id] = {"loss": r.loss, "accuracy": r.accuracy,
                                   "num_examples": r.num_examples}
        info = self.sites.setdefault(r.site_id, {"partition_id": r.partition_id})
        info.update(num_test=r.num_examples, final_accuracy=r.accuracy)
        for name, value in r.scores.items():  # Dice, balanced accuracy, AUC
            log.evaluate[r.site_id][name] = info[f"final_{name}"] = value
        if r.accuracy_personal is not None:  # the site's personal tensors over the global model
            log.evaluate[r.site_id].update(loss_personal=r.loss_personal,
                                           accuracy_personal=r.accuracy_personal)
            info["final_accuracy_personal"] = r.accuracy_personal

    def failed(self, log: RoundLog, reply: Message, stage: str) -> None:
        err = reply.error if reply.has_error() else None
        log.failures.append({"node_id": reply.metadata.src_node_id, "stage": stage,
                             "reason": f"{err.code}: {err.reason}" if err else "no content"})
