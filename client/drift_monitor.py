"""Drift surveillance at a site, in every training round (post-market monitoring).

In each round the site embeds a window of its current images with the *frozen*
backbone (the adapters disabled, so the embedding does not move as the federation
trains) and tests it against a reference window (``reference_factor`` windows' worth of
records) it built at its first monitored round and keeps in its own folder (``<site_dir>/drift/<run key>/reference.safetensors``,
written atomically): the MMD permutation test and per-dimension KS with
Benjamini-Hochberg control on the embeddings, and a permutation chi-square test of the
predicted-class distribution of both windows under the model the site received
(:func:`client.drift.drift_test`, each test at α/3). Only the three p-values, the
alert bit and the reference round leave the site (:class:`fedadapt.messages.DriftReport`,
a documented known leak).

The window: a simulated synthetic site draws fresh unlabelled images from its own
scanner each round (:func:`imaging.synthetic.window_images`); any other site (files, a
scenario, a continual phase) samples its held-out split. ``drift-shift`` injects an
intensity/contrast shift into one site's window from a given round on (simulation), so
the alert can be seen to fire.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft.utils import ModulesToSaveWrapper
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from fedadapt import atomic
from fedadapt.client.drift import DriftConfig, drift_test
from fedadapt.client.memory import memory_folder
from fedadapt.client.site import Site
from fedadapt.client.train import resolve_device
from fedadapt.config import RunConfig
from fedadapt.imaging.synthetic import IntensityShift, window_images
from fedadapt.layout import DRIFT_DIR, DRIFT_REFERENCE
from fedadapt.messages import DriftReport


@dataclass(frozen=True)
class MonitorConfig:
    """A site's drift monitor, from the run config (``drift-*`` keys).

    Attributes:
        alpha: False-alarm level of the alert per round.
        window: Records per current window.
        reference_factor: The reference window holds this many windows' records: a
            larger reference keeps the false-alarm rate over the rounds tested against
            the *one* kept reference near ``alpha`` (with a reference the size of a
            window, an atypical draw of it makes many rounds alarm together).
        permutations: Permutations of the MMD and prediction tests.
        shift_site: Simulation: the site (name or partition index) whose window is
            shifted, or '' for none.
        shift_round: The first shifted round.
        shift: The injected shift.
    """

    alpha: float = 0.05
    window: int = 64
    reference_factor: int = 4
    permutations: int = 200
    shift_site: str = ""
    shift_round: int = 0
    shift: IntensityShift = IntensityShift()

    def __post_init__(self) -> None:
        DriftConfig(alpha=self.alpha, permutations=self.permutations)  # validates both
        if self.window < 8 or self.reference_factor < 1:
            raise ValueError(f"MonitorConfig.window must be >= 8 and reference_factor >= 1, "
                             f"got {self.window} and {self.reference_factor}")

    @classmethod
    def from_run(cls, run: RunConfig) -> MonitorConfig | None:
        """The monitor ``run`` asks for, or None when ``drift-monitor`` is off."""
        if not run.drift_monitor:
            return None
        site, rnd = run.drift_shift_at() or ("", 0)
        return cls(alpha=run.drift_alpha, window=run.drift_window, shift_site=site,
                   shift_round=rnd, shift=IntensityShift(run.drift_shift_gain,
                                                         run.drift_shift_offset))

    def shifted(self, site: Site, rnd: int) -> bool:
        """Whether ``site``'s window is shifted in round ``rnd``."""
        named = self.shift_site in (site.name, str(site.index))
        return bool(self.shift_site) and named and rnd >= self.shift_round


def _fresh_windows(site: Site) -> bool:
    """A simulated synthetic site of the default federation generates fresh windows."""
    return (site.scenario is None and site.continual() is None
            and (site.config is None or site.config.synthetic))


def current_window(site: Site, cfg: MonitorConfig, rnd: int, phase: int = 0, *,
                   reference: bool = False) -> torch.Tensor:
    """The images the site monitors in round ``rnd`` (shifted when ``cfg`` says so), or,
    with ``reference``, the larger reference window built in that round."""
    n = cfg.window * (cfg.reference_factor if reference else 1)
    if _fresh_windows(site):
        images = window_images(site.spec, n, image_size=site.run.image_size,
                               seed=site.run.seed, site_index=site.index, window=rnd)
    else:
        held_out = site.datasets(phase)[1].tensors[0]  # type: ignore[attr-defined]
        gen = torch.Generator().manual_seed(hash((site.run.seed, site.index, rnd, 31)) % 2**31)
        images = held_out[torch.randperm(len(held_out), generator=gen)[:n]]
    return cfg.shift.apply(images) if cfg.shifted(site, rnd) else images


def _pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, C): spatial maps (a segmentation head's input) mean-pooled."""
    return x.flatten(2).mean(2) if x.ndim > 2 else x


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int
          ) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen-backbone embeddings and the model's predicted classes of ``images``.

    The embedding is the input of the task head (the last ``modules_to_save`` module a
    forward pass calls) with every adapter disabled: the backbone alone, the same in
    every round of the run. The predictions are the model's as it is (adapters on).

    Returns:
        ``(embeddings (n, d) float64 on CPU, predicted classes (n,) int64)``.

    Raises:
        ValueError: If the model has no head (``modules_to_save``) to read features from.
    """
    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if not heads or not hasattr(model, "disable_adapter"):
        raise ValueError("drift monitor: the model has no PEFT head (modules_to_save) whose "
                         "input is the backbone's embedding; it needs a PeftModel")
    seen: list[torch.Tensor] = []
    hooks = [h.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for h in heads]
    was_training = model.training
    model.to(device).eval()
    feats, preds = [], []
    try:
        for batch in images.split(batch_size):
            x = batch.to(device)
            seen.clear()
            with model.disable_adapter():
                model(x)
            feats.append(_pool(seen[-1]).double().cpu())
            logits = model(x)
            preds.append(_pool(logits).argmax(1).cpu())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return torch.cat(feats), torch.cat(preds).numpy().astype(np.int64)


def _reference_path(site_dir: Path | None, run_key: str) -> Path:
    folder = memory_folder(site_dir, run_key, DRIFT_DIR)
    if folder is None:
        raise ValueError("drift monitor: the site keeps its reference window in its own "
                         "folder under the run key, but it has no folder (node config "
                         "'site-dir' or run config 'sites-dir') or the server sent no run key")
    return folder / DRIFT_REFERENCE


def load_reference(path: Path) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(images, embeddings, round built)`` kept at ``path``, or None before the first.

    Raises:
        ValueError: If the file is unreadable or not one :func:`save_reference` wrote.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"drift reference {path} is unreadable ({err}); move it away to "
                         "rebuild it in the next round") from err
    if {"images", "embeddings"} - set(tensors) or "round" not in meta:
        raise ValueError(f"drift reference {path} is not one this monitor wrote (needs "
                         f"'images', 'embeddings' and a 'round'); move it away to rebuild it")
    return tensors["images"], tensors["embeddings"], int(meta["round"])


def save_reference(path: Path, images: torch.Tensor, embeddings: torch.Tensor, rnd: int) -> None:
    """Keep the reference window at the site (atomic replace)."""
    atomic.write_bytes(path, save({"images": images.contiguous(),
                                   "embeddings": embeddings.contiguous()},
                                  metadata={"round": str(rnd)}))


def monitor_round(site: Site, model: nn.Module, cfg: MonitorConfig, *, rnd: int,
                  run_key: str, site_dir: Path | None, phase: int = 0) -> DriftReport:
    """Test round ``rnd``'s window against the site's reference (built now if none).

    Args:
        site: The site.
        model: The model with the received global tensors loaded (not trained yet).
        cfg: The monitor's settings.
        rnd: The 1-based round.
        run_key: The federation run's name (the reference is kept per run).
        site_dir: The site's folder.
        phase: Continual runs: the round's phase (whose held-out split is sampled).

    Raises:
        ValueError: Without a site folder, or on a reference of another embedding width.
    """
    path = _reference_path(site_dir, run_key)
    device = resolve_device(site.run.device)
    kept = load_reference(path)
    if kept is None or kept[2] >= rnd:  # first monitored round (or that round asked again)
        images = current_window(site, cfg, rnd, phase, reference=True)
        emb, _ = embed(model, images, device=device, batch_size=site.run.batch_size)
        save_reference(path, images, emb, rnd)
        return DriftReport(alert=False, mmd_p=1.0, ks_p=1.0, pred_p=1.0, reference_round=rnd)
    emb, pred = embed(model, current_window(site, cfg, rnd, phase), device=device,
                      batch_size=site.run.batch_size)
    ref_images, ref_emb, ref_round = kept
    if ref_emb.shape[1] != emb.shape[1]:
        raise ValueError(f"drift reference {path} has embeddings of width {ref_emb.shape[1]}, "
                         f"the model's are {emb.shape[1]}: the backbone changed; move the "
                         "file away to rebuild the reference")
    _, ref_pred = embed(model, ref_images, device=device, batch_size=site.run.batch_size)
    gen = torch.Generator().manual_seed(hash((site.run.seed, site.index, rnd, 7)) % 2**31)
    res = drift_test(ref_emb, emb, DriftConfig(alpha=cfg.alpha, permutations=cfg.permutations),
                     generator=gen, reference_pred=ref_pred, current_pred=pred)
    return DriftReport(alert=res.alert, mmd_p=res.mmd_p, ks_p=res.ks_p, pred_p=res.pred_p,
                       reference_round=ref_round)
