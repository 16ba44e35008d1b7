"""End to end: an FFA-LoRA federation with DP on Flower's Simulation Engine (tiny sizes)."""

import json

from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, trainable_state
from fedadapt.simulations.runner import simulate
from fedadapt.strategies.lora_math import LORA_A, LORA_B
from fedadapt.imaging.run_spec import run_model_spec


def test_ffa_lora_with_dp_sends_only_b_and_head(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), num_sites=2, num_server_rounds=1, site_train_size=64,
                    site_test_size=32, dp=True, strategy="ffa-lora")
    run_dir = simulate(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    names = summary["wire"]["tensor_names"]
    full = trainable_state(build_model(run_model_spec(cfg)))
    assert names and not any(LORA_A in n for n in names)
    assert {n for n in full if LORA_A not in n} == set(names)
    assert any(LORA_B in n for n in names)
    assert summary["strategy"]["name"] == "ffa-lora" and summary["privacy"]["dp"]
    rnd = summary["rounds"][0]
    assert rnd["rejected"] == [] and rnd["failures"] == [] and len(rnd["train"]) == 2
    assert all(m["epsilon"] > 0 for m in rnd["train"].values())
    assert (run_dir / summary["adapter_dir"]).is_dir()
