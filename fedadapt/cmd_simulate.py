"""``fedadapt simulate``: run a simulated federation of hospitals on Flower's Simulation Engine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedadapt.argtypes import nonneg_float, positive_int
from fedadapt.config import (CONTINUAL_METHODS, CONTINUAL_SCENARIOS, DEVICES, ConfigError,
                             TRAIN_DECODER, RunConfig)
from fedadapt.layout import ADAPTER_DIR, SUMMARY_JSON
from fedadapt.names import SECAGG_NOISES, STRATEGIES, WIRE_DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedadapt simulate`` to the CLI."""
    d = RunConfig()
    p = sub.add_parser("simulate", help="run a simulated federation of hospitals",
                       description="Run a federation of simulated hospitals on Flower's "
                       "Simulation Engine and write runs/<timestamp>/ with summary.json "
                       "and the final adapter in PEFT format.")
    p.add_argument("--rounds", type=positive_int, default=d.num_server_rounds,
                   help=f"federated rounds (default {d.num_server_rounds})")
    p.add_argument("--sites", type=positive_int, default=d.num_sites,
                   help=f"simulated hospitals (default {d.num_sites})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--out", default=d.out_dir, help=f"parent of the run directory "
                   f"(default {d.out_dir}/)")
    p.add_argument("--device", choices=DEVICES, default=d.device,
                   help="auto: CUDA when available (default), else CPU")
    p.add_argument("--gpu-fraction", type=float, default=0.5,
                   help="share of a GPU each site reserves on CUDA (default 0.5)")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--noise-multiplier", type=nonneg_float, default=d.noise_multiplier,
                   help=f"DP-SGD noise multiplier sigma (default {d.noise_multiplier})")
    p.add_argument("--max-grad-norm", type=nonneg_float, default=d.max_grad_norm,
                   help=f"DP-SGD clipping norm (default {d.max_grad_norm})")
    p.add_argument("--local-epochs", type=positive_int, default=d.local_epochs,
                   help=f"local epochs per round (default {d.local_epochs})")
    p.add_argument("--lr", type=nonneg_float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"expected batch size (default {d.batch_size})")
    p.add_argument("--train-size", type=positive_int, default=d.site_train_size,
                   help=f"training records at the largest site (default {d.site_train_size})")
    p.add_argument("--test-size", type=positive_int, default=d.site_test_size,
                   help=f"held-out records at the largest site (default {d.site_test_size})")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--scenario", default="", metavar="NAME_OR_PATH",
                   help="a scenario (simulations/scenarios/NAME.toml or a .toml path): "
                   "classification, multilabel or segmentation (UNETR), 2-D or 3-D; it sets "
                   "the sites, task, image size, classes and seed")
    p.add_argument("--backbone-weights", default=None, metavar="builtin|random|PATH",
                   help=f"frozen encoder weights (default {d.backbone_weights}: the shipped "
                   "MAE-pretrained checkpoint of the default ViT; random for a scenario's "
                   "registry backbone such as UNETR, which has none shipped)")
    p.add_argument("--backbone", default=d.backbone_path, metavar="PATH",
                   help="a foundation model from local files instead of the default ViT: a "
                   "transformers save_pretrained folder (ViT, DINOv2, CLIP/SigLIP vision, "
                   "SAM encoder), an open_clip local-dir folder or a timm-style ViT "
                   ".safetensors/.pth file (nothing is downloaded)")
    p.add_argument("--train-decoder", choices=TRAIN_DECODER, default=d.train_decoder,
                   help="segmentation (UNETR): also train its conv encoder1/decoder blocks "
                   "in full (auto: the scenario's choice, default)")
    p.add_argument("--personal-keys", default=d.personal_keys, metavar="KEYS",
                   help="comma-separated tensor-name parts each site keeps local (e.g. head)")
    p.add_argument("--wire-dtype", choices=WIRE_DTYPES, default=d.wire_dtype,
                   help=f"dtype of adapter tensors on the wire (default {d.wire_dtype})")
    p.add_argument("--site-ranks", default=d.site_ranks, metavar="R1,R2,...",
                   help="one LoRA rank per simulated site (heterogeneous ranks)")
    _add_run_args(p, d)
    p.set_defaults(func=_simulate)


def _add_run_args(p: argparse.ArgumentParser, d: RunConfig) -> None:
    """Tracking, privacy, continual, strategy and fault options of ``simulate``."""
    p.add_argument("--tensorboard", action="store_true",
                   help="log rounds to <run dir>/tensorboard/")
    p.add_argument("--mlflow", action="store_true", help="log rounds to <out>/mlruns (MLflow)")
    p.add_argument("--epsilon-cap", type=nonneg_float, default=d.epsilon_cap,
                   help="epsilon cap written into the policy of each simulated site that has "
                   f"none yet (default {d.epsilon_cap})")
    p.add_argument("--site-target-epsilon", type=nonneg_float, default=d.site_target_epsilon,
                   metavar="EPS", help="each simulated site calibrates its own noise "
                   "multiplier to reach EPS over the run (and uses the larger of it and "
                   "--noise-multiplier); default 0: off")
    p.add_argument("--sites-dir", default=d.sites_dir, metavar="DIR",
                   help="kept folder of the simulated sites' policies and ledgers (spending "
                   "composes across runs); default: fresh ones in the run directory")
    p.add_argument("--site-dp", action="store_true",
                   help="site-level DP at the server (DP-FedAvg clip + noise), reported apart")
    p.add_argument("--site-noise-multiplier", type=nonneg_float, default=d.site_noise_multiplier,
                   help=f"site-level noise multiplier z (default {d.site_noise_multiplier})")
    p.add_argument("--site-clip-norm", type=nonneg_float, default=d.site_clip_norm,
                   help=f"site-level clip norm S of each update (default {d.site_clip_norm})")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+: the server sees only masked updates and their sum")
    p.add_argument("--secagg-clip-norm", type=nonneg_float, default=d.secagg_clip_norm,
                   help="L2 bound each site clips its update to before masking "
                        f"(default {d.secagg_clip_norm})")
    p.add_argument("--secagg-threshold", type=positive_int, default=d.secagg_threshold,
                   help="shares needed to rebuild a dropped site's masks "
                        f"(default {d.secagg_threshold})")
    p.add_argument("--secagg-noise", choices=SECAGG_NOISES, default=d.secagg_noise,
                   help="distributed DP: each site adds its share of integer noise "
                        f"(default {d.secagg_noise})")
    p.add_argument("--secagg-noise-multiplier", type=nonneg_float,
                   default=d.secagg_noise_multiplier,
                   help=f"z of distributed DP (default {d.secagg_noise_multiplier})")
    p.add_argument("--continual", choices=CONTINUAL_METHODS, default=d.continual,
                   help="continual-learning method for --scenario site-incremental or "
                   f"domain-incremental (default {d.continual})")
    p.add_argument("--phases", type=positive_int, default=d.phases,
                   help=f"phases of a continual scenario (default {d.phases}); without "
                   "--rounds a continual run has 2 rounds per phase")
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help=f"aggregation strategy (default {d.strategy}; ffa-lora is exact under DP)")
    p.add_argument("--server-lr", type=nonneg_float, default=d.server_lr,
                   help="server learning rate of fedadam / fedyogi (default 0: Flower's, "
                        "0.1 / 0.01)")
    p.add_argument("--min-train-sites", type=positive_int, default=d.min_train_sites,
                   help="fewest sites that must train for a round to update the global "
                   f"adapter; a round with fewer is recorded as failed (default "
                   f"{d.min_train_sites})")
    p.add_argument("--round-timeout", type=nonneg_float, default=d.round_timeout,
                   metavar="SECONDS", help="seconds to wait for a round's replies before a "
                   f"silent site is recorded as failed (default {d.round_timeout:g})")
    p.add_argument("--resume", default="", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoint, with its stored run "
                   "config and sites (only --rounds may be raised; other flags that differ "
                   "from it are an error)")
    p.add_argument("--drift-monitor", action="store_true",
                   help="each site tests its images for drift every round and replies "
                   "with p-values and an alert (a documented known leak)")
    p.add_argument("--drift-alpha", type=nonneg_float, default=d.drift_alpha,
                   help=f"false-alarm level of a site's drift alert (default {d.drift_alpha})")
    p.add_argument("--drift-window", type=positive_int, default=d.drift_window,
                   help=f"records per drift window (default {d.drift_window})")
    p.add_argument("--drift-shift", default=d.drift_shift, metavar="SITE:ROUND",
                   help="shift the drift window of SITE (name or index) from ROUND on")
    p.add_argument("--drift-shift-gain", type=nonneg_float, default=d.drift_shift_gain,
                   help=f"contrast gain of the injected shift (default {d.drift_shift_gain})")
    p.add_argument("--drift-shift-offset", type=float, default=d.drift_shift_offset,
                   help="brightness offset of the injected shift (default "
                   f"{d.drift_shift_offset})")
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")


def _with_scenario(cfg: RunConfig, name_or_path: str, *,
                   weights_given: bool = True) -> RunConfig:
    """The run config of a scenario: its sites, image size, classes and seed (the task
    and dimensionality follow from ``scenario``, :meth:`RunConfig.model_spec`).

    Without ``--backbone-weights`` a scenario whose backbone is a registry one (UNETR for
    segmentation, the 3-D ViT) starts from seeded random weights, unless the backbone's
    weights ship with an installed package (``efficientnet-lite0``: ``builtin``).
    """
    from fedadapt.imaging.backbones import backbone_for
    from fedadapt.imaging.registry import get_backbone
    from fedadapt.imaging.scenario import SCENARIO_DIR, load_scenario, scenario_path

    try:
        sc = load_scenario(name_or_path)
    except ValueError as e:
        raise ConfigError(f"--scenario: {e}") from e
    path = scenario_path(name_or_path)
    # A shipped name travels as is; a file travels as an absolute path (sites' cwd differs).
    ref = name_or_path if path.parent.resolve() == SCENARIO_DIR.resolve() else str(path.resolve())
    weights = cfg.backbone_weights
    backbone = sc.backbone or backbone_for(sc.task, sc.spatial_dims)
    if not weights_given and backbone and get_backbone(backbone).pretrained is None:
        weights = "random"
    cfg = cfg.replace(scenario=ref, num_sites=len(sc.sites), image_size=sc.image_size,
                      num_classes=sc.num_classes, seed=sc.seed, backbone_weights=weights)
    try:
        from fedadapt.imaging.run_spec import run_model_spec  # MONAI only when it runs

        run_model_spec(cfg)
    except ValueError as e:
        raise ConfigError(f"--scenario {name_or_path!r}: {e}") from e
    return cfg


def _resumed(flags: RunConfig, run_dir: str) -> RunConfig:
    """The run config stored in ``run_dir``'s checkpoint, to continue that run.

    Flags left at their defaults take the checkpoint's values; a flag set to another
    value than the checkpoint's is an error, except ``--rounds``, which may be raised.
    """
    from fedadapt.server.checkpoint import CheckpointError, load_checkpoint

    try:
        ck = load_checkpoint(run_dir)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from e
    stored = {**ck.config, "resume-from": str(run_dir)}
    given, default = flags.to_mapping(), RunConfig().to_mapping()
    if given["num-server-rounds"] != default["num-server-rounds"]:
        stored["num-server-rounds"] = given["num-server-rounds"]
    clash = [f"{k}: given {given[k]!r}, checkpoint {stored.get(k)!r}" for k in sorted(given)
             if k not in ("num-server-rounds", "resume-from") and given[k] != default[k]
             and given[k] != stored.get(k)]
    if clash:
        raise ConfigError(f"--resume {run_dir}: flags differ from the run config in its "
                          "checkpoint:\n  " + "\n  ".join(clash) +
                          "\ndrop these flags; a resumed run keeps its run config")
    try:
        return RunConfig.from_mapping(stored)
    except ConfigError as e:
        raise ConfigError(f"--resume {run_dir}: the checkpoint's run config is invalid: {e}")


def _backbone_path(given: str) -> str:
    """``--backbone`` as an absolute path (sites run in other folders), checked to be a
    folder or file :mod:`imaging.local` can read."""
    if not given:
        return ""
    from pathlib import Path

    from fedadapt.imaging.local import kind

    path = str(Path(given).expanduser().resolve())
    try:
        kind(path)
    except ValueError as e:
        raise ConfigError(f"--backbone: {e}") from e
    return path


def _simulate(args: argparse.Namespace) -> int:
    cfg = RunConfig(num_server_rounds=args.rounds, num_sites=args.sites, seed=args.seed,
                    out_dir=args.out, device=args.device, dp=not args.no_dp,
                    noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm,
                    local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size,
                    site_train_size=args.train_size, site_test_size=args.test_size,
                    amp=not args.no_amp, strategy=args.strategy, server_lr=args.server_lr,
                    min_train_sites=args.min_train_sites, epsilon_cap=args.epsilon_cap,
                    site_target_epsilon=args.site_target_epsilon,
                    round_timeout=args.round_timeout,
                    sites_dir=args.sites_dir, site_dp=args.site_dp,
                    site_noise_multiplier=args.site_noise_multiplier,
                    site_clip_norm=args.site_clip_norm,
                    backbone_weights=args.backbone_weights or RunConfig().backbone_weights,
                    personal_keys=args.personal_keys, wire_dtype=args.wire_dtype,
                    site_ranks=args.site_ranks, tensorboard=args.tensorboard,
                    mlflow=args.mlflow, backbone_path=_backbone_path(args.backbone),
                    train_decoder=args.train_decoder,
                    drift_monitor=args.drift_monitor, drift_alpha=args.drift_alpha,
                    drift_window=args.drift_window, drift_shift=args.drift_shift,
                    drift_shift_gain=args.drift_shift_gain,
                    drift_shift_offset=args.drift_shift_offset,
                    secure_aggregation=args.secure_aggregation,
                    secagg_clip_norm=args.secagg_clip_norm,
                    secagg_threshold=args.secagg_threshold, secagg_noise=args.secagg_noise,
                    secagg_noise_multiplier=args.secagg_noise_multiplier)
    if args.scenario in CONTINUAL_SCENARIOS:
        rounds = (args.rounds if args.rounds != RunConfig().num_server_rounds
                  else 2 * args.phases)
        cfg = cfg.replace(scenario=args.scenario, continual=args.continual,
                          phases=args.phases, num_server_rounds=rounds)
    elif args.scenario:
        d = RunConfig()
        if (args.continual, args.phases) != (d.continual, d.phases):
            raise ConfigError(f"--continual/--phases apply to --scenario "
                              f"{' or '.join(CONTINUAL_SCENARIOS)}; scenario {args.scenario!r} "
                              "is not continual (continual methods are classification-only)")
        cfg = _with_scenario(cfg, args.scenario,
                             weights_given=args.backbone_weights is not None)
    if args.resume:
        cfg = _resumed(cfg, args.resume)
    if cfg.backbone_path:
        try:
            from fedadapt.imaging.run_spec import run_model_spec

            run_model_spec(cfg)
        except ValueError as e:
            raise ConfigError(f"--backbone: {e}") from e
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was given but torch sees no CUDA device; install "
                              "a CUDA build of torch (see README) or use --device auto")
    from fedadapt.simulations.runner import simulate

    run_dir = simulate(cfg, gpu_fraction=args.gpu_fraction, verbose=args.verbose)
    print(f"summary: {run_dir / SUMMARY_JSON}\nadapter: {run_dir / ADAPTER_DIR}")
    return _outcome(run_dir)


def _outcome(run_dir: Path) -> int:
    """1 (with the sites and reasons on stderr) if a site failed in every round, else 0."""
    from fedadapt.simulations.outcome import persistent_failures

    failures = persistent_failures(json.loads((run_dir / SUMMARY_JSON).read_text()))
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    if failures:
        print(f"error: the run in {run_dir} did not federate every site; see "
              "summary.json 'rounds[].failures'", file=sys.stderr)
    return 1 if failures else 0
