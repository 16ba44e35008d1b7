"""What a run config means for the model and the task (the core's ``RunConfig`` knows no
imaging, so the mapping from its fields to a :class:`ModelSpec` lives here)."""

from __future__ import annotations

from fedadapt.config import ConfigError, RunConfig
from fedadapt.imaging.backbones import ModelSpec, backbone_for
from fedadapt.imaging.scenario import load_scenario


def run_task(cfg: RunConfig) -> tuple[str, int]:
    """``(task, spatial_dims)`` of the run: its scenario's, else 2-D classification.

    Raises:
        ConfigError: If ``image-size`` or ``num-classes`` differ from the scenario's
            (``fedadapt simulate --scenario`` copies them; ``flwr run`` must set them).
    """
    if not cfg.scenario or cfg.is_continual:
        return "classification", 2
    sc = load_scenario(cfg.scenario)
    if (cfg.image_size, cfg.num_classes) != (sc.image_size, sc.num_classes):
        raise ConfigError(f"scenario {cfg.scenario!r} has image_size={sc.image_size}, "
                          f"num_classes={sc.num_classes} but the run config has "
                          f"image-size={cfg.image_size}, num-classes={cfg.num_classes}; "
                          "set them to the scenario's")
    return sc.task, sc.spatial_dims


def run_model_spec(cfg: RunConfig) -> ModelSpec:
    """The architecture every site and the server build from ``cfg``."""
    task, dims = run_task(cfg)
    backbone = _scenario_backbone(cfg) or backbone_for(task, dims)
    return ModelSpec(image_size=cfg.image_size, num_classes=cfg.num_classes,
                     lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, seed=cfg.seed,
                     backbone_weights="random" if cfg.backbone_path else cfg.backbone_weights,
                     task=task, spatial_dims=dims,
                     backbone="" if cfg.backbone_path else backbone,
                     backbone_path=cfg.backbone_path, train_decoder=run_train_decoder(cfg))


def run_train_decoder(cfg: RunConfig) -> bool:
    """``train-decoder``: ``on``/``off`` as given; ``auto``: the scenario's
    ``train_decoder`` (off without a scenario)."""
    if cfg.train_decoder != "auto":
        return cfg.train_decoder == "on"
    if not cfg.scenario or cfg.is_continual:
        return False
    return load_scenario(cfg.scenario).train_decoder


def _scenario_backbone(cfg: RunConfig) -> str:
    """The registry backbone a scenario names (``backbone = ...``), else empty."""
    if not cfg.scenario or cfg.is_continual:
        return ""
    return load_scenario(cfg.scenario).backbone
