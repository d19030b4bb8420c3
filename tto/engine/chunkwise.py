"""What every memory engine shares: a Python loop over chunks that calls one step, ``_chunk``, per
chunk, and the option to run that step compiled."""

from __future__ import annotations

import torch
from torch import nn


#: graphs ``torch.compile`` may keep for one step function: every engine configuration (fast model,
#: optimizer, objective), grad mode and shape family adds one, and all instances of an engine share
#: the function; past dynamo's default limit (8) the remaining calls would run eager
RECOMPILE_LIMIT = 64


class ChunkwiseMemory(nn.Module):
    """Base class of the memory engines; a subclass defines ``_chunk`` and calls :attr:`step`."""

    def __init__(self):
        super().__init__()
        self._compiled_chunk = None

    def compile_step(self) -> None:
        """Run every chunk's step through ``torch.compile``: its elementwise work fuses into a few
        kernels. Each new input shape, dtype or grad mode compiles once."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._compiled_chunk = torch.compile(self._chunk)

    @property
    def step(self):
        """The per-chunk step: ``_chunk``, compiled after :meth:`compile_step`."""
        return self._compiled_chunk or self._chunk
