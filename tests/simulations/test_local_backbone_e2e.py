"""End to end: a DP federation on a transformers ViT folder given as ``backbone-path``.

The real ServerApp and ClientApp on Flower's Simulation Engine, one round; every site
rebuilds the frozen ViT from the same local folder, checks its sha256 against the
server's, and only LoRA + head tensors travel. A site whose copy differs refuses.
"""

import json

import pytest
import torch
import transformers as T
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from peft import PeftModel

from fedadapt import keys
from fedadapt.client.app import _model
from fedadapt.client.site import site_from_context
from fedadapt.config import RunConfig
from fedadapt.imaging.backbones import build_model, is_adapter_or_head, trainable_state
from fedadapt.imaging.run_spec import run_model_spec
from fedadapt.imaging.local import checkpoint_sha256, local_base
from fedadapt.imaging.weights import CheckpointError
from fedadapt.simulations.runner import simulate


def _tiny_vit(folder):
    torch.manual_seed(0)
    T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(
        folder)
    T.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_one_dp_round_on_a_saved_vit_folder(tmp_path):
    folder = _tiny_vit(tmp_path / "vit")
    cfg = RunConfig(out_dir=str(tmp_path / "runs"), backbone_path=str(folder), num_sites=2,
                    num_server_rounds=1, site_train_size=48, site_test_size=16,
                    local_epochs=1, noise_multiplier=1.0, epsilon_cap=100.0,
                    cross_site_eval=False)
    run_dir = simulate(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"]["dp"] is True
    assert all(0 < s["epsilon"] < 100 for s in summary["sites"].values())
    assert summary["rounds"][0]["accuracy"] is not None
    names = summary["wire"]["tensor_names"]
    assert names == sorted(trainable_state(build_model(run_model_spec(cfg))))
    assert any("q_proj.lora_A" in n for n in names) and all(is_adapter_or_head(n) for n in names)
    # The final adapter (PEFT format) reloads onto the same local backbone.
    base, _ = local_base(str(folder), num_classes=cfg.num_classes, image_size=cfg.image_size)
    loaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        out = loaded(torch.rand(2, 1, cfg.image_size, cfg.image_size))
    assert out.shape == (2, cfg.num_classes) and torch.isfinite(out).all()


def test_site_refuses_a_checkpoint_that_is_not_the_servers(tmp_path):
    folder = _tiny_vit(tmp_path / "vit")
    cfg = RunConfig(backbone_path=str(folder), num_sites=2)
    site = site_from_context(cfg.to_mapping(), {keys.NODE_PARTITION_ID: 0})
    arrays = ArrayRecord(trainable_state(build_model(run_model_spec(cfg))))

    def message(digest: str) -> Message:
        return Message(content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord(
            {keys.BACKBONE_SHA256: digest})}), dst_node_id=1, message_type="train")

    assert _model(site, message(checkpoint_sha256(folder))) is not None
    with pytest.raises(CheckpointError, match=f"site {site.name}: backbone-path .* has "
                                              "sha256 .*the server's has 0000000000000000"):
        _model(site, message("0" * 64))
