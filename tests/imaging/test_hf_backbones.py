"""Foundation models from local files: each transformers family and the timm layout.

Every family is a TINY random-weight model built here from a config and saved with
``save_pretrained`` (with its image processor), loaded through ``backbone-path``, wrapped
with LoRA, and checked under Opacus: per-sample gradients equal per-example autograd.
"""

import dataclasses
import json

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

from fedadapt.imaging.backbones import ModelSpec, build_model, is_adapter_or_head
from fedadapt.imaging.local import check_digest, checkpoint_sha256
from fedadapt.imaging.weights import CheckpointError
from fedadapt.privacy.dp import grad_sample_mode
from tests.grad_check import assert_grad_samples_match_autograd, randomise_lora_b

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8)
SQUARE = dict(size={"height": 32, "width": 32})
CROP = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
SAM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
           image_size=32, patch_size=8, output_channels=16, window_size=2,
           global_attn_indexes=[1])
#: family -> (config, model class, image processor, its arguments, expected LoRA targets)
FAMILIES = {
    "vit": (T.ViTConfig(**SMALL), T.ViTModel, "ViTImageProcessorPil", SQUARE,
            ("q_proj", "v_proj")),
    "dinov2": (T.Dinov2Config(**SMALL), T.Dinov2Model, "BitImageProcessorPil", CROP,
               ("q_proj", "v_proj")),
    "clip_vision_model": (T.CLIPVisionConfig(**SMALL), T.CLIPVisionModel,
                          "CLIPImageProcessorPil", CROP, ("q_proj", "v_proj")),
    "siglip_vision_model": (T.SiglipVisionConfig(**SMALL), T.SiglipVisionModel,
                            "SiglipImageProcessorPil", SQUARE, ("q_proj", "v_proj")),
    "sam_vision_model": (T.SamVisionConfig(**SAM), T.SamVisionModel, "SamImageProcessorPil",
                         dict(size={"longest_edge": 32}), ("qkv",)),
}


def save_family(folder, name):
    """Save a tiny random model of family ``name`` and its processor; the source model."""
    config, cls, processor, kw, _ = FAMILIES[name]
    torch.manual_seed(1)
    src = cls(config).eval()
    src.save_pretrained(folder)
    getattr(T, processor)(**kw).save_pretrained(folder)
    return src


def _spec(folder, **kw):
    return ModelSpec(backbone_path=str(folder), backbone_weights="random", image_size=16,
                     num_classes=3, lora_rank=4, **kw)


def _per_sample_matches_autograd(model, x, y):
    assert grad_sample_mode(model) == "ew"  # LoRA + linear head: expanded weights on CPU
    randomise_lora_b(model)
    trainable = assert_grad_samples_match_autograd(model, x, y)
    assert any("lora_A" in n for n in trainable) and any("head" in n for n in trainable)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_loads_frozen_with_lora_and_exact_per_sample_grads(tmp_path, name):
    src = save_family(tmp_path / name, name)
    targets = FAMILIES[name][4]
    model = build_model(_spec(tmp_path / name))
    base = model.base_model.model
    # The checkpoint's weights, not a fresh init; the processor's own normalisation.
    own = {k.replace(".base_layer", ""): v for k, v in base.encoder.state_dict().items()}
    unused = ("pooler.", "head.")  # ViT's pooler and SigLIP's attention pool: not built
    for k, v in src.state_dict().items():
        if not k.startswith(unused):
            torch.testing.assert_close(own[k], v, msg=k)
    proc = json.loads((tmp_path / name / "preprocessor_config.json").read_text())
    assert base.preprocess.mean.flatten().tolist() == pytest.approx(proc["image_mean"])
    assert base.preprocess.std.flatten().tolist() == pytest.approx(proc["image_std"])
    assert base.preprocess.size == 32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_or_head(n) for n in trainable)
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert lora == set(targets)
    if name.startswith("sam"):  # global-attention blocks only (windowed: B·windows rows)
        assert not any("layers.0." in n for n in trainable)
        assert any("layers.1.attn.qkv.lora_A" in n for n in trainable)
    # The same spec gives the same model (head and adapters seeded).
    again = build_model(_spec(tmp_path / name))
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(model, strict=False) == []  # nothing Opacus refuses
    torch.manual_seed(0)  # grayscale 16-px images: replicated to RGB, resized to 32
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2])
    _per_sample_matches_autograd(model.train(), x, y)


def test_vit_eager_attention_gives_the_same_model(tmp_path, monkeypatch):
    import fedadapt.imaging.hf as hf

    save_family(tmp_path, "vit")
    x = torch.rand(2, 1, 32, 32)
    sdpa = build_model(_spec(tmp_path)).eval()
    monkeypatch.setattr(hf, "ATTN_IMPLEMENTATION", "eager")
    eager = build_model(_spec(tmp_path)).eval()
    assert eager.base_model.model.encoder.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa(x), eager(x), rtol=1e-5, atol=1e-5)


def test_full_clip_folder_loads_its_vision_tower(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, vocab_size=64)
    full = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=SMALL))
    full.save_pretrained(tmp_path)
    T.CLIPImageProcessorPil(**CROP).save_pretrained(tmp_path)
    model = build_model(_spec(tmp_path))
    enc = model.base_model.model.encoder
    assert type(enc).__name__ == "CLIPVisionModel"
    tower = getattr(full.vision_model, "vision_model", full.vision_model)
    torch.testing.assert_close(getattr(enc, "vision_model", enc).embeddings.patch_embedding
                               .weight, tower.embeddings.patch_embedding.weight)


def test_unsupported_family_missing_processor_and_segmentation_are_refused(tmp_path):
    save_family(tmp_path / "vit", "vit")
    (tmp_path / "vit" / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json; save the model's "
                                              "image processor"):
        build_model(_spec(tmp_path / "vit"))
    other = tmp_path / "resnet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(CheckpointError, match="model_type 'resnet' is not supported; "
                                              r"supported families: \['clip'"):
        build_model(_spec(other))
    with pytest.raises(ValueError, match="Segmentation would need a decoder"):
        ModelSpec(backbone_path=str(tmp_path / "vit"), backbone_weights="random",
                  task="segmentation", backbone="unetr-2d")
    with pytest.raises(CheckpointError, match="found nothing"):
        build_model(_spec(tmp_path / "absent"))


def test_digest_of_folder_and_site_refuses_a_mismatch(tmp_path):
    save_family(tmp_path / "a", "vit")
    save_family(tmp_path / "b", "vit")
    digest = checkpoint_sha256(tmp_path / "a")
    assert digest == checkpoint_sha256(tmp_path / "b") and len(digest) == 64
    check_digest(tmp_path / "b", digest, site="hospital-b")
    (tmp_path / "b" / "preprocessor_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="site hospital-b: backbone-path .* has sha256 "
                                              ".*every site needs the same checkpoint"):
        check_digest(tmp_path / "b", digest, site="hospital-b")
    with pytest.raises(CheckpointError, match="sent no sha256"):
        check_digest(tmp_path / "a", "", site="hospital-a")


# --- timm layout ------------------------------------------------------------------

def _timm_checkpoint(path, *, with_layer_scale: bool, prefix: str = ""):
    """A MONAI ViT written in timm's key layout (class token, MAE decoder, LayerScale);
    returns the MONAI reference encoder it must load back into."""
    import re

    from monai.networks.nets import ViT

    torch.manual_seed(3)
    ref = ViT(in_channels=3, img_size=(16, 16), patch_size=4, hidden_size=128, mlp_dim=64,
              num_layers=2, num_heads=2, spatial_dims=2, classification=False,
              qkv_bias=True).eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
            torch.nn.init.normal_(m.weight, 1, 0.1)
    to_timm = [(r"^patch_embedding\.patch_embeddings\.", "patch_embed.proj."),
               (r"^patch_embedding\.position_embeddings$", "pos_embed"),
               (r"\.attn\.out_proj\.", ".attn.proj."), (r"\.mlp\.linear1\.", ".mlp.fc1."),
               (r"\.mlp\.linear2\.", ".mlp.fc2.")]
    state = {}
    for k, v in ref.state_dict().items():
        if "norm_cross_attn" in k:
            continue
        for pat, rep in to_timm:
            k = re.sub(pat, rep, k)
        state[k] = v.clone()
    state["pos_embed"] = torch.cat([torch.randn(1, 1, 128), state["pos_embed"]], dim=1)
    state.update(cls_token=torch.randn(1, 1, 128), mask_token=torch.zeros(1, 128),
                 **{"decoder_embed.weight": torch.zeros(8, 128)})
    if with_layer_scale:  # DINOv2: gamma scales the branch; stored weights are W / gamma
        for i in range(2):
            for ls, lin in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
                g = torch.rand(128) + 0.5
                state[f"blocks.{i}.{ls}.gamma"] = g
                state[f"blocks.{i}.{lin}.weight"] = state[f"blocks.{i}.{lin}.weight"] / g[:, None]
                state[f"blocks.{i}.{lin}.bias"] = state[f"blocks.{i}.{lin}.bias"] / g
    state = {prefix + k: v.contiguous() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    return ref


@pytest.mark.parametrize("suffix,layer_scale", [(".safetensors", True), (".pth", False)])
def test_timm_checkpoint_loads_exactly_and_trains_under_opacus(tmp_path, suffix, layer_scale):
    path = tmp_path / f"retfound-like{suffix}"
    ref = _timm_checkpoint(path, with_layer_scale=layer_scale,
                           prefix="" if layer_scale else "module.")
    model = build_model(_spec(path))
    base = model.base_model.model
    assert base.encoder.blocks[0].attn.num_heads == 2  # width 128 / 64
    x = torch.rand(2, 1, 16, 16)
    pixels = (x.expand(-1, 3, -1, -1) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        got = model.eval().base_model.model.encoder(base.preprocess(x))[0]
        torch.testing.assert_close(got, ref(pixels)[0], rtol=1e-4, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_or_head(n) for n in trainable)
    _per_sample_matches_autograd(model.train(), torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2]))
    # Another image size: the pos_embed grid is resized (bicubic), the model still runs.
    wide = build_model(dataclasses.replace(_spec(path), image_size=32))
    assert wide(torch.rand(1, 1, 32, 32)).shape == (1, 3)


def test_timm_sam_encoder_is_refused_with_the_reason(tmp_path):
    save_file({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
               "image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(7, 4)},
              str(tmp_path / "medsam.safetensors"))
    with pytest.raises(CheckpointError, match="SAM/MedSAM-style image encoder.*transformers "
                                              "SamModel folder"):
        build_model(_spec(tmp_path / "medsam.safetensors"))


def test_open_clip_local_dir_with_timm_trunk(tmp_path):
    """BiomedCLIP-style: open_clip_config.json + visual.trunk.* tensors in timm layout."""
    ref = _timm_checkpoint(tmp_path / "w.safetensors", with_layer_scale=False,
                           prefix="visual.trunk.")
    (tmp_path / "w.safetensors").rename(tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"vision_cfg": {"timm_model_name": "vit_base_patch16_224",
                                     "image_size": 16}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    model = build_model(_spec(tmp_path)).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        got = model.base_model.model.encoder(model.base_model.model.preprocess(x))[0]
        torch.testing.assert_close(got, ref((x.expand(-1, 3, -1, -1) - 0.5) / 0.25)[0],
                                   rtol=1e-4, atol=1e-5)
