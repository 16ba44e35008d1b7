"""MAE pretraining (imaging.pretrain), the shipped checkpoint and backbone-weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedadapt.config import ConfigError, RunConfig
from fedadapt.imaging.backbones import (BUILTIN_WEIGHTS, ModelSpec, ViTClassifier, build_model,
                                  public_reference_images)
from fedadapt.imaging.pretrain import MaskedAutoencoder, PretrainConfig, pretrain, save_encoder
from fedadapt.imaging.weights import CheckpointError, load_weights, read_checkpoint
from fedadapt.imaging.run_spec import run_model_spec

# A tiny encoder so that a few epochs take a second or two.
TINY = ModelSpec(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=1,
                 num_heads=2)
TINY_CFG = PretrainConfig(model=TINY, num_scanners=2, images_per_scanner=32, epochs=6,
                          batch_size=32, lr=2e-3, warmup_epochs=1, decoder_dim=32,
                          decoder_layers=1, decoder_heads=2, seed=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster on a shared machine (and is restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run():
    return pretrain(TINY_CFG)


def test_mae_loss_decreases(tiny_run):
    losses = tiny_run.losses
    assert len(losses) == TINY_CFG.epochs
    assert losses[-1] < 0.9 * losses[0], losses


def test_pretraining_is_reproducible_by_seed(tiny_run):
    again = pretrain(TINY_CFG)
    assert again.losses == tiny_run.losses
    assert again.encoder_state.keys() == tiny_run.encoder_state.keys()
    for k, v in tiny_run.encoder_state.items():
        assert torch.equal(v, again.encoder_state[k]), k
    other = pretrain(dataclasses.replace(TINY_CFG, seed=4))
    key = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(tiny_run.encoder_state[key], other.encoder_state[key])


def test_saved_encoder_loads_strictly_and_changes_the_model(tiny_run, tmp_path):
    path = save_encoder(tiny_run, TINY_CFG, tmp_path / "enc.safetensors")
    assert set(read_checkpoint(path)) == set(tiny_run.encoder_state)  # no decoder tensors
    random_model = build_model(TINY)
    pretrained = build_model(dataclasses.replace(TINY, backbone_weights=str(path)))
    # PEFT renames the adapted layers' weights to ``<layer>.base_layer.*``.
    got = {k.replace(".base_layer", ""): v
           for k, v in pretrained.base_model.model.state_dict().items() if "lora_" not in k}
    for k, v in tiny_run.encoder_state.items():
        assert torch.equal(got[k], v), k
    # The feature standardisation is re-measured through the loaded encoder.
    base = pretrained.base_model.model
    with torch.no_grad():
        f = base.features(public_reference_images(TINY.image_size))
    assert torch.allclose(base.feature_mean, f.mean(0), atol=1e-5)
    assert not torch.allclose(base.feature_mean, random_model.base_model.model.feature_mean)


def test_mask_hides_the_configured_share():
    spec, cfg = TINY, TINY_CFG
    mae = MaskedAutoencoder(ViTClassifier(spec).encoder, spec, cfg)
    assert mae.num_visible == round(16 * 0.25)
    x = torch.randn(2, 1, 16, 16)
    p = mae.patchify(x)  # patch k is row k // 4, column k % 4
    assert torch.equal(p[0, 5], x[0, 0, 4:8, 4:8].reshape(-1))


def test_builtin_checkpoint_is_small_and_loads_strictly_into_the_default_vit():
    assert BUILTIN_WEIGHTS.is_file()
    assert BUILTIN_WEIGHTS.stat().st_size < 10 * 2**20
    report = load_weights(ViTClassifier(ModelSpec()), BUILTIN_WEIGHTS,
                          allow_missing=(r"^head\.", r"^feature_(mean|std)$"))
    assert report.ok and not report.unexpected
    encoder_keys = {k for k in ViTClassifier(ModelSpec()).state_dict() if k.startswith("encoder.")}
    assert set(report.loaded) == encoder_keys


def test_run_config_defaults_to_builtin_and_random_differs():
    cfg = RunConfig()
    assert cfg.backbone_weights == "builtin"
    assert ModelSpec().backbone_weights == "random"  # library default: any architecture
    builtin = build_model(run_model_spec(cfg))
    again = build_model(run_model_spec(cfg))
    random = build_model(run_model_spec(cfg.replace(backbone_weights="random")))
    key = "encoder.blocks.0.attn.qkv.base_layer.weight"
    b, a, r = (dict(m.base_model.model.named_parameters())[key] for m in (builtin, again, random))
    assert torch.equal(b, a)  # server and every site build the identical backbone
    assert not torch.equal(b, r)
    x = public_reference_images(32, n=8)
    with torch.no_grad():
        assert not torch.allclose(builtin.eval()(x), random.eval()(x))


def test_missing_or_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*'builtin', 'random'"):
        build_model(ModelSpec(backbone_weights=str(tmp_path / "nope.safetensors")))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_model(ModelSpec(backbone_weights=str(bad)))
    # The shipped 32-px encoder does not fit a 16-px model: the key and shapes are named.
    with pytest.raises(CheckpointError, match="position_embeddings: expected"):
        build_model(ModelSpec(image_size=16, backbone_weights="builtin"))
    with pytest.raises(ConfigError, match="'backbone-weights' must be"):
        RunConfig(backbone_weights="weights.bin")
    with pytest.raises(ConfigError, match="'backbone-weights' must be"):
        RunConfig.from_mapping({"backbone-weights": ""})


def test_pretrain_command_rejects_a_bad_out_suffix(tmp_path, capsys):
    from fedadapt.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "x.bin")]) == 2
    assert "expected a .safetensors, .pt or .pth" in capsys.readouterr().err
    assert not (tmp_path / "x.bin").exists()
