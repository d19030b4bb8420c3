"""Where a memory's tokens go: the chunked layout of a (pending + new) sequence and the decoding
state, shared by every engine (:class:`tto.engine.chunkwise.ChunkwiseMemory`).

Ragged lengths, padding and decoding share one mechanism. Each row's real tokens are laid out so
that its complete chunks end at the same chunk index; leading whole chunks of pads are identity
steps, and the row's last, incomplete chunk is only read, then kept in the state as *pending*
tokens that the next call completes (an engine whose every token takes an exact step, the delta
rule, commits the incomplete chunk instead and keeps nothing pending). So a sequence gives the
same outputs whether it arrives in one call or token by token, left-padded or not.

Decoding: a call whose tokens complete no chunk commits nothing, so its one chunk runs at its
real length (:meth:`Layout.read_only`, no pad slots) and only the new tokens are read; the
pending tokens' reads were returned by the calls that brought them. Without a mask, after pending
tokens that are all real, the layout is the identity: the new tokens are appended to the pending
ones (:func:`append_pending`, in place: pending tokens live in buffers with room for a whole chunk,
:func:`tto.cache.appended`), the committed weights stay in the state untouched, and what the
engine derived from the pending tokens alone stays in the state beside them (``cache.``), until a
call that commits or lays its tokens out otherwise (:func:`store_state`) drops it.

State keys, each with one meaning (``<prefix>`` the engine's ``state_prefix``)::

    <prefix>.W.<name>        committed fast weight <name>                    (B, heads, ...)
    <prefix>.S.<name>        the inner optimizer's momentum of weight <name>  (B, heads, ...)
    <prefix>.pending.<name>  tokens of the incomplete last chunk              (B, pending, heads, ...)
    <prefix>.n_pending       real tokens among them                           (B,)
    <prefix>.window.<name>   the last ``lookback`` tokens before the pending  (B, lookback, heads, ...)
                             ones (zeros where there is none), for an optimizer whose steps reach
                             back across a chunk boundary (ATLAS' Omega window; absent otherwise)
    <prefix>.cache.<name>    the engine's per-token values of the pending     (B, heads, pending, ...)
                             tokens, while they are all real (the chunk's
                             keys' gradients at the committed weights)
    <prefix>.carried.<name>  a value per row that the engine carries from     (B, heads)
                             commit to commit beside the weights (NaN: not
                             known, the engine recomputes it; the step
                             bound's spectral norms, :meth:`tto.engine.Memory.carried_norms`)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache import appended
from .fast_models import upcast


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, ...) -> (B * H, T, ...) in the inner dtype."""
    return upcast(x).transpose(1, 2).flatten(0, 1)


def tokens_first(y: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * H, T, ...) -> (B, T, H, ...): the inverse of :func:`heads_first` (in y's dtype)."""
    return y.unflatten(0, (batch, -1)).transpose(1, 2)


_KEEP_GRAPH = False


@contextmanager
def state_keeps_graph() -> Iterator[None]:
    """Inside, the states that engines store keep their autograd graph: a mixer that runs its
    engines piece by piece, each piece's inputs computed from the weights the previous one
    committed (HOPE's self-modifying Titans), differentiates through the whole sequence."""
    global _KEEP_GRAPH
    previous, _KEEP_GRAPH = _KEEP_GRAPH, True
    try:
        yield
    finally:
        _KEEP_GRAPH = previous


def detached(t: torch.Tensor) -> torch.Tensor:
    """`t` cut from the autograd graph, as the state keeps it (`t` itself when it has no graph: no
    alias dispatched for each stored tensor of each decoded token, or inside :func:`state_keeps_graph`)."""
    return t.detach() if t.requires_grad and not _KEEP_GRAPH else t


@dataclass
class Layout:
    """Where each token of the (pending + new) sequence goes in the chunked layout (B, length)."""

    length: int  # padded length, a multiple of the chunk size
    total: int  # tokens in the (pending + new) sequence
    chunk_size: int
    n_commit: int  # leading chunks whose updates are committed; a following chunk, if any, is only read
    valid: torch.Tensor  # (B, length) True at real tokens
    src: torch.Tensor | None  # (B, length) token index feeding each slot (T = the zero row); None: identity
    dest: torch.Tensor | None  # (B, T) slot of each token (length = dropped); None: identity
    remainder: torch.Tensor  # (B,) real tokens in the read-only last chunk

    @classmethod
    def build(cls, valid: torch.Tensor | None, total: int, batch: int, chunk_size: int, device,
              commit_incomplete: bool = False) -> "Layout":
        """`valid` (B, total) or None (every token real). With `commit_incomplete` the last,
        incomplete chunk commits too (its pad slots must then be identity steps): nothing is pending."""
        if valid is None:  # every token real: keep order, pad the end
            n_full, rem = divmod(total, chunk_size)
            length = (n_full + (rem > 0)) * chunk_size
            slots = torch.arange(length, device=device)
            n_commit, rem = (length // chunk_size, 0) if commit_incomplete else (n_full, rem)
            return cls(length, total, chunk_size, n_commit, (slots < total).expand(batch, length), None, None,
                       torch.full((batch,), rem, device=device))
        count = valid.sum(1)
        full = count // chunk_size
        n_full = int(full.max())
        remainder = count - full * chunk_size
        length = (n_full + int(bool((remainder > 0).any()))) * chunk_size
        rank = valid.long().cumsum(1) - 1
        dest = torch.where(valid, (n_full - full)[:, None] * chunk_size + rank, length)
        src = torch.full((batch, length + 1), total, dtype=torch.long, device=device)
        src.scatter_(1, dest, torch.arange(total, device=device).expand(batch, total))
        slots = torch.arange(length, device=device)
        start = ((n_full - full) * chunk_size)[:, None]
        slot_valid = (slots >= start) & (slots < start + count[:, None])
        if commit_incomplete:
            n_full, remainder = length // chunk_size, torch.zeros_like(remainder)
        return cls(length, total, chunk_size, n_full, slot_valid, src[:, :length], dest, remainder)

    def read_only(self) -> "Layout":
        """This layout of a sequence that completes no chunk (its one chunk only read) cut to its
        longest row: the chunk runs at that length instead of a whole chunk of pads."""
        length = int(self.remainder.max())
        dest = None if self.dest is None else self.dest.clamp_max(length)  # dropped tokens stay dropped
        return Layout(length, self.total, length, 0, self.valid[:, :length],
                      None if self.src is None else self.src[:, :length], dest, self.remainder)

    @property
    def n_chunks(self) -> int:
        return self.length // self.chunk_size

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) tokens -> (B, length, ...) slots (zeros at pad slots)."""
        if self.src is None:
            return x if self.length == x.shape[1] else F.pad(x, (0, 0) * (x.dim() - 2) + (0, self.length - x.shape[1]))
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)
        idx = self.src.view(*self.src.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """(B, length, ...) slots -> (B, T, ...) tokens (zeros at pads)."""
        if self.dest is None:
            return y[:, : self.total]
        y = torch.cat([y, y.new_zeros(y.shape[0], 1, *y.shape[2:])], dim=1)
        idx = self.dest.view(*self.dest.shape, *([1] * (y.dim() - 2))).expand(-1, -1, *y.shape[2:])
        return y.gather(1, idx)

    def chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, ...) tokens -> (B * H, n_chunks, chunk_size, ...) slots, heads first."""
        return heads_first(self.gather(x)).unflatten(1, (self.n_chunks, self.chunk_size))

    def tokens(self, y: torch.Tensor) -> torch.Tensor:
        """(B * H, n_chunks, chunk_size, ...) slots -> (B, T, H, ...) tokens: the inverse of :meth:`chunks`."""
        return self.scatter(tokens_first(y.flatten(1, 2), self.valid.shape[0]))

    def lookback(self, x: torch.Tensor, earlier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `count` slots before each chunk: `x` (B, T, H, ...) tokens and `earlier` (B, count, H, ...)
        the row's tokens before them (a previous call's), which sit right before the row's first real
        slot. Returns ((B * H, n_chunks, count, ...), zeros at pad slots; the `count` tokens before the
        first uncommitted chunk (B, count, H, ...): the next call's `earlier`)."""
        count = earlier.shape[1]
        slots = torch.cat([torch.zeros_like(earlier), self.gather(x)], dim=1)  # slot p at p + count
        first = torch.where(self.valid.any(1), self.valid.int().argmax(1), self.n_commit * self.chunk_size)
        at = (first[:, None] + torch.arange(count, device=x.device)).view(-1, count, *([1] * (x.dim() - 2)))
        slots = slots.scatter(1, at.expand_as(earlier), earlier)
        starts = torch.arange(self.n_chunks, device=x.device)[:, None] * self.chunk_size
        before = slots[:, starts + torch.arange(count, device=x.device)]  # (B, n_chunks, count, H, ...)
        after = self.n_commit * self.chunk_size
        return heads_first(before.flatten(1, 2)).unflatten(1, (self.n_chunks, count)), slots[:, after: after + count]

    def chunk_valid(self, heads: int) -> torch.Tensor:
        """(B * H, n_chunks, chunk_size): True at the slots of real tokens."""
        return self.valid.unflatten(1, (self.n_chunks, self.chunk_size)).repeat_interleave(heads, dim=0)


def load_state(state: dict | None, prefix: str, names, with_momentum: bool):
    """What a previous call left in `state` under `prefix`: (params, momentum or None, carried values,
    pending tokens, pending counts (B,)), params as (batch * heads, ...), carried as (batch * heads,);
    None when the sequence is new."""
    if state is None or prefix + "n_pending" not in state:
        return None
    unpack = lambda key: state[key].flatten(0, 1)  # noqa: E731
    params = {n: unpack(prefix + "W." + n) for n in names}
    momentum = {n: unpack(prefix + "S." + n) for n in names} if with_momentum else None
    carried = {k[len(prefix + "carried."):]: unpack(k) for k in state if k.startswith(prefix + "carried.")}
    pending = {k[len(prefix + "pending."):]: v for k, v in state.items() if k.startswith(prefix + "pending.")}
    return params, momentum, carried, pending, state[prefix + "n_pending"]


def prepend_pending(tokens: dict, pending: dict, n_pending: torch.Tensor, mask: torch.Tensor | None):
    """The pending tokens of an incomplete chunk in front of the new ones: (tokens, validity of the
    joined sequence (B, pending + new), None when every slot is real)."""
    first = next(iter(tokens.values()))
    tokens = {n: torch.cat([pending[n], t], dim=1) for n, t in tokens.items()}
    old = torch.arange(pending["q"].shape[1], device=first.device)[None, :] < n_pending[:, None]
    if mask is None and bool(old.all()):
        return tokens, None
    new = mask if mask is not None else torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
    return tokens, torch.cat([old, new], dim=1)


def store_weights(state: dict, prefix: str, heads: int, params: dict, momentum: dict | None, carried: dict) -> None:
    """Replace all of `prefix`'s entries of `state` with the committed params (and momentum) and the
    carried values, split back to (batch, heads, ...); pending tokens and their cache are dropped."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    split = lambda t: detached(t).unflatten(0, (-1, heads))  # noqa: E731
    for n, p in params.items():
        state[prefix + "W." + n] = split(p)
        if momentum is not None:
            state[prefix + "S." + n] = split(momentum[n])
    for n, t in carried.items():
        state[prefix + "carried." + n] = split(t)


def store_state(state: dict, prefix: str, heads: int, params: dict, momentum: dict | None, carried: dict,
                tokens: dict, layout: Layout, capacity: int) -> None:
    """Replace `prefix`'s entries of `state` with the committed params (and momentum) and the carried
    values, split back to (batch, heads, ...), and the tokens of the incomplete last chunk as pending, in
    buffers of `capacity` slots (:func:`tto.cache.appended`; 0: no room kept, for an engine that keeps
    nothing pending)."""
    store_weights(state, prefix, heads, params, momentum, carried)
    start = layout.n_commit * layout.chunk_size
    tail = slice(start, start + int(layout.remainder.max()))
    for n, t in tokens.items():
        state[prefix + "pending." + n] = appended(None, detached(layout.gather(t)[:, tail]), 1, capacity)
    state[prefix + "n_pending"] = layout.remainder


def load_cache(state: dict | None, prefix: str) -> dict:
    """The engine's cached values of the pending tokens, (batch * heads, pending, ...) by name."""
    if state is None:
        return {}
    key = prefix + "cache."
    return {k[len(key):]: t.flatten(0, 1) for k, t in state.items() if k.startswith(key)}


def append_pending(state: dict, prefix: str, heads: int, new: dict, cache: dict, capacity: int) -> None:
    """Append `new` {name: (B, n, heads, ...)}, all real, to the pending tokens of `state` (all real
    too; :func:`tto.cache.appended`, buffers of `capacity` slots), and make `cache` {name: (B * heads,
    pending, ...)} their cached values; the weights stay as they are."""
    for n, t in new.items():
        state[prefix + "pending." + n] = appended(state.get(prefix + "pending." + n), detached(t), 1, capacity)
    first = state[prefix + "pending.q"]
    state[prefix + "n_pending"] = torch.full(first.shape[:1], first.shape[1], device=first.device)
    for n, t in cache.items():
        state[prefix + "cache." + n] = detached(t).unflatten(0, (-1, heads))
