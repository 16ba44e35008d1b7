"""Site-level DP at the server (DP-FedAvg, McMahan et al., ICLR 2018, "Learning
Differentially Private Recurrent Language Models").

A composition wrapper around any adapter strategy: each site's update Δ_k = w_k − w
(over every adapter and head tensor it sent) is clipped to L2 norm ``clip_norm``; the
clipped updates are averaged with equal weights; Gaussian noise of std
``noise_multiplier · clip_norm / k`` is added to the average of the k sites. Replacing or
removing one site changes the sum of clipped updates by at most ``clip_norm``, so each
round is a Gaussian mechanism with noise multiplier ``noise_multiplier`` on the site
level, subsampled at rate q = sites in the round / sites in the federation. Its own
accountant (Opacus RDP) composes the rounds into a *site-level* ε, reported apart from
the record-level ε that each site's ledger holds.

The amplification by q assumes the sites of a round are a uniformly random subset; with
every site asked every round (the default) q = 1 and no amplification is claimed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedadapt import keys
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.strategies.wrapper import StrategyWrapper


def clip_update(update: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``update`` so that its global L2 norm is at most ``clip_norm``.

    Returns:
        The clipped update and the norm before clipping.
    """
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: t * scale for n, t in update.items()}, norm


class SiteLevelDP(StrategyWrapper):
    """Wrap ``inner`` with DP-FedAvg clipping and noise on the adapter update.

    Args:
        inner: The strategy that averages the clipped updates (fedavg / ffa-lora /
            exact / ...); it is given equal weights.
        noise_multiplier: z, the site-level noise multiplier (> 0).
        clip_norm: S, the L2 bound on each site's update.
        num_sites: Sites in the federation (for the sampling rate).
        delta: δ of the site-level ε.
        seed: Seed of the server's noise generator.
    """

    def __init__(self, inner: Strategy, *, noise_multiplier: float, clip_norm: float,
                 num_sites: int, delta: float, seed: int = 0) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"site-level noise multiplier must be > 0, got {noise_multiplier}")
        if not clip_norm > 0:
            raise ValueError(f"site-level clip norm must be > 0, got {clip_norm}")
        super().__init__(inner)
        self.noise_multiplier, self.clip_norm = noise_multiplier, clip_norm
        self.num_sites, self.delta = num_sites, delta
        self.history: list[Mechanism] = []
        self.norms: dict[int, dict[str, float]] = {}
        self._current: dict[str, torch.Tensor] = {}
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def epsilon(self) -> float:
        """Site-level ε after the rounds aggregated so far (RDP, at ``delta``)."""
        return epsilon(self.history, delta=self.delta) if self.history else 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._current = arrays.to_torch_state_dict()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        norms = {}
        for reply in replies:
            sent = reply.content[keys.ARRAYS].to_torch_state_dict()
            clipped, norm = clip_update({n: sent[n] - self._current[n] for n in sent},
                                        self.clip_norm)
            norms[str(reply.content[keys.STATUS][keys.SITE_ID])] = norm
            reply.content[keys.ARRAYS] = ArrayRecord(
                {n: self._current[n] + d for n, d in clipped.items()})
            reply.content[keys.METRICS][keys.NUM_EXAMPLES] = 1  # equal weights
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        k = len(replies)
        std = self.noise_multiplier * self.clip_norm / k
        noised = {n: t + torch.normal(0.0, std, size=t.shape, generator=self._gen).to(t.dtype)
                  for n, t in arrays.to_torch_state_dict().items()}
        self.history.append(Mechanism(self.noise_multiplier, k / self.num_sites, 1))
        self.norms[server_round] = norms
        return ArrayRecord(noised), metrics

    def site_level_report(self) -> dict[str, Any]:
        """The site-level privacy block of ``summary.json``."""
        return {"unit": "site", "mechanism": "DP-FedAvg (clip each site's update, "
                "Gaussian noise on the mean)", "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "delta": self.delta, "accountant": "rdp",
                "rounds": len(self.history),
                "sample_rates": [m.sample_rate for m in self.history],
                "epsilon": self.epsilon,
                "update_norms": {str(r): n for r, n in self.norms.items()}}
