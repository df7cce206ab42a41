"""Small float64 models and data shared by the laplace-torch tests: 24 points in loaders of 8."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DT = torch.float64
N_DATA = 24


def classifier() -> tuple[nn.Module, DataLoader]:
    """A non-square conv weight (3, 2, 2, 1), then a linear head: 3 classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, (2, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).to(DT)
    X, y = torch.randn(N_DATA, 2, 3, 3, dtype=DT), torch.randint(0, 3, (N_DATA,))
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


def regressor() -> tuple[nn.Module, DataLoader]:
    """Two outputs ``sin(x[:2])`` plus noise."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    X = torch.randn(N_DATA, 3, dtype=DT)
    y = torch.sin(X[:, :2]) + 0.1 * torch.randn(N_DATA, 2, dtype=DT)
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


def frozen_classifier() -> tuple[nn.Module, DataLoader]:
    """Subset of weights: the conv layer is frozen (requires_grad=False)."""
    model, loader = classifier()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model, loader
