"""``fedadapt.messages``: each message kind to Flower records and back, on the old keys."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedadapt import keys
from fedadapt.messages import (EvaluateConfig, EvaluateReply, FisherConfig, FisherReply, Idle,
                               PhaseScore, Refusal, TrainConfig, TrainReply, reply_state)
from tests.flower_helpers import task_identity  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("task_identity")


def _request(config: ConfigRecord) -> Message:
    return Message(RecordDict({keys.CONFIG: config}), dst_node_id=1, message_type="train")


def _as_sent(reply: Message) -> Message:
    """A reply as the server sees it: its records only (no Flower metadata needed)."""
    return Message(reply.content, dst_node_id=0, message_type="train")


def test_train_config_keys_and_round_trip() -> None:
    cfg = TrainConfig(server_round=3, local_epochs=2, lr=0.1, batch_size=16, dp_enabled=True,
                      noise_multiplier=1.5, max_grad_norm=1.0, freeze_lora_a=True,
                      wire_dtype="bfloat16", run_key="run-abc", phase=1)
    rec = cfg.to_record()
    assert set(rec) == {keys.LOCAL_EPOCHS, keys.LR, keys.BATCH_SIZE, keys.DP_ENABLED,
                        keys.NOISE_MULTIPLIER, keys.MAX_GRAD_NORM, keys.FREEZE_LORA_A,
                        keys.WIRE_DTYPE, keys.RUN_KEY, keys.SERVER_ROUND, keys.PHASE}
    assert TrainConfig.from_message(_request(rec)) == cfg
    rec[keys.PROXIMAL_MU] = 0.01  # as Flower's FedProx adds it
    assert TrainConfig.from_record(rec).proximal_mu == 0.01
    # An older server sends no phase / wire dtype / run key / FFA flag: defaults.
    old = ConfigRecord({keys.SERVER_ROUND: 1, keys.LOCAL_EPOCHS: 1, keys.LR: 0.1,
                        keys.BATCH_SIZE: 8, keys.DP_ENABLED: False,
                        keys.NOISE_MULTIPLIER: 1.0, keys.MAX_GRAD_NORM: 1.0})
    got = TrainConfig.from_record(old)
    assert (got.phase, got.wire_dtype, got.run_key, got.freeze_lora_a) == (0, "float32", "", False)


def test_evaluate_and_fisher_configs() -> None:
    assert EvaluateConfig.from_message(_request(EvaluateConfig(4, True, 2).to_record())) == \
        EvaluateConfig(4, True, 2)
    assert EvaluateConfig.from_message(
        Message(RecordDict({}), dst_node_id=1, message_type="evaluate")) == EvaluateConfig()
    f = FisherConfig(2, 0, True, 1.2, True)
    assert FisherConfig.from_record(f.to_record()) == f


def test_train_reply_round_trip_and_wire_keys() -> None:
    arrays = ArrayRecord({"a.lora_B.weight": torch.ones(2, 2)})
    r = TrainReply(site_id="s0", arrays=arrays, num_examples=10, train_loss=0.5, epsilon=1.0,
                   epsilon_round=0.3, delta=1e-5, steps=4, sample_rate=0.25, partition_id=0,
                   noise_multiplier=1.1, epsilon_cap=8.0, lora_rank=4, accountant="rdp")
    msg = _as_sent(r.to_message(_request(ConfigRecord({}))))
    assert reply_state(msg) == keys.STATE_OK
    assert set(msg.content[keys.METRICS]) == {
        keys.NUM_EXAMPLES, keys.TRAIN_LOSS, keys.EPSILON, keys.EPSILON_ROUND, keys.DELTA,
        keys.EPSILON_CAP, keys.NOISE_MULTIPLIER, keys.STEPS, keys.SAMPLE_RATE,
        keys.PARTITION_ID, keys.LORA_RANK}
    back = TrainReply.from_message(msg)
    assert back == TrainReply(**{**r.__dict__, "arrays": back.arrays})
    assert list(back.arrays) == ["a.lora_B.weight"]
    # An older site sends no cap, rank or accountant.
    m = dict(r.metrics())
    for k in (keys.EPSILON_CAP, keys.LORA_RANK, keys.NOISE_MULTIPLIER):
        m.pop(k)
    old = TrainReply.from_records(arrays, m, {keys.SITE_ID: "s0", keys.STATE: keys.STATE_OK})
    assert (old.epsilon_cap, old.lora_rank, old.accountant, old.noise_multiplier) == \
        (None, None, None, 0.0)


def test_refusal_idle_evaluate_and_fisher_replies() -> None:
    req = _request(ConfigRecord({}))
    ref = Refusal("s1", "over the cap", 7.5, 0.5, 8.0, True, 1)
    msg = _as_sent(ref.to_message(req))
    assert reply_state(msg) == keys.STATE_REFUSED and Refusal.from_message(msg) == ref
    assert msg.content[keys.METRICS][keys.EPSILON] == 7.5
    assert reply_state(_as_sent(Idle("s2", 2).to_message(req))) == keys.STATE_IDLE
    ev = EvaluateReply("s0", 20, 0.7, 0.8, 0, scores={"auc": 0.9},
                       phases=(PhaseScore(0, 0.8, 20), PhaseScore(1, 0.6, 10)),
                       loss_personal=0.6, accuracy_personal=0.85)
    msg = _as_sent(ev.to_message(req))
    m = msg.content[keys.METRICS]
    assert m[keys.EVAL_METRICS["auc"]] == 0.9 and m[keys.EVAL_ACC_PHASE.format(1)] == 0.6
    assert EvaluateReply.from_message(msg, num_phases=2) == ev
    fr = FisherReply("s0", ArrayRecord({"w": torch.zeros(3)}), 20, 0.2, 8.0, 0)
    back = FisherReply.from_message(_as_sent(fr.to_message(req)))
    assert (back.site_id, back.num_examples, back.epsilon, back.epsilon_cap) == ("s0", 20, 0.2, 8.0)


def test_a_reply_record_written_by_hand_reads_the_same() -> None:
    """The wire format is the keys': a peer that builds records by hand interoperates."""
    content = RecordDict({
        keys.STATUS: ConfigRecord({keys.SITE_ID: "s0", keys.STATE: keys.STATE_OK}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 5, keys.EVAL_LOSS: 1.0,
                                    keys.EVAL_ACC: 0.5, keys.PARTITION_ID: 0})})
    ev = EvaluateReply.from_message(Message(content, dst_node_id=0, message_type="evaluate"))
    assert ev == EvaluateReply("s0", 5, 1.0, 0.5, 0)
