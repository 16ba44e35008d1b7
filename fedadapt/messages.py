"""The messages between the ServerApp and a site, typed, and their Flower records.

One frozen dataclass per kind of message; each converts itself to and from the Flower
records that travel (``ConfigRecord`` / ``MetricRecord`` / ``ArrayRecord`` in a
``RecordDict``) here and nowhere else, under the keys of :mod:`fedadapt.keys`. The wire
format is that of the keys: a site or server of an earlier version reads these records
and writes records these classes read (fields a peer may not send have defaults).

Server → site (the ``config`` ConfigRecord a strategy puts into each message):

* :class:`TrainConfig` — a training round (``ClientApp.train``);
* :class:`EvaluateConfig` — an evaluation (``ClientApp.evaluate``);
* :class:`FisherConfig` — the end-of-phase DP Fisher query (site-incremental EWC).

Site → server: :class:`TrainReply` (with a :class:`DriftReport` when the run monitors
drift), :class:`Refusal` (the budget guard said no),
:class:`Idle` (not this site's phase), :class:`EvaluateReply`, :class:`FisherReply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedadapt import keys


def _config(content: RecordDict) -> Mapping[str, Any]:
    rec = content.config_records.get(keys.CONFIG)
    return {} if rec is None else rec


def _with_digest(rec: ConfigRecord, digest: str) -> ConfigRecord:
    """``rec`` with the backbone checkpoint's sha256, when the run has one."""
    if digest:
        rec[keys.BACKBONE_SHA256] = digest
    return rec


# --- server → site ----------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """What the server asks of a site for one training round.

    Attributes:
        server_round: The 1-based round.
        local_epochs: Passes over the local data.
        lr: SGD learning rate.
        batch_size: Expected batch size (Poisson sampling: q = batch_size / N).
        dp_enabled: DP-SGD asked for (a site's policy may still refuse non-DP rounds).
        noise_multiplier: σ asked for (a site never trains with less than its floor).
        max_grad_norm: Per-sample clipping norm C.
        freeze_lora_a: FFA-LoRA: A stays at the shared seed and does not travel.
        wire_dtype: The dtype the site replies its tensors in.
        run_key: The federation run's name; the site keeps run state under it.
        phase: Continual scenarios: the 0-based phase of the round.
        proximal_mu: FedProx μ (set by Flower's FedProx strategy; 0 = off).
        backbone_sha256: sha256 of the server's ``backbone-path`` checkpoint; a site whose
            own copy differs refuses (``imaging.local.check_digest``); '' without one.
    """

    server_round: int
    local_epochs: int
    lr: float
    batch_size: int
    dp_enabled: bool
    noise_multiplier: float
    max_grad_norm: float
    freeze_lora_a: bool = False
    wire_dtype: str = "float32"
    run_key: str = ""
    phase: int = 0
    proximal_mu: float = 0.0
    backbone_sha256: str = ""

    def to_record(self) -> ConfigRecord:
        """The ``config`` ConfigRecord (``proximal-mu`` only when set: FedProx adds it)."""
        rec = ConfigRecord({
            keys.LOCAL_EPOCHS: self.local_epochs, keys.LR: self.lr,
            keys.BATCH_SIZE: self.batch_size, keys.DP_ENABLED: self.dp_enabled,
            keys.NOISE_MULTIPLIER: self.noise_multiplier,
            keys.MAX_GRAD_NORM: self.max_grad_norm, keys.FREEZE_LORA_A: self.freeze_lora_a,
            keys.WIRE_DTYPE: self.wire_dtype, keys.RUN_KEY: self.run_key,
            keys.SERVER_ROUND: self.server_round, keys.PHASE: self.phase})
        if self.proximal_mu:
            rec[keys.PROXIMAL_MU] = self.proximal_mu
        return _with_digest(rec, self.backbone_sha256)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> TrainConfig:
        """Read a ``config`` record (a missing optional key takes its default)."""
        return cls(server_round=int(rec[keys.SERVER_ROUND]),
                   local_epochs=int(rec[keys.LOCAL_EPOCHS]), lr=float(rec[keys.LR]),
                   batch_size=int(rec[keys.BATCH_SIZE]),
                   dp_enabled=bool(rec[keys.DP_ENABLED]),
                   noise_multiplier=float(rec[keys.NOISE_MULTIPLIER]),
                   max_grad_norm=float(rec[keys.MAX_GRAD_NORM]),
                   freeze_lora_a=bool(rec.get(keys.FREEZE_LORA_A, False)),
                   wire_dtype=str(rec.get(keys.WIRE_DTYPE, "float32")),
                   run_key=str(rec.get(keys.RUN_KEY, "")), phase=int(rec.get(keys.PHASE, 0)),
                   proximal_mu=float(rec.get(keys.PROXIMAL_MU, 0.0)),
                   backbone_sha256=str(rec.get(keys.BACKBONE_SHA256, "")))

    @classmethod
    def from_message(cls, msg: Message) -> TrainConfig:
        return cls.from_record(msg.content[keys.CONFIG])


@dataclass(frozen=True)
class EvaluateConfig:
    """What the server sends with an evaluation (all optional for a site)."""

    server_round: int = 0
    freeze_lora_a: bool = False
    phase: int = 0
    backbone_sha256: str = ""

    def to_record(self) -> ConfigRecord:
        return _with_digest(ConfigRecord({keys.SERVER_ROUND: self.server_round,
                                          keys.FREEZE_LORA_A: self.freeze_lora_a,
                                          keys.PHASE: self.phase}), self.backbone_sha256)

    @classmethod
    def from_message(cls, msg: Message) -> EvaluateConfig:
        rec = _config(msg.content)
        return cls(server_round=int(rec.get(keys.SERVER_ROUND, 0)),
                   freeze_lora_a=bool(rec.get(keys.FREEZE_LORA_A, False)),
                   phase=int(rec.get(keys.PHASE, 0)),
                   backbone_sha256=str(rec.get(keys.BACKBONE_SHA256, "")))


@dataclass(frozen=True)
class FisherConfig:
    """The end-of-phase query for a site's DP diagonal Fisher (FedCurv-style)."""

    server_round: int
    phase: int
    dp_enabled: bool
    noise_multiplier: float
    freeze_lora_a: bool = False
    backbone_sha256: str = ""

    def to_record(self) -> ConfigRecord:
        return _with_digest(ConfigRecord({
            keys.SERVER_ROUND: self.server_round, keys.PHASE: self.phase,
            keys.DP_ENABLED: self.dp_enabled, keys.NOISE_MULTIPLIER: self.noise_multiplier,
            keys.FREEZE_LORA_A: self.freeze_lora_a}), self.backbone_sha256)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> FisherConfig:
        return cls(server_round=int(rec[keys.SERVER_ROUND]), phase=int(rec[keys.PHASE]),
                   dp_enabled=bool(rec[keys.DP_ENABLED]),
                   noise_multiplier=float(rec[keys.NOISE_MULTIPLIER]),
                   freeze_lora_a=bool(rec.get(keys.FREEZE_LORA_A, False)))


def query_message(arrays: ArrayRecord, config: FisherConfig, *, node_id: int,
                  group_id: str) -> Message:
    """The Fisher query to ``node_id`` (Flower message type :data:`keys.QUERY_FISHER`)."""
    return Message(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config.to_record()}),
                   dst_node_id=node_id, message_type=keys.QUERY_FISHER, group_id=group_id)


def attach_fisher(messages: list[Message], fisher: ArrayRecord) -> None:
    """Send the server's running sum of DP Fishers with every train message."""
    for m in messages:
        m.content[keys.FISHER] = fisher


def received_fisher(msg: Message) -> ArrayRecord | None:
    """The running Fisher a train message carries, or None."""
    return msg.content.array_records.get(keys.FISHER)


# --- site → server ----------------------------------------------------------------------

def reply_state(reply: Message) -> str | None:
    """The site's reply state (``ok`` / ``refused`` / ``idle``), or None for an error or
    a reply without status."""
    if reply.has_error() or not reply.has_content() or keys.STATUS not in reply.content:
        return None
    return str(reply.content[keys.STATUS][keys.STATE])


def reply_site(reply: Message) -> str:
    """The name of the site that sent ``reply``."""
    return str(reply.content[keys.STATUS][keys.SITE_ID])


def _reply(content: dict[str, Any], reply_to: Message) -> Message:
    return Message(content=RecordDict(content), reply_to=reply_to)


@dataclass(frozen=True)
class DriftReport:
    """What a site's drift monitor releases for one round (``client.drift_monitor``).

    Attributes:
        alert: Whether any test rejected at its share of the run's ``drift-alpha``.
        mmd_p: MMD permutation p-value of the frozen-backbone embeddings.
        ks_p: Smallest Benjamini-Hochberg adjusted per-dimension KS p-value.
        pred_p: p-value of the predicted-class distribution test.
        reference_round: The round the site built its reference window at; in that round
            nothing is tested (every p-value 1, no alert).
    """

    alert: bool
    mmd_p: float
    ks_p: float
    pred_p: float
    reference_round: int

    def metrics(self) -> dict[str, int | float]:
        return {keys.DRIFT_ALERT: int(self.alert), keys.DRIFT_MMD_P: self.mmd_p,
                keys.DRIFT_KS_P: self.ks_p, keys.DRIFT_PRED_P: self.pred_p,
                keys.DRIFT_REFERENCE_ROUND: self.reference_round}

    @classmethod
    def from_metrics(cls, m: Mapping[str, Any]) -> DriftReport | None:
        """The report in a reply's metrics, or None when the site sent none."""
        if keys.DRIFT_ALERT not in m:
            return None
        return cls(alert=bool(int(m[keys.DRIFT_ALERT])), mmd_p=float(m[keys.DRIFT_MMD_P]),
                   ks_p=float(m[keys.DRIFT_KS_P]), pred_p=float(m[keys.DRIFT_PRED_P]),
                   reference_round=int(m[keys.DRIFT_REFERENCE_ROUND]))


@dataclass(frozen=True)
class TrainReply:
    """A site's trained update and what it cost (record-level ε of its own ledger).

    ``epsilon_cap``, ``lora_rank`` and ``accountant`` are None when the site (an earlier
    version) did not send them; ``drift`` is None unless the run monitors drift.
    """

    site_id: str
    arrays: ArrayRecord
    num_examples: int
    train_loss: float
    epsilon: float
    epsilon_round: float
    delta: float
    steps: int
    sample_rate: float
    partition_id: int
    noise_multiplier: float = 0.0
    epsilon_cap: float | None = None
    lora_rank: int | None = None
    accountant: str | None = None
    drift: DriftReport | None = None

    def metrics(self) -> dict[str, int | float]:
        """The ``metrics`` MetricRecord's content."""
        out: dict[str, int | float] = {
            keys.NUM_EXAMPLES: self.num_examples, keys.TRAIN_LOSS: self.train_loss,
            keys.EPSILON: self.epsilon, keys.EPSILON_ROUND: self.epsilon_round,
            keys.DELTA: self.delta}
        if self.epsilon_cap is not None:
            out[keys.EPSILON_CAP] = self.epsilon_cap
        out.update({keys.NOISE_MULTIPLIER: self.noise_multiplier, keys.STEPS: self.steps,
                    keys.SAMPLE_RATE: self.sample_rate, keys.PARTITION_ID: self.partition_id})
        if self.lora_rank is not None:
            out[keys.LORA_RANK] = self.lora_rank
        if self.drift is not None:
            out.update(self.drift.metrics())
        return out

    def status(self) -> dict[str, str]:
        """The ``status`` ConfigRecord's content."""
        out = {keys.SITE_ID: self.site_id, keys.STATE: keys.STATE_OK}
        if self.accountant is not None:
            out[keys.ACCOUNTANT] = self.accountant
        return out

    def to_message(self, reply_to: Message) -> Message:
        return _reply({keys.ARRAYS: self.arrays, keys.METRICS: MetricRecord(self.metrics()),
                       keys.STATUS: ConfigRecord(self.status())}, reply_to)

    @classmethod
    def from_records(cls, arrays: ArrayRecord, metrics: Mapping[str, Any],
                     status: Mapping[str, Any]) -> TrainReply:
        m = metrics
        return cls(site_id=str(status[keys.SITE_ID]), arrays=arrays,
                   num_examples=int(m[keys.NUM_EXAMPLES]), train_loss=float(m[keys.TRAIN_LOSS]),
                   epsilon=float(m[keys.EPSILON]), epsilon_round=float(m[keys.EPSILON_ROUND]),
                   delta=float(m[keys.DELTA]), steps=int(m[keys.STEPS]),
                   sample_rate=float(m[keys.SAMPLE_RATE]),
                   partition_id=int(m[keys.PARTITION_ID]),
                   noise_multiplier=float(m.get(keys.NOISE_MULTIPLIER, 0.0)),
                   epsilon_cap=float(m[keys.EPSILON_CAP]) if keys.EPSILON_CAP in m else None,
                   lora_rank=int(m[keys.LORA_RANK]) if keys.LORA_RANK in m else None,
                   accountant=(str(status[keys.ACCOUNTANT]) if keys.ACCOUNTANT in status
                               else None),
                   drift=DriftReport.from_metrics(m))

    @classmethod
    def from_message(cls, reply: Message) -> TrainReply:
        c = reply.content
        return cls.from_records(c[keys.ARRAYS], c[keys.METRICS], c[keys.STATUS])


@dataclass(frozen=True)
class Refusal:
    """The budget guard refused the round: no tensors, the reason, the budget's state."""

    site_id: str
    reason: str
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_cap: float
    budget_spent: bool
    partition_id: int

    def to_message(self, reply_to: Message) -> Message:
        status = ConfigRecord({
            keys.SITE_ID: self.site_id, keys.STATE: keys.STATE_REFUSED, keys.REASON: self.reason,
            keys.EPSILON_SPENT: self.epsilon_spent, keys.EPSILON_REMAINING: self.epsilon_remaining,
            keys.EPSILON_CAP: self.epsilon_cap, keys.BUDGET_SPENT: self.budget_spent})
        metrics = MetricRecord({keys.PARTITION_ID: self.partition_id,
                                keys.EPSILON: self.epsilon_spent})
        return _reply({keys.STATUS: status, keys.METRICS: metrics}, reply_to)

    @classmethod
    def from_message(cls, reply: Message) -> Refusal:
        s = reply.content[keys.STATUS]
        return cls(site_id=str(s[keys.SITE_ID]), reason=str(s[keys.REASON]),
                   epsilon_spent=float(s[keys.EPSILON_SPENT]),
                   epsilon_remaining=float(s[keys.EPSILON_REMAINING]),
                   epsilon_cap=float(s[keys.EPSILON_CAP]),
                   budget_spent=bool(s.get(keys.BUDGET_SPENT, False)),
                   partition_id=int(reply.content[keys.METRICS][keys.PARTITION_ID]))


@dataclass(frozen=True)
class Idle:
    """A site that does not train in this phase (continual site-incremental)."""

    site_id: str
    partition_id: int

    def to_message(self, reply_to: Message) -> Message:
        return _reply({keys.STATUS: ConfigRecord({keys.SITE_ID: self.site_id,
                                                  keys.STATE: keys.STATE_IDLE}),
                       keys.METRICS: MetricRecord({keys.PARTITION_ID: self.partition_id})},
                      reply_to)


@dataclass(frozen=True)
class PhaseScore:
    """Continual runs: the accuracy on one phase's test set and that set's size."""

    phase: int
    accuracy: float
    num_examples: int


@dataclass(frozen=True)
class EvaluateReply:
    """A site's evaluation of the global adapter on its held-out split.

    Attributes:
        scores: The task's further metrics by name (keys of :data:`keys.EVAL_METRICS`).
        phases: Continual runs: the accuracy on each phase's test set the site holds.
        loss_personal: With the site's personal tensors loaded (FedPer), or None.
        accuracy_personal: Likewise.
    """

    site_id: str
    num_examples: int
    loss: float
    accuracy: float
    partition_id: int
    scores: Mapping[str, float] = field(default_factory=dict)
    phases: tuple[PhaseScore, ...] = ()
    loss_personal: float | None = None
    accuracy_personal: float | None = None

    def metrics(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            keys.NUM_EXAMPLES: self.num_examples, keys.EVAL_LOSS: self.loss,
            keys.EVAL_ACC: self.accuracy, keys.PARTITION_ID: self.partition_id,
            **{keys.EVAL_METRICS[k]: v for k, v in self.scores.items()}}
        for p in self.phases:
            out[keys.EVAL_ACC_PHASE.format(p.phase)] = p.accuracy
            out[keys.NUM_EXAMPLES_PHASE.format(p.phase)] = p.num_examples
        if self.accuracy_personal is not None:
            out[keys.EVAL_LOSS_PERSONAL] = float(self.loss_personal or 0.0)
            out[keys.EVAL_ACC_PERSONAL] = self.accuracy_personal
        return out

    def to_message(self, reply_to: Message) -> Message:
        return _reply({keys.METRICS: MetricRecord(self.metrics()), keys.STATUS: ConfigRecord(
            {keys.SITE_ID: self.site_id, keys.STATE: keys.STATE_OK})}, reply_to)

    @staticmethod
    def phase_scores(reply: Message, num_phases: int) -> tuple[PhaseScore, ...]:
        """The phase scores alone of an evaluation reply (phases ``0..num_phases-1``)."""
        m = reply.content[keys.METRICS]
        return tuple(PhaseScore(j, float(m[keys.EVAL_ACC_PHASE.format(j)]),
                                int(m[keys.NUM_EXAMPLES_PHASE.format(j)]))
                     for j in range(num_phases) if keys.EVAL_ACC_PHASE.format(j) in m)

    @classmethod
    def from_message(cls, reply: Message, num_phases: int = 0) -> EvaluateReply:
        """Read an evaluation reply; ``num_phases``: how many phase scores to look for."""
        m = reply.content[keys.METRICS]
        phases = cls.phase_scores(reply, num_phases)
        personal = keys.EVAL_ACC_PERSONAL in m
        return cls(site_id=reply_site(reply), num_examples=int(m[keys.NUM_EXAMPLES]),
                   loss=float(m[keys.EVAL_LOSS]), accuracy=float(m[keys.EVAL_ACC]),
                   partition_id=int(m[keys.PARTITION_ID]),
                   scores={k: float(m[v]) for k, v in keys.EVAL_METRICS.items() if v in m},
                   phases=phases,
                   loss_personal=float(m[keys.EVAL_LOSS_PERSONAL]) if personal else None,
                   accuracy_personal=float(m[keys.EVAL_ACC_PERSONAL]) if personal else None)


@dataclass(frozen=True)
class FisherReply:
    """A site's DP diagonal Fisher of the phase that ended, and its ledger's ε after it."""

    site_id: str
    fisher: ArrayRecord
    num_examples: int
    epsilon: float
    epsilon_cap: float
    partition_id: int

    def to_message(self, reply_to: Message) -> Message:
        return _reply({
            keys.ARRAYS: self.fisher,
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: self.num_examples,
                                        keys.EPSILON: self.epsilon,
                                        keys.EPSILON_CAP: self.epsilon_cap,
                                        keys.PARTITION_ID: self.partition_id}),
            keys.STATUS: ConfigRecord({keys.SITE_ID: self.site_id, keys.STATE: keys.STATE_OK})},
            reply_to)

    @classmethod
    def from_message(cls, reply: Message) -> FisherReply:
        m = reply.content[keys.METRICS]
        return cls(site_id=reply_site(reply), fisher=reply.content[keys.ARRAYS],
                   num_examples=int(m[keys.NUM_EXAMPLES]), epsilon=float(m[keys.EPSILON]),
                   epsilon_cap=float(m[keys.EPSILON_CAP]),
                   partition_id=int(m[keys.PARTITION_ID]))
