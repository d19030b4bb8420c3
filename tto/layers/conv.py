"""Short causal depthwise convolution with a decoding state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """Causal depthwise conv1d over time: y_t = b + sum_{j<k} w_j x_{t-k+1+j}.

    x: (B, T, C). The state holds the last k-1 inputs of each row, so decoding token by token
    equals convolving the whole sequence. Pad positions (mask False) enter as zeros, which is what
    an unpadded sequence sees before its first token.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, init_std: float | None = None):
        """``init_std``: weights ~ N(0, init_std^2) and zero bias, as fla initialises its short convs
        (its models' ``_init_weights`` covers ``nn.Conv1d``); None: torch's Conv1d default."""
        super().__init__()
        self.kernel_size = kernel_size
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None

    def _tto_init(self, init) -> None:
        if self.init_std is not None:
            init.normal_(self.weight, std=self.init_std)
            if self.bias is not None:
                init.zeros_(self.bias)
            return
        init.kaiming_uniform_(self.weight, a=5**0.5)  # torch's Conv1d default
        if self.bias is not None:
            init.uniform_(self.bias, -(1.0 / self.kernel_size) ** 0.5, (1.0 / self.kernel_size) ** 0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: dict | None, key: str) -> torch.Tensor:
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        b, t, c = x.shape
        tail = state.get(key) if state is not None else None
        if tail is None:
            tail = x.new_zeros(b, self.kernel_size - 1, c)
        full = torch.cat([tail.to(x.dtype), x], dim=1)
        if state is not None:
            state[key] = full[:, full.shape[1] - (self.kernel_size - 1) :].detach()
        if t == 1:  # decoding: the k inputs' weighted sum (F.conv1d's dispatch costs ~20x as much here)
            y = (full * self.weight[:, 0].T).sum(1, keepdim=True)
            return y if self.bias is None else y + self.bias
        y = F.conv1d(full.transpose(1, 2), self.weight, self.bias, groups=c)
        return y.transpose(1, 2)
