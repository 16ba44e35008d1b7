"""A bounded, site-local replay buffer (reservoir sampling).

Vitter, "Random sampling with a reservoir", ACM TOMS 1985 (algorithm R): after n
offers every item has been kept with probability capacity/n. Records never leave
the site; under DP the replayed records must be part of the dataset that Poisson
sampling draws from (they are counted in the sample rate).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["ReservoirBuffer"]


class ReservoirBuffer:
    """Fixed-capacity reservoir of (x, y) examples with an explicit seeded RNG."""

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be > 0; got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._x)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer one example (algorithm R)."""
        if len(self._x) < self.capacity:
            self._x.append(x.detach().clone())
            self._y.append(y.detach().clone())
        else:
            j = int(self._rng.integers(0, self.seen + 1))
            if j < self.capacity:
                self._x[j] = x.detach().clone()
                self._y[j] = y.detach().clone()
        self.seen += 1

    def extend(self, xs: Iterable[torch.Tensor], ys: Iterable[torch.Tensor]) -> None:
        """Offer each example of a batch in order."""
        for x, y in zip(xs, ys):
            self.add(x, y)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer's examples stacked as (X, Y).

        Raises:
            ValueError: if the buffer is empty.
        """
        if not self._x:
            raise ValueError("replay buffer is empty; add examples before replaying")
        return torch.stack(self._x), torch.stack(self._y)
