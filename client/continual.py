"""Continual learning at a site: what a site keeps between phases, and how it shapes a
round's local training. The math is in ``continual/``; this is the glue.

A site's continual state lives in Flower's ``context.state``, written through to the
site's folder (``client.memory.SiteMemory``) so that it survives a restarted SuperNode
and a resumed server. At the
first round of a new phase, the global adapter the site receives is the final model of
the previous phase; it becomes the *anchor*:

- ``ewc`` (Kirkpatrick et al., PNAS 2017): penalty λ/2 Σ F_i (θ_i − θ*_i)² towards the
  anchor, with the diagonal Fisher F computed **under DP** (per-example clipping +
  Gaussian noise) and recorded in the ledger of the data it was computed on. In
  domain-incremental a site computes F on its own previous phase's data and keeps it (the
  penalty shapes the update that leaves the site). In site-incremental the sites of a
  new phase hold no earlier data: FedCurv-style (Shoham et al., 2019), the sites of the
  phase that ended each send a DP Fisher of their data to the server, which sums the
  phases' size-weighted means (online EWC) and sends it with every round of the next
  phases (``keys.FISHER``);
- ``lwf`` (Li & Hoiem, TPAMI 2017): distillation from the anchor model on the current
  data, added to the per-example loss (so it is inside DP-SGD's clipping);
- ``replay``: a bounded reservoir of earlier phases' records, kept at the site and
  trained on with the current data (Poisson sampling over the union). In
  site-incremental a site whose phase has ended keeps a reservoir of ``replay-size`` of
  its records and *rehearses* it in the later phases' rounds (its other records are not
  used again). Either way a round is charged to the ledger of every dataset whose records
  the training set holds (``ContinualRound.sources``): a replayed record's ε is then
  bounded by its own dataset's ledger, which the cap binds;
- ``olora`` (Wang et al., EMNLP Findings 2023): keeps each phase's final LoRA A and
  penalises overlap Σ‖A_prev A_currᵀ‖² of the current A with them (data-free).

EWC and O-LoRA penalties are applied outside DP clipping (``client.train``'s
``param_penalty``): they depend only on the parameters, the anchor and the DP Fisher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedadapt.client.memory import SiteMemory
from fedadapt.client.site import Site
from fedadapt.continual.ewc import ewc_penalty, trainable_params
from fedadapt.continual.lwf import distillation_loss
from fedadapt.continual.olora import lora_a_params, orthogonality_penalty
from fedadapt.continual.replay import ReservoirBuffer

_PHASE = "cl-phase"  # ConfigRecord: the last phase this site trained in
_ANCHOR = "cl-anchor"  # ArrayRecord: the global model at the start of the current phase
_FISHER = "cl-fisher"  # ArrayRecord: DP diagonal Fisher of the previous phase (ewc)
_PREV_A = "cl-prev-a-"  # ArrayRecord per finished phase: its final LoRA A (olora)
_REPLAY = "cl-replay"  # ArrayRecord {"x", "y"}: the site's replay buffer


def dp_diagonal_fisher(model: nn.Module, dataset: Dataset, *, clip_norm: float,
                       noise_multiplier: float, generator: torch.Generator,
                       per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher under the Gaussian mechanism.

    Each example's gradient g of log p(y|x) is clipped to L2 norm C; the sum of g² has
    L2 sensitivity ‖g²‖₂ ≤ ‖g‖₂² ≤ C² to adding or removing an example, so Gaussian
    noise of std σ·C² makes the release (σ, q = 1, one step) DP. The noisy sum is
    divided by N (taken as public) and clamped at 0.

    Per coordinate the noise σC²/N swamps a signal of about C²/(N·D) once D (the number
    of trainable coordinates, ~1e5) is much larger than N/σ. With ``per_tensor`` the
    release is instead one sum per tensor t, s_t = Σ_{i∈t} g_i² (still ‖s‖₂ ≤ Σ_t s_t =
    ‖g‖² ≤ C², the same sensitivity), and each coordinate of t gets s_t/(N·|t|): a
    block-constant Fisher with T ≈ 20 noisy numbers instead of D, which is what DP can
    afford to measure.
    """
    params = trainable_params(model)
    names = list(params)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    n = 0
    for k in range(len(dataset)):  # type: ignore[arg-type]
        x, y = dataset[k]
        logp = torch.log_softmax(model(x.unsqueeze(0)), dim=-1)[0, int(y)]
        grads = torch.autograd.grad(logp, [params[m] for m in names], allow_unused=True)
        grads = [torch.zeros_like(params[m]) if g is None else g for m, g in zip(names, grads)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        scale = min(1.0, clip_norm / float(norm)) if float(norm) > 0 else 1.0
        for m, g in zip(names, grads):
            total[m] += (g.detach() * scale) ** 2
        n += 1
    model.train(was_training)
    if n == 0:
        raise ValueError("EWC Fisher needs at least one record; the site's data is empty")
    std = noise_multiplier * clip_norm ** 2
    if per_tensor:
        sums = torch.stack([t.sum() for t in total.values()])
        noisy = sums + torch.normal(0.0, std, size=sums.shape, generator=generator)
        return {m: torch.full_like(t, float(v) / (n * t.numel())).clamp_min(0)
                for (m, t), v in zip(total.items(), noisy)}
    return {m: ((t + torch.normal(0.0, std, size=t.shape, generator=generator)) / n).clamp_min(0)
            for m, t in total.items()}


def normalised(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Fisher scaled so that its largest coordinate is 1 (post-processing: free under
    DP). ``ewc-lambda`` then does not depend on the clip norm, the noise or the model
    size, and the explicit penalty step θ ← θ − lr·λ·F̂·(θ − θ*) is stable for every
    coordinate when lr·λ < 2. An all-zero Fisher stays zero."""
    top = max((float(t.max()) for t in fisher.values() if t.numel()), default=0.0)
    if top <= 0:
        return {m: torch.zeros_like(t) for m, t in fisher.items()}
    return {m: t / top for m, t in fisher.items()}


@dataclass
class ContinualRound:
    """How a round's training is shaped by the site's continual method."""

    train_set: Dataset
    param_penalty: Callable[[], torch.Tensor] | None = None
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: The datasets whose records ``train_set`` holds; the round is charged to each one's
    #: ledger. Empty means ``train_set`` alone.
    sources: tuple[Dataset, ...] = ()

    @property
    def ledgers(self) -> tuple[Dataset, ...]:
        """The datasets whose ledgers this round is charged to."""
        return self.sources or (self.train_set,)


def begin_phase(memory: SiteMemory, model: nn.Module, *, phase: int) -> bool:
    """At a site's first round of ``phase`` > 0: keep the received global model as the
    anchor, and its LoRA A as an earlier phase's subspace. Returns True if it did."""
    if phase == 0 or memory.number(_ANCHOR + "-phase") == phase:
        return False
    memory.put_arrays(_ANCHOR, {n: p.detach().clone()
                                for n, p in trainable_params(model).items()})
    memory.put_arrays(f"{_PREV_A}{phase - 1}", {n: p.detach().clone()
                                                for n, p in model.named_parameters()
                                                if "lora_A" in n})
    memory.put_number(_ANCHOR + "-phase", phase)  # last: a crash before it redoes the above
    return True


def plan(method: str, site: Site, memory: SiteMemory, model: nn.Module, train_set: Dataset, *,
         phase: int, fisher: Callable[[], dict[str, torch.Tensor]] | None,
         teacher: Callable[[dict[str, torch.Tensor]], nn.Module],
         shared_fisher: dict[str, torch.Tensor] | None = None) -> ContinualRound:
    """The round's training set and loss/penalty hooks for ``method``.

    Args:
        method: naive, ewc, lwf, replay or olora.
        site: The site.
        memory: The site's continual state (``context.state``, kept in its folder).
        model: The model loaded with the received global adapter.
        train_set: The site's current-phase training records.
        phase: The current phase.
        fisher: Computes the DP Fisher of the previous phase (ewc), charging the
            site's ledger; called once per phase.
        teacher: Builds a frozen model holding the given trainable tensors (lwf).
        shared_fisher: The server's aggregate of earlier phases' DP Fishers (ewc in
            site-incremental); used instead of a locally computed one.
    """
    run = site.run
    new_phase = begin_phase(memory, model, phase=phase)
    anchor = memory.arrays(_ANCHOR)
    trained_before = memory.number(_PHASE) is not None  # the site trained in this run
    if method == "naive" or anchor is None:
        return ContinualRound(train_set)
    if method == "ewc":
        if shared_fisher is not None:
            shared = normalised(shared_fisher)
            return ContinualRound(train_set, param_penalty=lambda: ewc_penalty(
                model, shared, anchor, run.ewc_lambda))
        if new_phase and trained_before:
            assert fisher is not None
            memory.put_arrays(_FISHER, fisher())
        f = memory.arrays(_FISHER)
        if f is None:
            return ContinualRound(train_set)
        f = normalised(f)
        return ContinualRound(train_set, param_penalty=lambda: ewc_penalty(
            model, f, anchor, run.ewc_lambda))
    if method == "olora":
        prev = [a for k in range(phase) if (a := memory.arrays(f"{_PREV_A}{k}"))]
        return ContinualRound(train_set, param_penalty=lambda: run.olora_lambda *
                              orthogonality_penalty(lora_a_params(model), prev))
    if method == "lwf":
        old = teacher(anchor)

        def distill(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                old_logits = old(x).float()
            return run.lwf_alpha * distillation_loss(logits, old_logits)

        return ContinualRound(train_set, extra_loss=distill)
    if method == "replay":
        if new_phase and trained_before:
            buf = ReservoirBuffer(run.replay_size, seed=run.seed + 1000 * site.index + phase)
            kept = memory.arrays(_REPLAY)
            if kept is not None:
                buf.extend(kept["x"], kept["y"])
            prev_train, _ = site.datasets(phase - 1)
            buf.extend(*prev_train.tensors)  # type: ignore[attr-defined]
            x, y = buf.tensors()
            memory.put_arrays(_REPLAY, {"x": x, "y": y})
        kept = memory.arrays(_REPLAY)
        if kept is None:
            return ContinualRound(train_set)
        cur_x, cur_y = train_set.tensors  # type: ignore[attr-defined]
        # The reservoir may hold records of any earlier phase: charge all their ledgers.
        earlier = tuple(site.datasets(k)[0] for k in range(phase))
        return ContinualRound(TensorDataset(torch.cat([cur_x, kept["x"]]),
                                            torch.cat([cur_y, kept["y"]])),
                              sources=(train_set, *earlier))
    raise ValueError(f"unknown continual method {method!r}")


def rehearsal(site: Site, join_train: TensorDataset) -> ContinualRound:
    """Site-incremental ``replay``: after its own phase, a site trains on a bounded,
    seeded reservoir of ``replay-size`` of its records (charged to their dataset's ledger).

    The reservoir is drawn by index with a seed (never by content), so it is the same at
    every round and after a restart of the site.
    """
    buf = ReservoirBuffer(site.run.replay_size, seed=site.run.seed + 1000 * site.index)
    buf.extend(*join_train.tensors)
    x, y = buf.tensors()
    return ContinualRound(TensorDataset(x, y), sources=(join_train,))


def end_round(memory: SiteMemory, *, phase: int) -> None:
    """Remember the phase the site trained in."""
    memory.put_number(_PHASE, phase)
