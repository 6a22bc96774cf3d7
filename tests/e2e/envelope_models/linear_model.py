"""A 4-in, 3-out linear layer: the model the envelope tests compare answers against."""

from __future__ import annotations

import torch
from torch import nn


class Linear43(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
