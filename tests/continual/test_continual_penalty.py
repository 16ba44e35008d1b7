"""The data-independent penalty step and its hook in client.train (plain and DP)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedadapt.client.train import train
from fedadapt.continual.ewc import ewc_penalty, trainable_params
from fedadapt.continual.penalty import penalty_step
from fedadapt.privacy.dp import DPRequest


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m


def test_penalty_step_is_closed_form_ewc_step():
    m = _tiny()
    anchor = {n: p.detach().clone() + 0.5 for n, p in trainable_params(m).items()}
    fisher = {n: torch.rand_like(p) for n, p in anchor.items()}
    before = {n: p.detach().clone() for n, p in trainable_params(m).items()}
    params = list(trainable_params(m).values())
    penalty_step(params, lambda: ewc_penalty(m, fisher, anchor, lam=3.0), lr=0.1)
    for n, p in trainable_params(m).items():
        # θ ← θ − lr·λ·F·(θ − θ*)
        expect = before[n] - 0.1 * 3.0 * fisher[n] * (before[n] - anchor[n])
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-7)
        assert p.grad is None  # .grad untouched (Opacus owns it under DP)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))


def _drift(dp: DPRequest | None, lam: float) -> float:
    m = _tiny()
    anchor = {n: p.detach().clone() for n, p in trainable_params(m).items()}
    fisher = {n: torch.ones_like(p) for n, p in anchor.items()}
    pen = (lambda: ewc_penalty(m, fisher, anchor, lam)) if lam > 0 else None
    train(m, _data(), epochs=3, lr=0.2, batch_size=8, device=torch.device("cpu"), seed=0,
          dp=dp, param_penalty=pen)
    return sum(float(((p.detach() - anchor[n]) ** 2).sum()) for n, p in trainable_params(m).items())


def test_train_hook_anchors_parameters_with_and_without_dp():
    dp = DPRequest(noise_multiplier=0.5, max_grad_norm=1.0)
    for req in (None, dp):
        free, held = _drift(req, 0.0), _drift(req, 4.0)
        assert held < 0.5 * free, (req, free, held)
