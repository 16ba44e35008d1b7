"""The run configuration: one frozen, validated dataclass, the single source of defaults.

Config enters at the edge (CLI flags, ``[tool.flwr.app.config]`` in ``pyproject.toml``,
``flwr run --run-config``) as a flat mapping of kebab-case keys; ``RunConfig.from_mapping``
turns it into typed fields, and library code only ever sees those fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from fedadapt.config_checks import (CONTINUAL_METHODS, CONTINUAL_SCENARIOS, DEVICES,
                                    TRAIN_DECODER, run_config_errors)

__all__ = ["CONTINUAL_METHODS", "CONTINUAL_SCENARIOS", "DEVICES", "TRAIN_DECODER",
           "ConfigError", "RunConfig"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which key and how to fix it."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a federation run needs, with its defaults.

    Attributes:
        num_server_rounds: Federated rounds to run.
        num_sites: Hospitals in the simulated federation.
        seed: Seed of the backbone, the synthetic data and all samplers.
        local_epochs: Passes over the local data per round at each site.
        lr: Learning rate of the site optimiser (SGD with momentum).
        batch_size: Expected batch size; with Poisson sampling q = batch_size / N.
        dp: Train with DP-SGD (Opacus) at each site.
        noise_multiplier: σ of DP-SGD, requested by the server.
        max_grad_norm: Per-sample clipping norm C of DP-SGD.
        delta: δ at which each site reports ε.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA scaling α (the update is scaled by α / r).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: Mixed precision (bf16 autocast) on CUDA; ignored on CPU.
        site_train_size: Training records at the largest simulated site.
        site_test_size: Held-out records at the largest simulated site.
        image_size: Side of the square synthetic images, in pixels.
        num_classes: Classes of the synthetic classification task.
        out_dir: Parent folder of the run directory ``<out_dir>/<timestamp>/``.
        scenario: A scenario name or TOML path (``simulations/scenarios/``) whose sites
            replace the default synthetic hospitals; empty for the defaults. Its task
            and dimensionality choose the model (``imaging.run_spec.run_model_spec``) and the sites' loss.
        strategy: Aggregation strategy (``strategies/``): fedavg, ffa-lora,
            exact, median, trimmed-mean, fedprox, fedadam, fedyogi, scaffold (FedAvg with
            SCAFFOLD control variates against client drift, Karimireddy et al. ICML 2020;
            not with site-dp, personal-keys, site-ranks, secure aggregation or continual
            scenarios).
        proximal_mu: FedProx proximal weight μ (used by ``fedprox``).
        server_lr: Server learning rate η of ``fedadam`` / ``fedyogi`` (adaptive federated
            optimisation, Reddi et al. ICLR 2021); 0 keeps Flower's default (FedAdam 0.1,
            FedYogi 0.01). On Br35H, FedAdam at 0.1 collapsed to chance: each entry of the
            adapter moves by about η in the first round whatever its gradient's size
            (BENCHMARKS.md), so start near the sites' own lr·steps (e.g. 0.001-0.01).
        personal_keys: Comma-separated tensor-name substrings each *simulated* site keeps
            local (FedPer / FedBN-style personalisation, e.g. ``head`` or ``norm``); empty
            for none. A deployed site sets its own in ``site.toml``.
        wire_dtype: dtype of adapter tensors on the wire in both directions
            (``float32``, ``bfloat16`` or ``float16``); aggregation is in float32.
        site_ranks: Heterogeneous LoRA ranks of the *simulated* sites, comma-separated,
            one per site (e.g. ``8,4``), each ≤ ``lora_rank`` (the global rank on the
            wire); empty: every site trains at ``lora_rank``. Not with ``ffa-lora``
            (its A is a seeded matrix of the global rank).
        epsilon_cap: Record-level ε cap written into the policy of each *simulated* site
            that has none yet (a deployed site's cap is in its own ``policy.toml``).
        site_target_epsilon: > 0: each *simulated* site that has no policy yet gets one
            whose ``target_epsilon_per_run`` is this ε over ``max_rounds_per_run`` =
            ``num-server-rounds`` rounds, so each site calibrates its own σ for its own
            sample rate and trains with the larger of it and ``noise-multiplier`` (set
            that to the smallest σ you accept, e.g. 0.5); 0: off, every site uses the
            server's σ. At most ``epsilon-cap``; DP only.
        sites_dir: Folder of simulated sites' own folders ``<sites-dir>/<site>/``
            (``policy.toml``, ``ledger/``); empty: fresh sites inside the run directory,
            so budgets start at zero each run. Point it at a kept folder to make spending
            compose across runs.
        cross_site_eval: After the last round, evaluate the global adapter and each
            site's last local adapter on every site's test split (up to 16 sites).
        continual: Continual-learning method when ``scenario`` is a continual scenario
            (``site-incremental`` or ``domain-incremental``): naive, ewc, lwf, replay or
            olora (``continual/``).
        phases: Phases of a continual scenario; ``num-server-rounds`` is split evenly.
        ewc_lambda: EWC strength λ (Kirkpatrick et al. 2017) on the Fisher scaled to a
            largest coordinate of 1; the penalty step is stable while lr·λ < 2.
        ewc_clip: Per-example gradient clip C of the DP Fisher; its noise std on the
            mean is σ·C²/N, so C is kept small for a usable signal-to-noise ratio.
        lwf_alpha: Weight of LwF's distillation loss (Li & Hoiem 2017).
        olora_lambda: O-LoRA orthogonality weight (Wang et al. 2023).
        replay_size: Capacity of a site's local replay buffer (records).
        site_dp: Site-level DP at the server (DP-FedAvg): clip each site's adapter
            update to ``site_clip_norm`` and add Gaussian noise to their mean; its
            site-level ε is reported apart from the sites' record-level ε.
        site_noise_multiplier: z of site-level DP (noise std z·S/k on the mean of k).
        site_clip_norm: S, the L2 bound on each site's update under site-level DP.
        backbone_weights: Encoder weights of the frozen ViT: ``builtin`` (the shipped
            MAE-pretrained checkpoint, see ``fedadapt pretrain``), ``random`` (seeded random
            init) or a ``.safetensors``/``.pt``/``.pth`` path (absolute: sites run elsewhere).
        backbone_path: A foundation model from local files instead of the default ViT
            (``imaging.local``): a ``transformers`` ``save_pretrained`` folder (ViT, DINOv2,
            CLIP/SigLIP vision, SAM image encoder), an open_clip local-dir folder or a
            timm-style ViT file; absolute, the same checkpoint at every site (verified by
            sha256); empty for the default.
        train_decoder: ``auto``, ``on`` or ``off``: whether UNETR's convolutional
            encoder/decoder blocks (``encoder1``, ``decoder2``..``decoder5``) train in full
            next to LoRA in its ViT and the head, and travel with the adapters (about 2 M
            more tensors' values per site and round at the default UNETR; see
            docs/researchers/volumes.md for the measured Dice and cost). ``auto``: the
            scenario's ``train_decoder`` (``mni152-tissue``: on), off otherwise. Only for
            segmentation (UNETR) backbones.
        tensorboard: Log per-round, per-site metrics, ε and bytes as TensorBoard scalars
            in ``<run dir>/tensorboard/`` (``server.tracking``; needs ``tensorboard``).
        mlflow: Log the same to MLflow's local file store ``<out_dir>/mlruns``
            (``server.tracking``; needs ``mlflow`` or ``mlflow-skinny``).
        min_train_sites: Fewest successful train replies a round needs; a round with fewer
            is recorded as failed, the global adapter is left as it was and the run goes on.
        round_timeout: Seconds the server waits for the replies of one exchange (training,
            evaluation, a Fisher query); a site still silent then (online but hung) is
            recorded as failed and the round goes on without it. A dead site is noticed by
            Flower sooner (``NODE_UNAVAILABLE`` within ~60 s).
        secure_aggregation: SecAgg+ (Bell et al., CCS 2020) on Flower's Message API: each
            site clips, quantises and masks its adapter update; the server sees only masked
            vectors and learns only their sum (``server.secagg``, ``client.secagg``).
        secagg_clip_norm: L2 bound each site clips its own update (trained − received)
            to before masking; also the quantiser's range per coordinate.
        secagg_threshold: Shares needed to rebuild a site's mask secrets (t of SecAgg+):
            at least 2; a round survives sites that drop after sharing keys while at
            least this many of each site's neighbours answer the unmask stage.
        secagg_num_shares: Neighbours (itself included) each site shares its secrets
            with (SecAgg+'s k); 0: every sampled site (SecAgg's complete graph).
        secagg_max_weight: Weighted FedAvg under secure aggregation: each site masks
            ``w/secagg-max-weight × update`` and its weight factor (w = its example
            count, which must not exceed this); 0: every site weighs 1.
        secagg_noise: ``none`` or ``skellam``: each site adds its share of integer
            Skellam noise before masking (distributed DP, Agarwal et al. NeurIPS 2021),
            so the unmasked sum carries site-level DP, accounted by the server.
        secagg_noise_multiplier: z of distributed DP: the std of the noise in the sum
            of all sampled sites is z × the integer L2 sensitivity of one site.
        resume_from: A run directory whose ``checkpoint.pt`` (``server.checkpoint``) the
            server continues from, after its last completed round; empty for a fresh run.
        drift_monitor: Each site tests, in every training round, a window of its current
            images against a reference window it keeps in its own folder (MMD and
            per-dimension KS on frozen-backbone embeddings, a test of the predicted-class
            distribution; ``client.drift_monitor``) and replies with the p-values and an
            alert bit, a documented known leak (``summary.json`` ``drift``, the report's
            drift panel).
        drift_alpha: False-alarm level of a site's drift alert per round (split over its
            three tests, Bonferroni; BH across embedding dimensions).
        drift_window: Records in a drift window: fresh images of a simulated synthetic
            site each round, else a round's sample of the site's held-out split.
        drift_shift: Simulation only: ``SITE:ROUND`` (a site name or partition index and a
            1-based round) applies an intensity/contrast shift to that site's drift window
            from that round on, to see the monitor raise its alert; empty for none.
        drift_shift_gain: Contrast gain of the injected shift (``x' = gain·x + offset`` on
            the normalised images).
        drift_shift_offset: Brightness offset of the injected shift.
    """

    num_server_rounds: int = 5
    num_sites: int = 3
    seed: int = 0
    local_epochs: int = 2
    lr: float = 0.05
    batch_size: int = 32
    dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    lora_rank: int = 8
    lora_alpha: int = 4
    device: str = "auto"
    amp: bool = True
    site_train_size: int = 480
    site_test_size: int = 160
    image_size: int = 32
    num_classes: int = 3
    out_dir: str = "runs"
    scenario: str = ""
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.0
    personal_keys: str = ""
    wire_dtype: str = "float32"
    site_ranks: str = ""
    epsilon_cap: float = 12.0
    site_target_epsilon: float = 0.0
    sites_dir: str = ""
    cross_site_eval: bool = True
    continual: str = "naive"
    phases: int = 3
    ewc_lambda: float = 10.0
    ewc_clip: float = 0.05
    lwf_alpha: float = 1.0
    olora_lambda: float = 1.0
    replay_size: int = 64
    site_dp: bool = False
    site_noise_multiplier: float = 1.0
    site_clip_norm: float = 1.0
    backbone_weights: str = "builtin"
    backbone_path: str = ""
    train_decoder: str = "auto"
    tensorboard: bool = False
    mlflow: bool = False
    min_train_sites: int = 1
    round_timeout: float = 3600.0
    secure_aggregation: bool = False
    secagg_clip_norm: float = 1.0
    secagg_threshold: int = 2
    secagg_num_shares: int = 0
    secagg_max_weight: int = 1000
    secagg_noise: str = "none"
    secagg_noise_multiplier: float = 1.0
    resume_from: str = ""
    drift_monitor: bool = False
    drift_alpha: float = 0.05
    drift_window: int = 64
    drift_shift: str = ""
    drift_shift_gain: float = 1.5
    drift_shift_offset: float = 0.5

    def __post_init__(self) -> None:
        errors = run_config_errors(self)
        if errors:
            raise ConfigError("invalid run config:\n  " + "\n  ".join(errors))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "RunConfig":
        """Build from kebab-case keys (a Flower run config); unknown keys are rejected.

        Args:
            mapping: Flat mapping such as ``context.run_config``.

        Returns:
            The validated config; keys absent from ``mapping`` keep their defaults.

        Raises:
            ConfigError: On an unknown key, a value of the wrong type, or a bad value.
        """
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run config key(s) {unknown}; known keys are {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            f = known[key]
            kwargs[f.name] = _coerce(key, value, type(getattr(cls(), f.name)))
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The inverse of :meth:`from_mapping` (kebab-case keys, plain values)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def is_continual(self) -> bool:
        """Whether ``scenario`` is a continual scenario (phases of rounds)."""
        return self.scenario in CONTINUAL_SCENARIOS

    @property
    def rounds_per_phase(self) -> int:
        return self.num_server_rounds // self.phases if self.is_continual else self.num_server_rounds

    def phase_of_round(self, server_round: int) -> int:
        """0-based phase of a 1-based round (always 0 outside continual scenarios)."""
        return (server_round - 1) // self.rounds_per_phase if self.is_continual else 0

    def rank_of_site(self, index: int) -> int:
        """The LoRA rank simulated site ``index`` trains at (``site-ranks``, else global)."""
        if not self.site_ranks:
            return self.lora_rank
        return int(self.site_ranks.split(",")[index])

    def drift_shift_at(self) -> tuple[str, int] | None:
        """``drift-shift`` as ``(site name or partition index, first round)``, or None."""
        if not self.drift_shift:
            return None
        site, _, rnd = self.drift_shift.rpartition(":")
        return site.strip(), int(rnd)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Turn a run-config value into the field's type, or say what was wrong."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    return value
