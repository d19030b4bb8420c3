"""Titans: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni; arXiv:2501.00663).

**Neural long-term memory (Sec. 3).** Per head, a deep MLP ``M`` (``mem_depth`` layers, hidden width
``mem_expansion_factor`` x head_dim) is trained online on the associative loss
``l(M; x_t) = ||M(k_t) - v_t||^2`` (``mem_loss_scale`` = 2: the unhalved square) with momentum and
a forget gate (Eqs. 13-14)::

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)      (past and momentary surprise)
    M_t = (1 - alpha_t) M_{t-1} + S_t                       (retention)
    y_t = M_t(q_t)                                          (retrieval: a forward pass, no update)

theta (``lr_gate``: ``mem_max_lr * sigmoid``), eta (``momentum_gate``: sigmoid) and alpha
(``forget_gate``: sigmoid) are data-dependent, per token and per head: linear maps of the
mixer input. Tokens are processed in chunks of ``chunk_size`` with every gradient taken at the
chunk-start weights (Sec. 3.2, "parallelizing"), by the shared engine (:class:`tto.engine.Memory`
with :class:`tto.engine.MomentumGD`) in its dual form: no per-token weights are ever built.

**Read order.** The engine is update-then-read inside a chunk: token t reads ``M_t``, the weights
that already contain its own write (and every earlier write of its chunk, all at chunk-start
gradients). That is Eq. 15's ``y_t = M*_t(q_t)`` and titans-pytorch's order at chunk 1.

**Memory layer (Sec. 4.4;** :class:`tto.layers.memory_layer.MemoryLayer`, shared with Miras). q,
k, v are linear maps of the input followed by a short causal depthwise conv and SiLU; q and k are
then l2-normalised (``rms_qk_norm``: a learned RMSNorm instead, as the original TTO code allows).
The read-out (B, T, heads x head_dim) is normalised (RMSNorm), optionally gated by
``silu(gate_proj(x))`` (``use_gate``) and projected back to the hidden size (``use_output_proj``).

**Persistent memory (Sec. 3.3).** ``num_persistent_mem_tokens`` learned vectors P are the
paper's ``x~ = [P] || x``. They are placed as a prefix of the *attention's* keys and values
(:class:`tto.layers.attention.Attention` with ``num_persistent``), not as extra sequence
positions: outputs need no stripping, the sliding window and the cache never drop them, and a
decoding step costs nothing extra.

**Variants (Sec. 4)**, one small class each, chosen by ``variant``:

* ``lmm``: the memory layer alone is the mixer.
* ``mag``: memory as a gate. A sliding-window attention over [P || x] and the memory layer over x
  run in parallel and are combined as ``RMSNorm(mem) * silu(RMSNorm(attn))`` (the paper's
  "normalise both branches with learnable vector-valued weights, then a non-linearity").
* ``mal``: memory as a layer. ``o = SWA([P] || M(x))``: the memory layer's output is the input of a
  sliding-window attention.
* ``mac``: memory as context. The sequence is cut into segments of ``segment_size`` tokens. Each
  token's query first reads the memory as it was before its chunk, ``h_t = M*_{t-1}(q_t)`` (the
  engine's chunk-start read); attention then runs within the segment over ``[P] || h || S``, laid
  out as pairs ``(h_1, x_1), (h_2, x_2), ...`` so that a token sees the persistent tokens, the
  read-outs and the tokens of its segment up to itself; finally ``o_t = y_t * M*_t(q_t)``, the
  attention output gated by the memory after the update (update-then-read).

Caches: LMM keeps the memory state (fast weights, momentum, pending tokens of an incomplete
chunk) and the conv tails; MAG and MAL add the attention's keys/values of the last
``sliding_window - 1`` tokens, MAC those of the current segment (2 x (segment_size - 1) slots),
so every cache is bounded.

Differences from the paper: choices it leaves open, decoding necessities, and (MAC) parallelism:

* persistent tokens live in the attention only. LMM has no attention, so it has none: a fixed,
  data-independent prefix written into the memory would only move its initial weights, which
  are already learned parameters. In MAG/MAL the memory branch reads x, not [P] || x.
* the short conv after each of q, k, v is depthwise (as in Mamba2 and fla); the paper says
  depthwise-separable, whose extra pointwise (1 x 1) map would follow a linear projection that
  already mixes channels.
* persistent keys carry no RoPE (they have no position).
* the memory's q/k/v have no RoPE (the original TTO code rotated them until its MAG/MAL commit; the
  paper does not).
* MAC writes the memory with the block input x and gates with ``M*_t(q_t)``, where the paper
  writes the attention output y and gates with ``M*_t(y_t)`` (Eqs. 23-25). Writing y would make
  each segment wait for the previous segment's attention, a sequential loop over segments;
  titans-pytorch's MAC makes the same choice (its memory stores the layer input). ``h`` is read
  from the weights before each memory *chunk* (the paper: before each segment); with
  ``segment_size = chunk_size`` (the default, as titans-pytorch's default memory chunk = segment)
  the two coincide, a longer segment reads fresher, still causal, weights.
* the weights a chunk passes on take its gradients times the engine's step bound
  (:mod:`tto.engine.memory`), exactly 1, the paper's update, wherever that update does not expand
  the memory (with momentum eta and no forgetting it allows ``theta L <= 2 (1 - eta)^2 / (1 + eta)``
  for one token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Context
from ..config import config_error
from ..engine import MLPMemory, Memory, MomentumGD, SquaredError
from ..layers.attention import Attention
from ..layers.gates import Gate
from ..layers.memory_layer import MemoryLayer, MemoryLayerConfig
from ..registry import FromAttention, qkvo, register

#: the original TTO recipes' model fields (configs/titans_lmm_300m.yml, configs/titans_mag_335m.yml)
_RECIPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2736, num_hidden_layers=16,
               hidden_act="silu", chunk_size=8, num_memory_heads=16, num_persistent_mem_tokens=4,
               use_output_proj=True)
TITANS_PRESETS = {
    "300m": dict(_RECIPE, variant="lmm", use_gate=False, scan_checkpoint_group_size=16),
    "335m": dict(_RECIPE, variant="mal", num_attention_heads=16, num_key_value_heads=4, use_gate=True,
                 scan_checkpoint_group_size=8, sliding_window=256, rms_qk_norm=True),
    # small chunks and windows, so 13 tokens cross every boundary (tests, smoke runs)
    "tiny": dict(chunk_size=2, sliding_window=5, num_persistent_mem_tokens=2,
                 num_key_value_heads=1),
    # the other branch of every option: RMSNorm q/k, no gate, no output projection, linear memory
    "tiny-rms-linear": dict(chunk_size=2, sliding_window=5,
                            num_persistent_mem_tokens=1, rms_qk_norm=True, use_gate=False,
                            use_output_proj=False, mem_depth=1, variant="mal"),
    # MAC with attention segments longer than (and not a multiple of) the memory chunks
    "tiny-mac-segments": dict(chunk_size=2, segment_size=5, num_persistent_mem_tokens=2,
                              num_key_value_heads=1, variant="mac"),
}


class TitansConfig(MemoryLayerConfig):
    """Titans fields; the names of the original TTO Titans configs, and its defaults (the memory
    layer's fields shared with Miras and ATLAS are defined in :class:`MemoryLayerConfig`)."""

    choices: ClassVar[dict[str, tuple]] = {**MemoryLayerConfig.choices, "variant": ("lmm", "mac", "mag", "mal")}
    variant_field: ClassVar[str] = "variant"

    # --- backbone defaults of the original code ---
    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 24
    num_attention_heads: int = 32  # heads of the attention branch (MAC/MAG/MAL)
    num_key_value_heads: int | None = None  # KV heads of the attention branch (None: num_attention_heads)
    sliding_window: int | None = 2048  # MAG/MAL attention window (None: full causal attention)
    tie_word_embeddings: bool = False  # the original recipes keep a separate LM head
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # --- Titans ---
    variant: str = "lmm"  # "lmm": memory alone; "mac": memory as context; "mag": memory as a gate; "mal": memory as a layer
    chunk_size: int = 8  # b: tokens per memory chunk; gradients are taken at the chunk-start weights
    # memory is x + LayerNorm(MLP(x)) instead of MLP(x); titans-pytorch's ResidualNorm, except that its
    # LayerNorm gain is a fast weight (trained by the inner loop) and here an outer parameter
    mem_residual_norm: bool = False
    mem_loss_scale: float = 2.0  # inner loss scale/2 * ||M(k) - v||^2: 2 is the paper's unhalved square
    mem_max_lr: float = 0.1  # theta_t = mem_max_lr * sigmoid(.): bound of the inner step (titans-pytorch train_mac: 0.1; 1.0 diverges)
    momentum_gate_bias_init: float = 0.0  # initial bias of the eta gate (pre-sigmoid)
    num_persistent_mem_tokens: int = 4  # N_p learned persistent tokens, a prefix of the attention's keys/values
    segment_size: int | None = None  # MAC: tokens per attention segment (None: chunk_size)

    def validate(self) -> None:
        super().validate()
        if self.num_persistent_mem_tokens < 0:
            raise config_error("num_persistent_mem_tokens", self.num_persistent_mem_tokens, "must be >= 0")
        if self.segment_size is not None and self.segment_size <= 0:
            raise config_error("segment_size", self.segment_size, "must be a positive integer or None")


def memory_engine(config: TitansConfig, chunk_size: int, state_prefix: str = "memory") -> tuple[Memory, dict]:
    """The neural long-term memory's engine and gates: a deep MLP memory trained with momentum and
    forgetting in chunks of `chunk_size`, theta = ``mem_max_lr * sigmoid``, eta and alpha sigmoids
    of the input (Eqs. 13-14)."""
    fast = MLPMemory(config.num_memory_heads, config.hidden_size // config.num_memory_heads, depth=config.mem_depth,
                     expansion=config.mem_expansion_factor, activation=config.mem_activation, bias=False,
                     residual_norm=config.mem_residual_norm, norm_eps=config.rms_norm_eps,
                     init_std=config.initializer_range)
    memory = Memory(fast, SquaredError(config.mem_loss_scale), MomentumGD(), chunk_size,
                    checkpoint_group=config.scan_checkpoint_group_size, state_prefix=state_prefix)
    width, heads, std = config.hidden_size, config.num_memory_heads, config.initializer_range
    return memory, {
        "lr": Gate(width, heads, config.mem_max_lr, config.lr_gate_bias_init, std),  # theta_t
        "momentum": Gate(width, heads, 1.0, config.momentum_gate_bias_init, std),  # eta_t
        "forget": Gate(width, heads, 1.0, config.forget_gate_bias_init, std),  # alpha_t
    }


def neural_memory(config: TitansConfig) -> MemoryLayer:
    """The memory layer (Sec. 4.4) over the neural long-term memory with chunk ``chunk_size``."""
    return MemoryLayer(config, *memory_engine(config, config.chunk_size))


def persistent_attention(config: TitansConfig) -> Attention:
    """The attention branch: sliding window, persistent tokens as a key/value prefix, RMSNorm q/k
    when ``rms_qk_norm``."""
    return Attention(config, window=config.sliding_window, qk_norm=config.rms_qk_norm,
                     num_persistent=config.num_persistent_mem_tokens)


class LMM(nn.Module):
    """Titans LMM: the memory layer alone."""

    def __init__(self, config: TitansConfig, memory: Callable[[TitansConfig], nn.Module] = neural_memory):
        super().__init__()
        self.memory = memory(config)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        return self.memory(x, ctx, state)


class MAC(nn.Module):
    """Titans MAC: ``o_t = Attn_segment([P] || h || S)_t * M*_t(q_t)`` with ``h_t = M*_{t-1}(q_t)``."""

    def __init__(self, config: TitansConfig, memory: Callable[[TitansConfig], nn.Module] = neural_memory):
        super().__init__()
        segment = config.segment_size or config.chunk_size
        self.memory = memory(config)
        # two slots (h_t, x_t) per position: a segment's past is 2 x (segment - 1) cached slots
        self.attention = Attention(config, qk_norm=config.rms_qk_norm, num_persistent=config.num_persistent_mem_tokens,
                                   segment=segment, max_cached=2 * (segment - 1))

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        read, before = self.memory.reads(x, ctx, state, read_start=True)
        h = self.memory.output(before, x)  # h_t = M*_{t-1}(q_t), in the residual stream's width
        pairs = torch.stack([h, x], dim=2).flatten(1, 2)  # h_1, x_1, h_2, x_2, ...
        twice = lambda t: None if t is None else t.repeat_interleave(2, dim=1)  # noqa: E731
        # the x_t slots are the queries; the h_t slots are keys and values only
        y = self.attention(pairs, Context(mask=twice(ctx.mask), positions=twice(ctx.positions)), state,
                           queries=slice(1, None, 2))
        return y * self.memory.output(read, x)


class MAG(nn.Module):
    """Titans MAG: ``o = RMSNorm(M(x)) * silu(RMSNorm(SWA([P] || x)))``."""

    def __init__(self, config: TitansConfig, memory: Callable[[TitansConfig], nn.Module] = neural_memory):
        super().__init__()
        self.memory = memory(config)
        self.attention = persistent_attention(config)
        self.memory_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        y = self.attention(x, ctx, state)
        return self.memory_norm(self.memory(x, ctx, state)) * F.silu(self.attention_norm(y))


class MAL(nn.Module):
    """Titans MAL: ``o = SWA([P] || M(x))``."""

    def __init__(self, config: TitansConfig, memory: Callable[[TitansConfig], nn.Module] = neural_memory):
        super().__init__()
        self.memory = memory(config)
        self.attention = persistent_attention(config)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        return self.attention(self.memory(x, ctx, state), ctx, state)


#: variant -> block wiring; each takes the builder of its memory layer (TNT passes its hierarchical one)
VARIANTS: dict[str, type[nn.Module]] = {"lmm": LMM, "mac": MAC, "mag": MAG, "mal": MAL}


#: retrofit (tto.retrofit): one memory head per attention head (num_memory_heads); the memory layer's
#: q, k, v, o from the attention's (k, v repeated from grouped KV heads; the memory has no RoPE, so
#: the positions are lost), and in MAC/MAG/MAL the attention branch's q, k, v, o too. Convs, gates,
#: output gate and norm, persistent tokens and the memory MLP start from init. HOPE's wirings take
#: the same map (its HOPE-Attention has no memory: its attention is the source's own).
TITANS_FROM_ATTENTION = FromAttention(
    lambda mixer: qkvo(getattr(mixer.wiring, "memory", None)) + qkvo(getattr(mixer.wiring, "attention", None)),
    heads=lambda heads, head_dim: {"num_memory_heads": heads})


@register("titans", config=TitansConfig, presets=TITANS_PRESETS, paper_sizes={"300m": 300e6, "335m": 335e6},
          paper="arXiv:2501.00663 (Behrouz et al., 2025)",
          from_attention=TITANS_FROM_ATTENTION)
class TitansMixer(nn.Module):
    """Titans mixer: x (B, T, hidden) -> (B, T, hidden), wired as `config.variant`."""

    def __init__(self, config: TitansConfig, layer_idx: int):
        super().__init__()
        self.wiring = VARIANTS[config.variant](config)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        return self.wiring(x, ctx, state)
