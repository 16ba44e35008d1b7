"""FedProx's proximal step in client.train.train pulls the trainable tensors to the anchor."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedadapt.client.train import train


def _run(mu):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    start = [p.detach().clone() for p in model.parameters()]
    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    train(model, data, epochs=1, lr=0.1, batch_size=8, device=torch.device("cpu"), seed=0,
          proximal_mu=mu)
    return max(float((p - s).abs().max()) for p, s in zip(model.parameters(), start))


def test_proximal_step_limits_drift():
    free = _run(0.0)
    assert free > 1e-3
    assert _run(10.0) < 1e-6  # lr·μ = 1: each step lands back on the global weights
    assert 0 < _run(2.0) < free
