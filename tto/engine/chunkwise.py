"""What every memory engine shares: a Python loop over chunks that calls one step, ``_chunk``, per
chunk, the option to run that step compiled, and float32 parameters.

Float32: a memory's parameters (the fast model's initial weights, its LayerNorm, the inner
optimizer's) stay float32 when the model is cast to a lower precision (``model.to(torch.bfloat16)``,
``.half()``; loading with ``from_pretrained(dtype=torch.bfloat16)`` goes through the same cast), and
the engines run their inner arithmetic in float32 with autocast off. bf16 fast weights drift: a
bf16 state lost the float32 run's result within 10,000 updates (``tests/test_finetune.py``)."""

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

    def _apply(self, fn, recurse=True):
        """Module casts (``.to``, ``.half``, ``.bfloat16``, ...) move parameters and buffers to their new
        device but never below float32 (float64 stays float64)."""

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                return t.to(device=out.device, dtype=torch.promote_types(t.dtype, torch.float32))
            return out

        return super()._apply(keep_float32, recurse)

    @property
    def step(self):
        """The per-chunk step: ``_chunk``, compiled after :meth:`compile_step`."""
        return self._compiled_chunk or self._chunk
