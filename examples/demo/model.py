"""The demo model: a small MLP classifying 4 measurements into 3 classes (plain torch)."""

from __future__ import annotations

import torch
from torch import nn


class DemoNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
