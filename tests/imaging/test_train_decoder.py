"""``train-decoder``: UNETR's convolutional encoder/decoder blocks train in full next to
LoRA in its ViT and the head (``ModelSpec.train_decoder``, the scenario's
``train_decoder``, run-config key ``train-decoder``).

Pinned here on a tiny random UNETR-3d: exactly the intended modules are trainable (by
name), Opacus' per-sample gradients of every one of them (Conv3d, ConvTranspose3d;
InstanceNorm has no affine tensors) equal per-example autograd, a DP-SGD round trains
them, the aggregation averages them as dense tensors, the PEFT adapter a release
ships round-trips them, and the option is refused where there is no decoder."""

import dataclasses

import pytest
import torch
from peft import PeftModel

from fedadapt.config import ConfigError, RunConfig
from fedadapt.imaging.backbones import ModelSpec, build_model, load_trainable, trainable_state
from fedadapt.imaging.registry import UNETR_DECODER
from fedadapt.imaging.run_spec import run_model_spec, run_train_decoder
from fedadapt.imaging.scenario import load_scenario
from tests.grad_check import assert_grad_samples_match_autograd, randomise_lora_b

TINY = ModelSpec(image_size=16, hidden_size=32, mlp_dim=64, num_heads=2, num_classes=3,
                 lora_rank=2, task="segmentation", spatial_dims=3, backbone="unetr-3d",
                 train_decoder=True)
PREFIX = "base_model.model."


def _groups(names) -> dict[str, set[str]]:
    """Top-level UNETR module -> the kinds of trainable tensors under it."""
    out: dict[str, set[str]] = {}
    for n in names:
        assert n.startswith(PREFIX), n
        top = n[len(PREFIX):].split(".")[0]
        kind = ("lora" if ".lora_" in n else
                "full" if ".modules_to_save.default." in n else "other")
        out.setdefault(top, set()).add(kind)
    return out


def test_exactly_the_decoder_blocks_the_head_and_lora_train():
    assert UNETR_DECODER == ("encoder1", "decoder2", "decoder3", "decoder4", "decoder5")
    lora_only = _groups(trainable_state(build_model(dataclasses.replace(
        TINY, train_decoder=False))))
    assert lora_only == {"vit": {"lora"}, "out": {"full"}}
    model = build_model(TINY)
    groups = _groups(trainable_state(model))
    assert groups == {"vit": {"lora"}, "out": {"full"},
                      **{m: {"full"} for m in UNETR_DECODER}}
    # Every tensor of those blocks' trainable copies trains; the ViT's skip projections
    # (encoder2..4), its own weights and the blocks' original copies stay frozen.
    for n, p in model.named_parameters():
        top = n[len(PREFIX):].split(".")[0]
        full = f"{top}.modules_to_save.default." in n or "out.conv.modules_to_save." in n
        assert p.requires_grad == (".lora_" in n or full), n
    assert any(n.startswith(PREFIX + "encoder2.") for n, _ in model.named_parameters())


def test_opacus_per_sample_gradients_of_the_decoder_equal_autograd(one_thread):
    # float64: the summed cross-entropy over 16^3 voxels makes float32 rounding visible.
    torch.manual_seed(0)
    model = build_model(TINY).double()
    randomise_lora_b(model)
    x = torch.randn(3, 1, 16, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 16, 16, 16))
    checked = assert_grad_samples_match_autograd(model, x, y)
    assert set(_groups(checked)) == {"vit", "out", *UNETR_DECODER}
    assert any("transp_conv" in n for n in checked)  # ConvTranspose3d included


def test_dp_round_trains_the_decoder_and_fedavg_and_peft_carry_it(tmp_path, one_thread):
    from fedadapt.client.train import train
    from fedadapt.imaging.tasks import synthetic_segmentation, task_loss
    from fedadapt.privacy.dp import DPRequest
    from fedadapt.server.release import released_base
    from fedadapt.strategies.lora_math import exact_aggregate, weighted_mean

    model = build_model(TINY)
    before = trainable_state(model)
    data = synthetic_segmentation(4, 16, seed=0, spatial_dims=3)  # classes 0, 1 of 3
    res = train(model, data, epochs=1, lr=0.05, batch_size=2, device=torch.device("cpu"),
                seed=0, dp=DPRequest(1.0, 1.0), loss_fn=task_loss("segmentation"))
    assert res.steps >= 1
    after = trainable_state(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert {n[len(PREFIX):].split(".")[0] for n in changed} >= set(UNETR_DECODER)
    # The decoder tensors are ordinary dense tensors of the exchange: FedAvg and the
    # exact-LoRA aggregation average them by weight.
    name = next(n for n in after if n.startswith(PREFIX + "decoder2."))
    for agg in (weighted_mean([before, after], [1.0, 3.0]),
                exact_aggregate([before, after], [1.0, 3.0], TINY.lora_rank)[0]):
        torch.testing.assert_close(agg[name], 0.25 * before[name] + 0.75 * after[name])
        assert set(agg) == set(after)
    # The release's PEFT adapter holds them and loads onto the rebuilt base.
    fresh = build_model(TINY)
    load_trainable(fresh, after)
    fresh.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(released_base(TINY), str(tmp_path / "adapter"))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), fresh.eval()(x))


def test_refused_where_there_is_no_decoder(tmp_path):
    with pytest.raises(ValueError, match="default 2-D ViT classifier: turn it off"):
        ModelSpec(train_decoder=True)
    with pytest.raises(ValueError, match=r"backbone 'vit-3d' has no convolutional decoder.*"
                                         r"\['unetr-2d', 'unetr-3d'\]"):
        ModelSpec(image_size=16, spatial_dims=3, backbone="vit-3d", train_decoder=True)
    with pytest.raises(ConfigError, match="'train-decoder' must be one of auto, on, off, "
                                          "got 'yes'"):
        RunConfig.from_mapping({"train-decoder": "yes"})
    with pytest.raises(ValueError, match="default 2-D ViT classifier"):
        run_model_spec(RunConfig(train_decoder="on"))
    bad = tmp_path / "cls.toml"
    bad.write_text('task = "classification"\ntrain_decoder = true\n'
                   '[[site]]\nname = "a"\ntrain_size = 4\ntest_size = 2\n')
    with pytest.raises(ValueError, match=r"train_decoder=True; use true or false \(true "
                                         r"only for task = \"segmentation\""):
        load_scenario(bad)


def test_auto_follows_the_scenario_and_on_off_override_it(tmp_path):
    seg = tmp_path / "seg.toml"
    seg.write_text('task = "segmentation"\nspatial_dims = 3\nimage_size = 16\n'
                   'num_classes = 2\ntrain_decoder = true\n'
                   '[[site]]\nname = "a"\ntrain_size = 4\ntest_size = 2\n')
    cfg = RunConfig(scenario=str(seg), image_size=16, num_classes=2, backbone_weights="random")
    assert load_scenario(seg).train_decoder is True
    assert run_train_decoder(cfg) and run_model_spec(cfg).train_decoder
    assert not run_model_spec(cfg.replace(train_decoder="off")).train_decoder
    assert not run_train_decoder(RunConfig())  # no scenario: off
    seg.write_text(seg.read_text().replace("train_decoder = true\n", ""))
    assert not run_train_decoder(cfg)  # a scenario that says nothing: off
    assert run_train_decoder(cfg.replace(train_decoder="on"))


def test_simulate_refuses_it_before_the_federation(tmp_path, capsys):
    from fedadapt.cli import main

    code = main(["simulate", "--scenario", "three-hospitals", "--train-decoder", "on",
                 "--rounds", "1", "--out", str(tmp_path / "runs")])
    assert code == 2
    assert "train-decoder: only a registry backbone with a convolutional decoder" in (
        capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
