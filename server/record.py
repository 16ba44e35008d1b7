"""What the server saw during a run, kept per round and per site, for ``summary.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message

from fedadapt import keys


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

    def new_round(self, rnd: int) -> RoundLog:
        self.rounds.append(RoundLog(rnd))
        return self.rounds[-1]

    def sent(self, log: RoundLog, messages: list[Message]) -> None:
        for msg in messages:
            rec = msg.content[keys.ARRAYS]
            self.wire_tensors.update(rec.keys())
            log.bytes_down += payload_bytes(rec)

    def site_of(self, reply: Message) -> str:
        return str(reply.content[keys.STATUS][keys.SITE_ID])

    def trained(self, log: RoundLog, reply: Message) -> None:
        rec = reply.content[keys.ARRAYS]
        self.wire_tensors.update(rec.keys())
        log.bytes_up += payload_bytes(rec)
        m = reply.content[keys.METRICS]
        site = self.site_of(reply)
        log.train[site] = {"loss": float(m[keys.TRAIN_LOSS]), "epsilon": float(m[keys.EPSILON]),
                           "epsilon_round": float(m[keys.EPSILON_ROUND]),
                           "delta": float(m[keys.DELTA]), "steps": int(m[keys.STEPS]),
                           "sample_rate": float(m[keys.SAMPLE_RATE]),
                           "num_examples": int(m[keys.NUM_EXAMPLES])}
        log.train[site]["noise_multiplier"] = float(m.get(keys.NOISE_MULTIPLIER, 0.0))
        info = self.sites.setdefault(site, {"partition_id": int(m[keys.PARTITION_ID])})
        info.update(num_train=int(m[keys.NUM_EXAMPLES]), epsilon=float(m[keys.EPSILON]),
                    delta=float(m[keys.DELTA]), rounds_trained=info.get("rounds_trained", 0) + 1)
        if keys.LORA_RANK in m:  # heterogeneous ranks: the rank the site trained at
            info["lora_rank"] = int(m[keys.LORA_RANK])
        if keys.EPSILON_CAP in m:
            cap = float(m[keys.EPSILON_CAP])
            info.update(epsilon_cap=cap, epsilon_remaining=cap - float(m[keys.EPSILON]))
        status = reply.content[keys.STATUS]
        if keys.ACCOUNTANT in status:
            info["accountant"] = str(status[keys.ACCOUNTANT])

    def refused(self, log: RoundLog, reply: Message) -> bool:
        """Record a site's structured refusal; True if its budget is spent for good."""
        status = reply.content[keys.STATUS]
        site = self.site_of(reply)
        spent = bool(status.get(keys.BUDGET_SPENT, False))
        entry = {"site": site, "node_id": reply.metadata.src_node_id,
                 "reason": str(status[keys.REASON]),
                 "epsilon_spent": float(status[keys.EPSILON_SPENT]),
                 "epsilon_remaining": float(status[keys.EPSILON_REMAINING]),
                 "epsilon_cap": float(status[keys.EPSILON_CAP]), "budget_spent": spent}
        log.refusals.append(entry)
        info = self.sites.setdefault(
            site, {"partition_id": int(reply.content[keys.METRICS][keys.PARTITION_ID])})
        info.setdefault("refused_from_round", log.round)
        info.update(epsilon=entry["epsilon_spent"], epsilon_cap=entry["epsilon_cap"],
                    epsilon_remaining=entry["epsilon_remaining"], refusal=entry["reason"])
        info.setdefault("rounds_trained", 0)
        return spent

    def evaluated(self, log: RoundLog, reply: Message) -> None:
        m = reply.content[keys.METRICS]
        site = self.site_of(reply)
        log.evaluate[site] = {"loss": float(m[keys.EVAL_LOSS]), "accuracy": float(m[keys.EVAL_ACC]),
                              "num_examples": int(m[keys.NUM_EXAMPLES])}
        info = self.sites.setdefault(site, {"partition_id": int(m[keys.PARTITION_ID])})
        info.update(num_test=int(m[keys.NUM_EXAMPLES]), final_accuracy=float(m[keys.EVAL_ACC]))
        for name, key in keys.EVAL_METRICS.items():  # Dice, balanced accuracy, AUC
            if key in m:
                log.evaluate[site][name] = info[f"final_{name}"] = float(m[key])
        if keys.EVAL_ACC_PERSONAL in m:  # the site's personal tensors over the global model
            log.evaluate[site].update(loss_personal=float(m[keys.EVAL_LOSS_PERSONAL]),
                                      accuracy_personal=float(m[keys.EVAL_ACC_PERSONAL]))
            info["final_accuracy_personal"] = float(m[keys.EVAL_ACC_PERSONAL])

    def failed(self, log: RoundLog, reply: Message, stage: str) -> None:
        err = reply.error if reply.has_error() else None
        log.failures.append({"node_id": reply.metadata.src_node_id, "stage": stage,
                             "reason": f"{err.code}: {err.reason}" if err else "no content"})
