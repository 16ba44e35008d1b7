"""Validation of a ``RunConfig``: every error at once, each naming its key.

``RunConfig.__post_init__`` calls :func:`run_config_errors` and raises one
``ConfigError`` listing them all; the checks live here so that the dataclass module
stays the single, readable list of keys and defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedadapt.names import SECAGG_NOISES, SECAGG_STRATEGIES, SERVER_OPT, STRATEGIES, WIRE_DTYPES

if TYPE_CHECKING:
    from fedadapt.config import RunConfig

DEVICES = ("auto", "cpu", "cuda")
CONTINUAL_METHODS = ("naive", "ewc", "lwf", "replay", "olora")
CONTINUAL_SCENARIOS = ("site-incremental", "domain-incremental")
#: ``train-decoder``: the scenario's choice, or on / off whatever it says.
TRAIN_DECODER = ("auto", "on", "off")

#: ``need(ok, key, expected)``: records "'key' must be expected, got value" unless ok.
Need = Callable[[bool, str, str], None]


def run_config_errors(cfg: "RunConfig") -> list[str]:
    """Every reason ``cfg`` is invalid, one line each (empty when it is valid)."""
    errors: list[str] = []

    def need(cond: bool, key: str, expected: str) -> None:
        if not cond:
            value = getattr(cfg, key.replace("-", "_"))
            errors.append(f"'{key}' must be {expected}, got {value!r}")

    need(cfg.num_server_rounds >= 1, "num-server-rounds", "an integer >= 1")
    need(cfg.num_sites >= 1, "num-sites", "an integer >= 1")
    need(cfg.local_epochs >= 1, "local-epochs", "an integer >= 1")
    need(cfg.lr > 0, "lr", "a positive number")
    need(cfg.batch_size >= 1, "batch-size", "an integer >= 1")
    need(cfg.noise_multiplier >= 0, "noise-multiplier", "a number >= 0")
    need(cfg.max_grad_norm > 0, "max-grad-norm", "a positive number")
    need(0 < cfg.delta < 1, "delta", "a number in (0, 1)")
    need(cfg.lora_rank >= 1, "lora-rank", "an integer >= 1")
    need(cfg.lora_alpha > 0, "lora-alpha", "a positive number")
    need(cfg.device in DEVICES, "device", f"one of {', '.join(DEVICES)}")
    need(cfg.site_train_size >= 8, "site-train-size", "an integer >= 8")
    need(cfg.site_test_size >= 4, "site-test-size", "an integer >= 4")
    need(cfg.image_size >= 16 and cfg.image_size % 4 == 0, "image-size", "a multiple of 4, at least 16")
    if cfg.scenario and not cfg.is_continual:  # a scenario's own classes or labels
        need(cfg.num_classes >= 2, "num-classes", "an integer >= 2")
    else:
        need(2 <= cfg.num_classes <= 3, "num-classes",
             "2 or 3 (the synthetic task has 3 classes)")
    need(bool(cfg.out_dir), "out-dir", "a folder path")
    need(cfg.strategy in STRATEGIES, "strategy", f"one of {', '.join(STRATEGIES)}")
    need(cfg.proximal_mu >= 0, "proximal-mu", "a number >= 0")
    need(cfg.server_lr >= 0 and (cfg.server_lr == 0 or cfg.strategy in SERVER_OPT),
         "server-lr", f"0 (Flower's default), or > 0 with strategy "
         f"{' or '.join(SERVER_OPT)} (strategy {cfg.strategy!r} has no server optimiser)")
    need(all(k.strip() for k in cfg.personal_keys.split(",")) or not cfg.personal_keys,
         "personal-keys", "comma-separated non-empty tensor-name substrings, or empty")
    need(cfg.wire_dtype in WIRE_DTYPES, "wire-dtype", f"one of {', '.join(WIRE_DTYPES)}")
    if cfg.site_ranks:
        ranks = [r.strip() for r in cfg.site_ranks.split(",")]
        fits = all(r.isdigit() and 1 <= int(r) <= cfg.lora_rank for r in ranks)
        need(len(ranks) == cfg.num_sites and fits, "site-ranks",
             f"{cfg.num_sites} comma-separated integers in 1..lora-rank={cfg.lora_rank}")
        need(cfg.strategy != "ffa-lora", "site-ranks",
             "empty with strategy ffa-lora (its frozen A has the global rank; use exact)")
    need(cfg.continual in CONTINUAL_METHODS, "continual",
         f"one of {', '.join(CONTINUAL_METHODS)}")
    need(cfg.phases >= 2, "phases", "an integer >= 2")
    need(cfg.ewc_lambda >= 0, "ewc-lambda", "a number >= 0")
    if cfg.continual == "ewc" and cfg.lr * cfg.ewc_lambda >= 2:
        errors.append(f"'lr' x 'ewc-lambda' = {cfg.lr * cfg.ewc_lambda:g} >= 2: the EWC "
                      "penalty step would diverge; lower 'ewc-lambda' below "
                      f"{2 / cfg.lr:g}")
    need(cfg.ewc_clip > 0, "ewc-clip", "a positive number")
    need(cfg.lwf_alpha >= 0, "lwf-alpha", "a number >= 0")
    need(cfg.olora_lambda >= 0, "olora-lambda", "a number >= 0")
    need(cfg.replay_size >= 1, "replay-size", "an integer >= 1")
    if cfg.scenario in CONTINUAL_SCENARIOS:
        if cfg.num_server_rounds % cfg.phases:
            errors.append(f"'num-server-rounds' ({cfg.num_server_rounds}) must be a multiple "
                          f"of 'phases' ({cfg.phases}) in a continual scenario")
        if cfg.scenario == "site-incremental" and cfg.num_sites < cfg.phases:
            errors.append(f"site-incremental needs 'num-sites' >= 'phases' (one new site "
                          f"per phase), got {cfg.num_sites} < {cfg.phases}")
        if (cfg.scenario == "site-incremental" and cfg.continual == "ewc"
                and cfg.site_ranks.strip()):
            errors.append("site-incremental 'ewc' sums the sites' Fishers at the server, "
                          "which needs one LoRA rank: leave 'site-ranks' empty")
    _check_privacy(cfg, need)
    need(cfg.min_train_sites >= 1, "min-train-sites", "an integer >= 1")
    need(cfg.round_timeout > 0, "round-timeout", "a number of seconds > 0")
    _check_model(cfg, need)
    errors.extend(_scaffold_errors(cfg))
    _check_drift(cfg, need)
    if cfg.dp and cfg.noise_multiplier == 0:
        errors.append("'noise-multiplier' is 0 while 'dp' is on: that is no privacy at all; "
                      "set a positive noise multiplier or turn DP off explicitly (--no-dp)")
    errors.extend(_secagg_errors(cfg))
    return errors


def _check_model(cfg: "RunConfig", need: Need) -> None:
    """The model keys (``need(ok, key, expected)`` collects an error)."""
    need(cfg.backbone_weights in ("builtin", "random") or cfg.backbone_weights.lower()
         .endswith((".safetensors", ".pt", ".pth")), "backbone-weights",
         "'builtin', 'random' or a .safetensors/.pt/.pth file path")
    need(not cfg.backbone_path or cfg.backbone_weights in ("builtin", "random"),
         "backbone-weights",
         "left at its default with 'backbone-path' (the weights are the checkpoint's)")
    need(cfg.train_decoder in TRAIN_DECODER, "train-decoder",
         f"one of {', '.join(TRAIN_DECODER)}")


def _check_privacy(cfg: "RunConfig", need: Need) -> None:
    """The simulated sites' policy keys and site-level DP (``need`` as below)."""
    need(cfg.epsilon_cap > 0, "epsilon-cap", "a positive number")
    need(0 <= cfg.site_target_epsilon <= cfg.epsilon_cap, "site-target-epsilon",
         f"0 (off) or a number in (0, epsilon-cap={cfg.epsilon_cap}]")
    need(cfg.dp or cfg.site_target_epsilon == 0, "site-target-epsilon",
         "0 when dp is off (there is no noise to calibrate)")
    need(cfg.site_noise_multiplier > 0, "site-noise-multiplier", "a positive number")
    need(cfg.site_clip_norm > 0, "site-clip-norm", "a positive number")


def _check_drift(cfg: "RunConfig", need: Need) -> None:
    """The ``drift-*`` keys (``need(ok, key, expected)`` collects an error)."""
    need(0 < cfg.drift_alpha < 1, "drift-alpha", "a number in (0, 1)")
    need(8 <= cfg.drift_window <= 4096, "drift-window", "an integer in 8..4096")
    need(cfg.drift_shift_gain > 0, "drift-shift-gain", "a positive number")
    if cfg.drift_shift:
        site, _, rnd = cfg.drift_shift.rpartition(":")
        need(bool(site.strip()) and rnd.isdigit() and int(rnd) >= 1, "drift-shift",
             "'SITE:ROUND' (a site name or partition index, a round >= 1), or empty")
        need(cfg.drift_monitor, "drift-shift",
             "empty unless 'drift-monitor' is true (a shift nothing watches)")


def _scaffold_errors(cfg: "RunConfig") -> list[str]:
    """Why ``strategy = "scaffold"`` does not fit the other keys (empty if it does).

    SCAFFOLD's control variates assume every trained tensor starts from the global one
    and are computed from each site's own update, so what breaks either is refused."""
    if cfg.strategy != "scaffold":
        return []
    out = []
    if cfg.site_dp:
        out.append("'strategy' = \"scaffold\" with 'site-dp': the control variates are "
                   "computed from the sites' un-noised updates and sent back to every site, "
                   "which would release what site-level DP noises; use fedavg or fedprox "
                   "with 'site-dp'")
    if cfg.personal_keys.strip():
        out.append("'strategy' = \"scaffold\" with 'personal-keys': a personalised tensor "
                   "does not start from the global one, so its control variate is "
                   "meaningless; leave 'personal-keys' empty")
    if cfg.site_ranks.strip():
        out.append("'strategy' = \"scaffold\" with 'site-ranks': a site's correction "
                   "must have its tensors' shapes; leave 'site-ranks' empty")
    if cfg.is_continual:
        out.append(f"'strategy' = \"scaffold\" with 'scenario' = {cfg.scenario!r}: "
                   "continual scenarios are not supported with scaffold yet")
    return out


def _secagg_errors(cfg: "RunConfig") -> list[str]:
    """Why the secure-aggregation keys do not fit together (empty if they do).

    Secure aggregation hides every individual update from the server, so anything
    that needs one is refused together with it rather than silently weakened."""
    errors = []
    if cfg.secagg_clip_norm <= 0:
        errors.append(f"'secagg-clip-norm' must be a positive number, got "
                      f"{cfg.secagg_clip_norm!r}")
    if cfg.secagg_max_weight < 0:
        errors.append(f"'secagg-max-weight' must be an integer >= 0, got "
                      f"{cfg.secagg_max_weight!r}")
    if cfg.secagg_noise not in SECAGG_NOISES:
        errors.append(f"'secagg-noise' must be one of {', '.join(SECAGG_NOISES)}, got "
                      f"{cfg.secagg_noise!r}")
    if cfg.secagg_noise_multiplier <= 0:
        errors.append(f"'secagg-noise-multiplier' must be a positive number, got "
                      f"{cfg.secagg_noise_multiplier!r}")
    if not cfg.secure_aggregation:
        if cfg.secagg_noise != "none":
            errors.append(f"'secagg-noise' = {cfg.secagg_noise!r} needs "
                          "'secure-aggregation' = true (the noise shares only protect "
                          "the sum)")
        return errors
    why = "needs each site's individual update, which secure aggregation hides"
    if cfg.strategy not in SECAGG_STRATEGIES:
        reason = why if cfg.strategy in ("exact", "median", "trimmed-mean", "scaffold") else \
            "aggregates with a server optimiser not wired to secure aggregation"
        errors.append(f"'strategy' = {cfg.strategy!r} {reason}; with "
                      f"'secure-aggregation' use one of {', '.join(SECAGG_STRATEGIES)}")
    if cfg.site_dp:
        errors.append(f"'site-dp' (server-side clipping of each update) {why}; use "
                      "'secagg-noise' = \"skellam\" for site-level DP with secure "
                      "aggregation")
    if cfg.is_continual:
        errors.append(f"'scenario' = {cfg.scenario!r}: continual scenarios are not "
                      "supported with 'secure-aggregation' yet")
    if cfg.num_sites < 3:
        errors.append(f"'secure-aggregation' needs 'num-sites' >= 3, got "
                      f"{cfg.num_sites} (with 2, each site could subtract its own "
                      "update from the sum)")
    shares = cfg.secagg_num_shares or cfg.num_sites
    if not 2 <= cfg.secagg_threshold <= min(shares, cfg.num_sites):
        errors.append(f"'secagg-threshold' must be in 2..{min(shares, cfg.num_sites)} "
                      f"(the shares each site makes), got {cfg.secagg_threshold}")
    if cfg.secagg_num_shares and not 3 <= cfg.secagg_num_shares <= cfg.num_sites:
        errors.append(f"'secagg-num-shares' must be 0 or in 3..num-sites="
                      f"{cfg.num_sites}, got {cfg.secagg_num_shares}")
    return errors

