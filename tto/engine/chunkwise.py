"""What every memory engine shares: a Python loop over chunks that calls one step, ``_chunk``, per
chunk, the option to run that step compiled, float32 parameters, and statistics of the inner loop
for monitoring (:meth:`ChunkwiseMemory.inner_stats`).

Float32 (:class:`Float32Parameters`): a memory's parameters (the fast model's initial weights, its
LayerNorm, the inner optimizer's; TTT-E2E's prime MLPs) stay float32 when the model is cast to a
lower precision (``model.to(torch.bfloat16)``, ``.half()``; loading with
``from_pretrained(dtype=torch.bfloat16)`` keeps them float32 too), and the engines run their inner
arithmetic in float32 with autocast off. bf16 fast weights drift: a
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


def _tokens(x, shape: tuple, index):
    """A forward argument (or a dict of them) with its token tensors, those whose leading dims are
    `shape` (B, T), indexed by ``t[index]``; other values as they are."""
    if isinstance(x, dict):
        return {n: _tokens(t, shape, index) for n, t in x.items()}
    is_tokens = isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(shape)
    return x[index] if is_tokens else x


class Float32Parameters(nn.Module):
    """A module holding inner-loop (fast-weight) parameters: module casts (``.to``, ``.half``,
    ``.bfloat16``, ...) move its parameters and buffers to their new device but never below float32
    (float64 stays float64), and ``TTOPreTrainedModel`` loads them float32 under any ``dtype``."""

    def _apply(self, fn, recurse=True):
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                return t.to(device=out.device, dtype=torch.promote_types(t.dtype, torch.float32))
            return out

        return super()._apply(keep_float32, recurse)


class ChunkwiseMemory(Float32Parameters):
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
          the weights before / after that chunk's update (the update should lower it); absent
          when no chunk is complete. With padding each row is replayed alone, on its real tokens:
          the engine's chunks of that row;
        - ``weight_norm`` / ``momentum_norm``: Frobenius norm of all fast weights (momentum; for
          LaCT the last chunk update) after the sequence, mean over batch and heads;
        - ``<gate>_gate``: mean of each gate over the real tokens (``lr_gate``, ``momentum_gate``,
          ``forget_gate``, ...).

        Costs about one forward of the layer; meant for log steps only.
        """
        call = inspect.signature(self.forward).bind(*args, **kwargs).arguments
        call.pop("state", None)
        mask = call.pop("mask", None)
        with torch.no_grad():
            if mask is None or bool(mask.all()):
                replays = [self._replay(call)]
            else:  # each row alone, its real tokens only: the engine's chunks of that row
                replays = [self._replay(_tokens(call, call["q"].shape[:2], (slice(r, r + 1), mask[r].bool())))
                           for r in range(mask.shape[0])]
            before, after, count = (sum(r[i] for r in replays) for i in range(3))
            stats = {"loss_before": before / count, "loss_after": after / count} if count > 0 else {}  # else no chunk was committed
            stats["weight_norm"] = torch.cat([r[3] for r in replays]).mean()
            if replays[0][4] is not None:
                stats["momentum_norm"] = torch.cat([r[4] for r in replays]).mean()
            for name, gate in self.gate_values(call).items():
                stats[f"{name}_gate"] = inner(gate).mean() if mask is None else inner(gate)[mask.bool()].mean()
        return {n: float(v) for n, v in stats.items()}

    def _replay(self, call: dict) -> tuple:
        """Run `call` (no padding) chunk by chunk through the engine with a state: (sum of the inner
        losses of the committed chunks' tokens before their update, the same after it, their number,
        per (batch * head) norm of the final fast weights, of the final momentum or None)."""
        q = call["q"]
        length, heads = q.shape[1], q.shape[2]
        state, totals = {}, torch.zeros(3, dtype=torch.float64, device=q.device)
        for lo in range(0, length - self.chunk_size + 1, self.chunk_size):  # the committed chunks
            part = _tokens(call, q.shape[:2], (slice(None), slice(lo, lo + self.chunk_size)))
            loss_before = self.inner_loss(self.fast_weights(state, part)[0], part).sum()
            self.forward(**part, state=state)
            loss_after = self.inner_loss(self.fast_weights(state, part)[0], part).sum()
            totals += torch.stack([loss_before.double(), loss_after.double(),
                                   torch.tensor(q.shape[0] * heads * self.chunk_size, device=q.device).double()])
        params, momentum = self.fast_weights(state, call)
        norm = lambda d: torch.stack([inner(w).flatten(1).pow(2).sum(1) for w in d.values()]).sum(0).sqrt()  # noqa: E731
        return (*totals, norm(params), None if momentum is None else norm(momentum))
