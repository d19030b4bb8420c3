"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), as in Llama."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACT2FN[act]

    def forward(self, x, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """x (B, T, hidden). ``weights``: per-row (gate, up, down) matrices (B, out, in) used instead of
        the module's own (no biases), e.g. fast weights adapted at test time."""
        if weights is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate, up, down = (w.transpose(-1, -2) for w in weights)
        return (self.act(x @ gate) * (x @ up)) @ down
