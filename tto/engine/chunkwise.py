"""What every memory engine shares: a Python loop over chunks that calls one step, ``_chunk``, per
chunk, the option to run that step compiled, float32 parameters, and statistics of the inner loop
for monitoring (:meth:`ChunkwiseMemory.inner_stats`).

Float32: a memory's parameters (the fast model's initial weights, its LayerNorm, the inner
optimizer's) stay float32 when the model is cast to a lower precision (``model.to(torch.bfloat16)``,
``.half()``; loading with ``from_pretrained(dtype=torch.bfloat16)`` goes through the same cast), and
the engines run their inner arithmetic in float32 with autocast off. bf16 fast weights drift: a
bf16 state lost the float32 run's result within 10,000 updates (``tests/test_finetune.py``)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .fast_models import inner


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

    # ------------------------------------------------------------------ monitoring
    # An engine defines three methods for its statistics; the normal forward pays nothing for them.
    def fast_weights(self, state: dict, call: dict) -> tuple[dict, dict | None]:
        """The committed fast weights (and momentum, or None) that `state` holds, or the initial ones
        when it holds none; tensors (batch * heads, ...). `call`: the forward's arguments by name."""
        raise NotImplementedError

    def inner_loss(self, params: dict, call: dict) -> torch.Tensor:
        """Per-token inner loss (batch * heads, T) of the keys and values of `call` at `params`."""
        raise NotImplementedError

    def gate_values(self, call: dict) -> dict[str, torch.Tensor]:
        """The gates of `call` by the engine's names (``lr``: theta, ``momentum``: eta, ``forget``:
        alpha, ...), each (B, T, heads, ...)."""
        raise NotImplementedError

    def inner_stats(self, args: tuple, kwargs: dict) -> dict[str, float]:
        """Statistics of the inner loop on one forward call's inputs (as a forward pre-hook sees them),
        replayed chunk by chunk without gradients:

        - ``loss_before`` / ``loss_after``: mean inner loss of each committed chunk's real tokens at
          the weights before / after that chunk's update (the update should lower it);
        - ``weight_norm`` / ``momentum_norm``: Frobenius norm of all fast weights (momentum; for
          LaCT the last chunk update) after the sequence, mean over batch and heads;
        - ``<gate>_gate``: mean of each gate over the real tokens (``lr_gate``, ``momentum_gate``,
          ``forget_gate``, ...).

        Costs about one forward of the layer; meant for log steps only.
        """
        call = inspect.signature(self.forward).bind(*args, **kwargs).arguments
        call.pop("state", None)
        q, mask = call["q"], call.get("mask")
        batch, length, heads = q.shape[:3]
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device) if mask is None else mask.bool()

        def window(x, lo, hi):
            if isinstance(x, dict):
                return {n: window(t, lo, hi) for n, t in x.items()}
            is_tokens = isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[:2] == (batch, length)
            return x[:, lo:hi] if is_tokens else x

        def mean_loss(params, part, real):  # mean over real tokens; inner_loss is (B * H, t)
            loss = self.inner_loss(params, part).reshape(batch, heads, -1).transpose(1, 2)
            return (loss * real[..., None]).sum(), real.sum() * heads

        state, totals = {}, torch.zeros(3, dtype=torch.float64, device=q.device)
        with torch.no_grad():
            for lo in range(0, length - self.chunk_size + 1, self.chunk_size):  # the committed chunks
                part = window(call, lo, lo + self.chunk_size)
                before = self.fast_weights(state, part)[0]
                self.forward(**part, state=state)
                real = valid[:, lo:lo + self.chunk_size]
                loss_before, count = mean_loss(before, part, real)
                loss_after, _ = mean_loss(self.fast_weights(state, part)[0], part, real)
                totals += torch.stack([loss_before, loss_after, count]).double()
            params, momentum = self.fast_weights(state, call)
            norm = lambda d: torch.stack([inner(w).flatten(1).pow(2).sum(1) for w in d.values()]).sum(0).sqrt().mean()  # noqa: E731
            stats = {"loss_before": totals[0] / totals[2], "loss_after": totals[1] / totals[2],
                     "weight_norm": norm(params)}
            if momentum is not None:
                stats["momentum_norm"] = norm(momentum)
            for name, gate in self.gate_values(call).items():
                stats[f"{name}_gate"] = inner(gate)[valid].mean()
        return {n: float(v) for n, v in stats.items()}
