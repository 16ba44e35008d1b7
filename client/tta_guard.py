"""The label-free safeguard of test-time adaptation (our addition; not in Tent or SAR).

Tent (Wang et al., ICLR 2021) has no safeguard; SAR (Niu et al., ICLR 2023) resets when
an EMA of the mean entropy collapses, which catches *collapse* but not a model that
becomes confidently wrong on part of the data while its entropy stays moderate (measured
here: SAR at lr 1e-2 cost an unshifted site 2.7 points with no reset, BENCHMARKS.md).

The rule, with no label read:

1. a seeded random share (``TTAConfig.holdout_fraction``) of the site's unlabelled images
   is **held back**: it is never adapted on;
2. before adapting, the released model predicts it: every held-back image is in the
   check set (default), or, with ``guard_confidence`` set, only those the released model
   is confident on (entropy < ``guard_confidence · ln C``; all if none is);
3. after adaptation (and every ``check_every`` batches, if set) the adapted model
   predicts it too. If the share of the check set whose predicted class **flipped**
   exceeds ``tolerance`` (default 0.01, the issue's "never more than 1 point worse"), or
   the mean entropy over the held-back images rose by more than
   ``max_entropy_increase`` nats, the model is **reverted to the released weights** and
   adaptation stops; the report says so and why.

Why flips: a changed prediction is the only way accuracy can change, so the flip rate on
an independent sample of the site bounds the accuracy loss on that sample (up to
sampling error). The confident-only variant is looser and, measured, misses real damage:
SAR at lr 1e-2 cost an unshifted synthetic site 2.3 points with *no* flip among the
images the released model was confident on (BENCHMARKS.md). The rule trades recovery for
safety: an adaptation that changes more than ``tolerance`` of the predictions is
reverted even when the changes are corrections, so it can gain at most about that much.
With fewer than ``1 / tolerance`` images in the check set a single flip reverts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SafeguardCheck:
    """One comparison of the adapted model with the released one on the held-back split.

    Attributes:
        after_batches: Stream batches adapted on when the check ran.
        held_back: Held-back images compared.
        checked: Of them, the check set (all; or those the released model was
            confident on, with ``guard_confidence``).
        flips: Check-set images whose predicted class changed.
        flip_rate: ``flips / checked``.
        entropy_released: Mean entropy (nats) of the released model on the held-back images.
        entropy_adapted: The same for the adapted model.
        failed: Whether the check failed (the model is then reverted).
        reason: Why it failed ("" when it passed).
    """

    after_batches: int
    held_back: int
    checked: int
    flips: int
    flip_rate: float
    entropy_released: float
    entropy_adapted: float
    failed: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def holdout_mask(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Which of ``n`` images are held back: a seeded random ``round(fraction · n)`` of
    them (at least one when ``fraction > 0`` and ``n >= 2``, never all); ``(n,)`` bool."""
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n >= 2 else 0
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=gen)[:k]] = True
    return held


def split_holdout(images: torch.Tensor, fraction: float, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stream, held back)`` by :func:`holdout_mask`; both keep the images' order.
    ``fraction = 0`` holds nothing back."""
    held = holdout_mask(images.shape[0], fraction, seed)
    return images[~held], images[held]


def compare(released: torch.Tensor, adapted: torch.Tensor, *, confident_below: float | None,
            tolerance: float, max_entropy_increase: float, after_batches: int
            ) -> SafeguardCheck:
    """Apply the rule to logits ``(N, C)`` of the released and adapted model on the same
    held-back images (same order); ``confident_below=None`` checks every image."""
    from fedadapt.client.tta import entropy

    h_rel, h_ad = entropy(released), entropy(adapted)
    mask = (h_rel < confident_below if confident_below is not None
            else torch.ones_like(h_rel, dtype=torch.bool))
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    flipped = (released.argmax(1) != adapted.argmax(1)) & mask
    checked, flips = int(mask.sum()), int(flipped.sum())
    rate = flips / max(checked, 1)
    e_rel, e_ad = float(h_rel.mean()), float(h_ad.mean())
    reasons = []
    if rate > tolerance:
        which = "" if confident_below is None else " the released model was confident on"
        reasons.append(f"{flips} of {checked} held-back images{which} changed class "
                       f"({100 * rate:.1f} % > {100 * tolerance:.1f} %)")
    if e_ad - e_rel > max_entropy_increase:
        reasons.append(f"mean entropy on the held-back images rose {e_rel:.3f} -> "
                       f"{e_ad:.3f} nats (> +{max_entropy_increase})")
    return SafeguardCheck(after_batches, int(released.shape[0]), checked, flips, rate, e_rel,
                          e_ad, bool(reasons), "; ".join(reasons))
