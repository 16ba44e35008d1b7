"""Backbone registry, local weights with key remapping, and which PEFT methods work under DP."""

import pytest
import torch
from opacus import GradSampleModule

from fedadapt.imaging.registry import REGISTRY, attach_peft, build_backbone, check_dp, get_backbone
from fedadapt.imaging.weights import (TIMM_VIT_ALLOW_MISSING, TIMM_VIT_REMAP, CheckpointError,
                                load_weights, save_weights)
from fedadapt.privacy.dp import grad_sample_mode
from tests.grad_check import assert_grad_samples_match_autograd, randomise_lora_b

TINY = dict(img_size=(16, 16), num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2)


def test_registry_entries_and_vit_b16_shape():
    assert {"vit-2d", "vit-3d", "vit-b16", "unetr-2d", "unetr-3d", "swin-unetr"} <= set(REGISTRY)
    b16 = get_backbone("vit-b16").defaults
    assert (b16["hidden_size"], b16["num_layers"], b16["num_heads"], b16["patch_size"]) == \
        (768, 12, 12, 16)
    x3 = torch.randn(2, 1, 16, 16, 16)
    m3 = build_backbone("vit-3d", num_classes=4, **{**TINY, "img_size": (16, 16, 16)})
    assert m3(x3).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        get_backbone("resnet")
    with pytest.raises(ValueError, match="is 2-D; img_size"):
        build_backbone("vit-2d", img_size=(16, 16, 16))


def test_dp_refusals_fail_closed():
    check_dp("vit-2d", "lora")
    check_dp("unetr-2d", "lora")
    with pytest.raises(ValueError, match="'swin-unetr' is refused under DP: SwinUNETR"):
        check_dp("swin-unetr")
    for method in ("ia3", "dora"):
        with pytest.raises(ValueError, match=f"PEFT method '{method}' is refused under DP"):
            check_dp("vit-2d", method)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_with_remap(tmp_path, suffix):
    src = build_backbone("vit-2d", seed=0, **TINY)
    # A foreign checkpoint: the encoder lives under "backbone." and carries a decoder.
    foreign = torch.nn.Module()
    foreign.backbone = src.encoder
    foreign.head = src.head
    foreign.decoder = torch.nn.Linear(3, 3)
    path = save_weights(foreign, tmp_path / f"foreign{suffix}")
    dst = build_backbone("vit-2d", seed=1, **TINY)
    x = torch.randn(3, 1, 16, 16)
    src.eval(), dst.eval()
    assert not torch.allclose(src(x), dst(x))
    with pytest.raises(CheckpointError) as err:
        load_weights(dst, path)
    msg = str(err.value)
    n_enc = len(src.encoder.state_dict())
    assert f"foreign{suffix}" in msg and f"missing {n_enc} ['encoder." in msg
    assert f"unexpected {n_enc + 2} ['backbone." in msg
    report = load_weights(dst, path, remap=[(r"^backbone\.", "encoder."), (r"^decoder\.", None)])
    assert report.ok and not report.missing and not report.unexpected
    torch.testing.assert_close(src(x), dst(x))


def test_encoder_only_checkpoint_allows_new_head_and_reports_shapes(tmp_path):
    src = build_backbone("vit-2d", seed=0, **TINY)
    path = save_weights(src.encoder, tmp_path / "enc.safetensors")
    dst = build_backbone("vit-2d", seed=1, num_classes=5, **TINY)
    report = load_weights(dst, path, remap=[(r"^", "encoder.")], allow_missing=[r"^head\."])
    assert report.ok and len(report.loaded) == len(src.encoder.state_dict())
    wide = build_backbone("vit-2d", **{**TINY, "hidden_size": 48})
    with pytest.raises(CheckpointError, match=r"shape mismatches \d+ \['encoder\."):
        load_weights(wide, path, remap=[(r"^", "encoder.")], allow_missing=[r"^head\."])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read"):
        load_weights(dst, tmp_path / "junk.pt")


def _per_sample_vs_autograd(model, x, y):
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    expected = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    loss_fn(gsm(x), y).backward()
    return expected, [(n, p) for n, p in gsm._module.named_parameters() if p.requires_grad]


def test_lora_per_sample_grads_exact_but_ia3_has_none_and_dora_breaks():
    """LoRA: Opacus per-sample grads equal autograd, in hooks mode and in the mode
    ``privacy.dp`` trains with (expanded weights on the CPU; 2-D and 3-D ViT). IA3: Opacus
    silently computes none for the IA3 vectors (so DP-SGD could not clip them). DoRA: the
    hooks crash."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2])
    one = {**TINY, "num_layers": 1}
    for name, xs in (("vit-2d", x), ("vit-3d", torch.randn(3, 1, 8, 8, 8))):
        img = {**one, "img_size": tuple(xs.shape[2:])}
        lora = attach_peft(build_backbone(name, **img), name, method="lora", rank=4)
        assert grad_sample_mode(lora) == "ew"
        randomise_lora_b(lora)
        assert_grad_samples_match_autograd(lora, xs, y)

    ia3 = attach_peft(build_backbone("vit-2d", **one), "vit-2d", method="ia3")
    _, trainable = _per_sample_vs_autograd(ia3, x, y)
    ia3_vectors = [p for n, p in trainable if "ia3_l" in n]
    assert ia3_vectors and all(getattr(p, "grad_sample", None) is None for p in ia3_vectors)

    dora = attach_peft(build_backbone("vit-2d", **one), "vit-2d", method="dora", rank=4)
    with pytest.raises(TypeError):
        _per_sample_vs_autograd(dora, x, y)


def test_timm_style_vit_checkpoint_loads_with_shipped_table(tmp_path):
    """A RETFound/DINOv2-style (timm names, MAE decoder, class token) checkpoint."""
    from safetensors.torch import save_file
    src = build_backbone("vit-2d", seed=0, **TINY)
    to_timm = [(r"^encoder\.patch_embedding\.patch_embeddings\.", "patch_embed.proj."),
               (r"^encoder\.patch_embedding\.position_embeddings$", "pos_embed"),
               (r"\.attn\.out_proj\.", ".attn.proj."), (r"\.mlp\.linear1\.", ".mlp.fc1."),
               (r"\.mlp\.linear2\.", ".mlp.fc2."), (r"^encoder\.", "")]
    import re
    state = {}
    for k, v in src.state_dict().items():
        if k.startswith("head.") or "norm_cross_attn" in k:
            continue
        for pat, rep in to_timm:
            k = re.sub(pat, rep, k)
        state[k] = v.contiguous()
    assert "blocks.0.attn.proj.weight" in state and "norm.weight" in state
    state.update({"cls_token": torch.zeros(1, 1, 32), "mask_token": torch.zeros(1, 1, 32),
                  "decoder_embed.weight": torch.zeros(8, 32), "head.weight": torch.zeros(9, 32)})
    save_file(state, str(tmp_path / "retfound-like.safetensors"))
    dst = build_backbone("vit-2d", seed=1, **TINY)
    report = load_weights(dst, tmp_path / "retfound-like.safetensors", remap=TIMM_VIT_REMAP,
                          allow_missing=TIMM_VIT_ALLOW_MISSING)
    assert report.ok
    x = torch.randn(2, 1, 16, 16)
    src.eval(), dst.eval()
    torch.testing.assert_close(src.encoder(x)[0], dst.encoder(x)[0])


def test_unetr_lora_adapter_round_trips_in_peft_format(tmp_path):
    from peft import PeftModel

    kw = dict(num_classes=2, img_size=(32, 32), hidden_size=32, mlp_dim=64, num_heads=2,
              feature_size=8)
    model = attach_peft(build_backbone("unetr-2d", seed=3, **kw), "unetr-2d", rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(build_backbone("unetr-2d", seed=3, **kw),
                                       str(tmp_path / "adapter"))
    x = torch.randn(2, 1, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(x), loaded(x))
