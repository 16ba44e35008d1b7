"""16-bit transport (strategies.wire): exact byte counts, float32 decoding, a run that learns."""

import json

import pytest
import torch
from flwr.app import Array, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedadapt.config import ConfigError, RunConfig
from fedadapt.imaging.backbones import build_model, trainable_state
from fedadapt.simulations.runner import simulate
from fedadapt.strategies import wire
from fedadapt.strategies.lora_math import LORA_A
from fedadapt.imaging.run_spec import run_model_spec


def _state():
    g = torch.Generator().manual_seed(0)
    return {"m.lora_A.w": torch.randn(4, 16, generator=g),
            "m.lora_B.w": torch.randn(16, 4, generator=g) * 1e-3,
            "head.bias": torch.randn(3, generator=g), "steps": torch.arange(5)}


# float16 has ~3 more mantissa bits than bfloat16 but a narrow range: small LoRA B
# values fall into its subnormals (absolute step 2^-24), hence the atol.
@pytest.mark.parametrize("dtype,tol,atol", [("bfloat16", 2 ** -8, 0.0),
                                            ("float16", 2 ** -11, 2 ** -24)])
def test_16_bit_round_trip_through_flower_serialisation(dtype, tol, atol):
    state = _state()
    rec = wire.encode(state, dtype)
    floats = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert sum(len(rec[n].data) for n in state if state[n].is_floating_point()) == 2 * floats
    again = recorddict_from_proto(recorddict_to_proto(RecordDict({"arrays": rec})))["arrays"]
    out = wire.decode(again)
    assert torch.equal(out["steps"], state["steps"])
    for name, t in state.items():
        if t.is_floating_point():
            assert out[name].dtype == torch.float32
            assert torch.allclose(out[name], t, rtol=tol, atol=atol), name


def test_float32_is_flowers_own_serialisation():
    state = _state()
    rec = wire.encode(state, "float32")
    assert all(a.stype == "numpy.ndarray" for a in rec.values())
    assert all(torch.equal(wire.decode(rec)[n], t) for n, t in state.items())


def test_bad_dtype_and_corrupt_payload_are_clear_errors():
    with pytest.raises(ValueError, match="wire-dtype"):
        wire.encode(_state(), "int8")
    with pytest.raises(ConfigError, match="wire-dtype"):
        RunConfig(wire_dtype="fp8")
    rec = wire.encode(_state(), "bfloat16")
    rec["head.bias"].data = rec["head.bias"].data[:-2]
    with pytest.raises(ValueError, match="head.bias.*expected 6"):
        wire.decode(rec)


@pytest.mark.parametrize("run", ["float32", "bfloat16", "float16"])
def test_format_problem_accepts_only_the_runs_wire_dtype(run):
    state = _state()
    for sent in ("float32", "bfloat16", "float16"):
        problem = wire.format_problem(wire.encode(state, sent), run)
        if sent == run:
            assert problem is None  # integer tensors keep NumPy serialisation
        else:
            assert f"sent as {sent} on the wire, the run's wire-dtype is {run}" in problem
    f64 = wire.encode(state, run)
    f64["head.bias"] = Array(state["head.bias"].double().numpy())
    assert "head.bias: sent as float64" in wire.format_problem(f64, run)
    odd = wire.encode(state, run)
    odd["head.bias"] = Array(dtype="float32", shape=(3,), stype="pickle", data=b"x" * 12)
    assert "serialisation 'pickle'" in wire.format_problem(odd, run)


def test_format_problem_catches_a_truncated_16_bit_payload():
    rec = wire.encode(_state(), "bfloat16")
    rec["m.lora_A.w"].data = rec["m.lora_A.w"].data[:-1]
    assert wire.format_problem(rec, "bfloat16") == (
        "m.lora_A.w: 127 bytes for shape (4, 16) bfloat16, expected 128")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    cfg = RunConfig(out_dir=str(tmp_path_factory.mktemp("wire")), num_sites=2,
                    num_server_rounds=2, site_train_size=96, site_test_size=48, dp=False,
                    strategy="ffa-lora", wire_dtype="bfloat16")
    run_dir = simulate(cfg)
    return cfg, json.loads((run_dir / "summary.json").read_text())


def test_bf16_run_halves_bytes_exactly_and_learns(bf16_run):
    cfg, summary = bf16_run
    sent = {n: t for n, t in trainable_state(build_model(run_model_spec(cfg))).items()
            if LORA_A not in n}  # FFA-LoRA: A never travels
    fp32 = sum(t.numel() * 4 for t in sent.values())
    assert summary["wire"]["dtype"] == "bfloat16"
    assert summary["wire"]["bytes_per_direction_per_site"] * 2 == fp32
    for rnd in summary["rounds"]:
        assert rnd["rejected"] == [] and rnd["failures"] == [] and len(rnd["train"]) == 2
        # Both directions, both sites: exactly 2 bytes per element, no header.
        assert rnd["bytes"]["up"] == 2 * (fp32 // 2)
        assert rnd["bytes"]["down"] == 2 * 2 * (fp32 // 2)  # train + evaluate messages
    accs = [r["accuracy"] for r in summary["rounds"]]
    assert accs[-1] > 1.0 / cfg.num_classes, accs
