"""Per-layer state that persists across `forward` calls and through `generate`.

Every layer owns one dict in :class:`TTOCache` and keeps in it whatever it needs to continue the
sequence: fast weights and momentum of a memory, the tokens of a not yet completed chunk, conv
tails, an attention KV window. Every tensor in a state has the batch as its first dimension, so
beam search and batch selection work on any mixer without knowing what it stores.

What grows token by token (pending tokens, KV caches) lives in buffers with room behind it
(:func:`appended`): a decoded token is written in place, so its cost does not grow with what is
already held. Branch a state with ``copy.deepcopy`` or the cache's batch operations (which copy),
never by sharing its tensors: two states sharing a buffer would write each other's slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache


def appended(held: torch.Tensor | None, new: torch.Tensor, dim: int, capacity: int) -> torch.Tensor:
    """`held` followed by `new` along `dim` (a sequence dimension after the batch): a view of a
    buffer. When `held` is a stretch of such a buffer with room behind it, `new` is written there in
    place; otherwise both are copied into a new buffer of ``max(capacity, total)`` slots, `held` at
    its front. A caller that keeps only the last slots of the result (a sliding window) narrows it:
    the narrowed view still has the buffer's room behind it. Under autograd pass `new` detached, or
    concatenate instead: the buffer is written again by later calls."""
    count = 0 if held is None else held.shape[dim]
    total = count + new.shape[dim]
    if held is not None and _room_behind(held, dim) >= new.shape[dim]:
        size = list(held.shape)
        size[dim] = total
        joined = held.as_strided(size, held.stride(), held.storage_offset())
    else:
        size = list(new.shape)
        size[dim] = max(capacity, total)
        joined = new.new_empty(size).narrow(dim, 0, total)
        if count:
            joined.narrow(dim, 0, count).copy_(held)
    joined.narrow(dim, count, new.shape[dim]).copy_(new)
    return joined


def _room_behind(t: torch.Tensor, dim: int) -> int:
    """Free slots after `t` along `dim` when `t` is a stretch of a whole contiguous buffer (its
    storage, as :func:`appended` allocates it) along that dimension; 0 otherwise, and for a tensor made
    under ``torch.inference_mode`` outside it (which may not be written in place there)."""
    if dim < 1 or t.stride(dim) == 0 or t.stride(dim - 1) % t.stride(dim):
        return 0
    if t.is_inference() and not torch.is_inference_mode_enabled():
        return 0
    slots = t.stride(dim - 1) // t.stride(dim)
    start, offset_within = divmod(t.storage_offset(), t.stride(dim))
    size = list(t.shape)
    size[dim] = slots
    step = 1
    for n, stride in zip(reversed(size), reversed(t.stride())):
        if stride != step and n > 1:
            return 0
        step *= n
    whole = t.untyped_storage().nbytes() == step * t.element_size()
    if offset_within or not whole or start + t.shape[dim] > slots:
        return 0
    return slots - start - t.shape[dim]


@dataclass
class Context:
    """What every mixer receives besides its input.

    mask: (B, T) bool, True at real tokens (None: no padding).
    positions: (B, T) long, index of each token among the real tokens of its row, counting the
    tokens already in the cache (RoPE positions).
    differentiable_state: the state a layer leaves keeps its autograd graph (a model-level inner
    loop carrying KV windows between its mini-batches); otherwise it is detached.
    shared: tensors that depend on this context alone (no parameters), by key, computed by the first
    layer that needs them and reused by the others (:meth:`shared_value`).
    """

    mask: torch.Tensor | None
    positions: torch.Tensor
    differentiable_state: bool = False
    shared: dict = field(default_factory=dict)

    def shared_value(self, key, make):
        """``make()`` for the first layer that asks for `key` in this context, the same value for
        the others (e.g. the RoPE tables of every layer with the same positions, width and base)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


class TTOCache(Cache):
    """One state dict per layer plus, per row, the number of real tokens already read."""

    is_compileable = False

    def __init__(self, num_layers: int):
        # The Cache base class manages KV layers we do not use; set only what its methods read.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.states: list[dict] = [{} for _ in range(num_layers)]
        self.seen_slots = 0  # tokens (pads included) fed so far: the HF notion of sequence length
        self.real_tokens: torch.Tensor | None = None  # (B,) real tokens per row

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return f"TTOCache(layers={len(self.states)}, seen={self.seen_slots})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_slots

    def reset(self) -> None:
        """Forget everything: the next forward starts a new sequence."""
        self.states = [{} for _ in self.states]
        self.seen_slots = 0
        self.real_tokens = None

    def _map(self, fn) -> None:
        for state in self.states:
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = fn(value)
        if self.real_tokens is not None:
            self.real_tokens = fn(self.real_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a fast-weight state cannot be rolled back to an earlier length")
