"""Local backbone weights: ``.safetensors`` / ``.pt`` / ``.pth`` with a key-remapping table.

Nothing is downloaded. A checkpoint from another code base (a MedSAM image encoder, a
RETFound or DINOv2-style ViT) names its tensors differently; a remapping table — an
ordered list of ``(regex, replacement)`` rules applied with :func:`re.sub`, where a
replacement of ``None`` drops the key — translates them to this model's names. Loading
is strict: every missing, unexpected or wrongly shaped tensor is reported, and the load
fails unless the missing names match ``allow_missing`` (e.g. a new task head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from fedadapt import atomic

Remap = Sequence[tuple[str, str | None]]


#: timm/MAE-style ViT names (RETFound, DINOv2, MedSAM's ViT-B encoder layout) onto the
#: registry's MONAI ViT (``vit-b16``/``vit-2d``). MONAI's ViT has no class token: drop
#: ``cls_token`` and the first row of ``pos_embed`` before loading if the checkpoint has one.
TIMM_VIT_REMAP: tuple[tuple[str, str | None], ...] = (
    (r"^(decoder|mask_token|cls_token|fc_norm|head\.)", None),
    (r"^norm\.", "encoder.norm."),
    (r"^patch_embed\.proj\.", "encoder.patch_embedding.patch_embeddings."),
    (r"^pos_embed$", "encoder.patch_embedding.position_embeddings"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.blocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.blocks.\1.mlp.linear1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.blocks.\1.mlp.linear2."),
    (r"^blocks\.", "encoder.blocks."),
)
#: Registry tensors a timm-style encoder checkpoint does not have.
TIMM_VIT_ALLOW_MISSING = (r"^head\.", r"^encoder\.norm\.", r"norm_cross_attn")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the backbone."""


@dataclass(frozen=True)
class LoadReport:
    """What a load did: tensors loaded and every mismatch."""

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatch: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat name→tensor dict from ``.safetensors`` or ``.pt``/``.pth``.

    ``.pt``/``.pth`` use ``torch.load(weights_only=True)`` (no pickled code runs); a
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        elif suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"checkpoint {path}: expected .safetensors, .pt or .pth, "
                                  f"found '{suffix}'")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors/pickle raise their own types
        raise CheckpointError(f"checkpoint {path}: cannot read ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            if wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: expected a mapping of names to tensors, "
                              f"found {type(state).__name__}")
    return dict(state)


def remap_keys(state: Mapping[str, torch.Tensor], table: Remap) -> dict[str, torch.Tensor]:
    """Rename keys with ordered ``(regex, replacement)`` rules; ``None`` drops the key."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        new: str | None = key
        for pattern, repl in table:
            if re.search(pattern, new):
                if repl is None:
                    new = None
                    break
                new = re.sub(pattern, repl, new)
        if new is not None:
            if new in out:
                raise CheckpointError(f"remapping sends two checkpoint keys to '{new}' "
                                      f"(second: '{key}'); fix the remapping table")
            out[new] = t
    return out


def load_weights(model: nn.Module, path: str | Path, *, remap: Remap = (),
                 allow_missing: Iterable[str] = (), strict: bool = True) -> LoadReport:
    """Load a local checkpoint into ``model`` (its base weights, before adapters).

    Args:
        model: The base backbone from ``registry.build_backbone``.
        path: ``.safetensors``, ``.pt`` or ``.pth`` file.
        remap: Key-remapping table (see module doc).
        allow_missing: Regexes of model keys that may stay at their initial value.
        strict: Raise on any mismatch not allowed; otherwise return the report.

    Raises:
        CheckpointError: Naming the file and listing missing/unexpected/shape mismatches.
    """
    return load_state(model, read_checkpoint(path), source=str(path), remap=remap,
                      allow_missing=allow_missing, strict=strict)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
               remap: Remap = (), allow_missing: Iterable[str] = (),
               strict: bool = True) -> LoadReport:
    """:func:`load_weights` on tensors already read (``source`` names them in errors)."""
    path = source
    state = remap_keys(state, remap)
    own = model.state_dict()
    allowed = [re.compile(p) for p in allow_missing]
    missing = tuple(sorted(k for k in own if k not in state
                           and not any(a.search(k) for a in allowed)))
    unexpected = tuple(sorted(k for k in state if k not in own))
    shapes = tuple(f"{k}: expected {tuple(own[k].shape)}, found {tuple(state[k].shape)}"
                   for k in sorted(state) if k in own and own[k].shape != state[k].shape)
    report = LoadReport(tuple(sorted(k for k in state if k in own and own[k].shape ==
                                     state[k].shape)), missing, unexpected, shapes)
    if strict and not report.ok:
        raise CheckpointError(
            f"checkpoint {path} does not fit the backbone: "
            f"missing {len(missing)} {list(missing[:8])}, unexpected {len(unexpected)} "
            f"{list(unexpected[:8])}, shape mismatches {len(shapes)} {list(shapes[:8])}; "
            "add rules to the remapping table or names to allow_missing")
    fit = {k: state[k] for k in report.loaded}
    model.load_state_dict(fit, strict=False)
    return report


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Save the model's state dict as ``.safetensors`` (or ``.pt``/``.pth`` by suffix)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save
        atomic.write_bytes(path, save(state))
    else:
        atomic.write_torch(path, state)
    return path
