"""What every memory engine shares: a Python loop over chunks that calls one step, ``_chunk``, per
chunk, and the option to run that step compiled."""

from __future__ import annotations

import torch
from torch import nn


class ChunkwiseMemory(nn.Module):
    """Base class of the memory engines; a subclass defines ``_chunk`` and calls :attr:`step`."""

    def __init__(self):
        super().__init__()
        self._compiled_chunk = None

    def compile_step(self) -> None:
        """Run every chunk's step through ``torch.compile``: its elementwise work fuses into a few
        kernels. Each new input shape, dtype or grad mode compiles once."""
        self._compiled_chunk = torch.compile(self._chunk)

    @property
    def step(self):
        """The per-chunk step: ``_chunk``, compiled after :meth:`compile_step`."""
        return self._compiled_chunk or self._chunk
