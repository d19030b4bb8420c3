"""HOPE: "Nested Learning: The Illusion of Deep Learning Architectures" (Behrouz, Razaviyayn, Zhong,
Mirrokni; arXiv:2512.24695).

**HOPE** is a sequence mixer followed by a Continuum Memory System (CMS) in place of the block MLP:
a chain of MLP levels, level l trained while reading at the end of every chunk of ``C^(l)`` tokens
with the gradients of its chunk, every level read at every token (:mod:`tto.layers.cms`, the
backbone's ``mlp_type: cms``, which any type can use). A ``hope`` model is such a backbone: its
blocks are ``h += mixer(RMSNorm(h)); h += CMS(RMSNorm(h))``, with the CMS levels of
``cms_periods`` (default three levels, ``[16, 256, 2048]``: the paper's figure shows 16 -> 1M ->
16M, its experiments' levels are not given; a level with a million-token period would hold a
million pending tokens per layer while decoding, so the defaults stay within a training sequence).

**Variants** (``variant``):

* ``self_modifying`` (the paper's HOPE, Sec. 8.1-8.3, Eqs. 83-93): a self-modifying Titans. Per
  memory head, the keys, values, inner step and retention are the reads of their own in-context
  memories, and only the queries are a static projection::

      k_t = M_k,t-1(x_t),  v_t = M_v,t-1(x_t),  eta_t = M_eta,t-1(x_t),  alpha_t = M_alpha,t-1(x_t)
      q_t = x_t W_q,       y_t = M_memory,t(q_t)

  Every memory, the main one included, learns from values it generates itself,
  ``v^_[],t = M_[],t-1(v_t)``, with the associative loss ``||M_[](k_t) - v^_[],t||^2`` and the
  step ``M_[],t = (1 - alpha_t) M_[],t-1 - eta_t grad``; within a chunk of ``chunk_size`` tokens
  every gradient, key, value and gate is taken at the chunk-start weights (the paper's chunk-wise
  training), so the five memories advance chunk by chunk together: chunk i's inputs are what the
  projection memories committed after chunk i-1. :class:`SelfModifyingTitans` runs the two
  engines (the main memory; the four projection memories as one engine of 4 x heads) piece by
  piece along the chunks, their states keeping the autograd graph inside the call, so the outer
  gradient flows through every memory's whole history (but the weights that generate values, below).
* ``titans``: the ablation without self-modification: Titans' neural long-term memory (the LMM layer
  of :mod:`tto.mixers.titans`: static k, v projections and gates, momentum, forgetting,
  chunk-start gradients, with all of Titans' memory fields) followed by the CMS.
* ``attention``: HOPE-Attention, the paper's variant with softmax attention (the backbone's
  attention: RoPE, GQA, optional sliding window and QK-norm) followed by the CMS.

Choices and deviations of ``self_modifying`` (the paper leaves the first three open):

* memory heads: the memories act per head on the head's slice of x (``num_memory_heads`` slices of
  ``hidden_size // num_memory_heads``), l2-normalised; q and k are l2-normalised per head, as in
  Titans. Unnormalised, the values (about x's norm, sqrt(head width)) dwarfed the unit keys and the
  reads' sensitivity to the keys and gates compounded with depth: hope_760m's layers at 128 tokens
  had a gradient norm of 7.6e3 (its ``titans`` variant: 32), 39 with the normalised inputs;
* each memory is the paper's residual MLP (Eq. 91), ``x + g(x)`` with g the engine's MLP of
  ``mem_depth`` layers and hidden width ``mem_expansion_factor`` x head width, no biases, its
  initial weights ~ N(0, 1 / fan_in). At ``initializer_range`` (0.02) every memory starts as nearly
  the identity: keys, values and their targets all near x, and g's updates, products of two near-zero
  layers, lose to the forget gate (bench's model: the memories' weights decayed to 1e-17 within 6K
  tokens, the layer reduced to static reads of x); at 1 / fan_in they hold an RMS of about 0.04
  over 8K tokens;
* eta and alpha are scalars per head: ``mem_max_lr * sigmoid(w . M_eta(x_t) + b)`` and
  ``sigmoid(w . M_alpha(x_t) + b)`` with a learned read-out (w, b) per head, Titans' gates read
  through the memories (at M = identity, Titans' static gates of the normalised x);
* one chunk size for all five memories (the paper allows the projection memories their own);
* the update is gradient descent with retention, without delta gradient descent's extra erase term
  ``-eta_t M k_t k_t^T`` (Eq. 90's ``alpha_t I - eta_t k_t k_t^T``), which is defined for a linear
  layer; the engine's step bound (:mod:`tto.engine.memory`) applies to every memory as to Titans';
* a generated value's norm is capped at ``value_norm_cap``: a memory that chases ``M_{W_c}(v)``,
  a target that moves with its own weights (a bootstrap), has a chunk map
  ``W -> W - eta J_k^T (M_W(k) - M_W(v))`` that is not symmetric and can expand at any step size,
  which the step bound (the curvature at a fixed target) does not see; with bounded targets its
  guarantee holds again (a random depth-1 configuration without the cap: weights past 1e11, then
  NaN, within 128 tokens). 99% of the values are under 1.35 at init: the cap is inactive there;
* no outer gradient flows through the weights that generate a memory's values, ``v^ = M_sg(v)`` (a
  semi-gradient, as temporal-difference learning treats its bootstrapped targets; v itself, M_v's
  read, keeps its gradient). Through them the outer gradient grew about 8x per doubling of the
  sequence (bench's model: gradient norm 83 at 128 tokens, 1.1e4 at 1,024; hope_760m went NaN at its
  second step); without, 11 and 3.4, falling with length as the ``titans`` variant's does;
* decoding and padding use the engines' own states: a call runs in pieces that end where some
  row's chunk ends, so each row's projections always read the weights its last chunk committed;
  ``scan_checkpoint_group_size`` > 0 recomputes groups of that many pieces in the backward.

**Retrofit** (:func:`tto.retrofit`): the ``titans`` variant's memory takes q, k, v, o from the
pretrained attention as Titans' does (:data:`tto.mixers.titans.TITANS_FROM_ATTENTION`; the
``self_modifying`` variant its q and o projections); in
HOPE-Attention the attention is the pretrained one, as it was. Each block's pretrained MLP starts
every CMS level, and the chain defaults to that MLP alone, never updated (the source's function
kept); ``cms_periods=[C]`` makes it learn in context from its first C tokens on (see
:mod:`tto.retrofit` for why more levels cannot keep the source's function).

Fields are Titans' (:class:`tto.mixers.titans.TitansConfig`) and the backbone's CMS fields, with
HOPE's defaults: ``mlp_type: cms``, full causal attention (no window) in HOPE-Attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import Context
from ..config import config_error
from ..engine import DecayGD, MLPMemory, Memory, SquaredError, naive_memory
from ..engine.chunkwise import in_noncausal_mode
from ..engine.fast_models import autocast_off, upcast
from ..engine.layout import detached, heads_first, state_keeps_graph, tokens_first
from ..reference import in_reference_mode
from ..layers.attention import Attention
from ..layers.gates import HeadGate
from ..registry import FromAttention, qkvo, register
from .titans import LMM, TITANS_FROM_ATTENTION, TitansConfig

#: the backbone of the paper's 760M / 30B-token comparison (Titans' 760M setting: 24 blocks of width
#: 1536, Llama-2's 32k vocabulary), with the SwiGLU levels narrowed so that the three CMS levels per
#: block fit the parameter budget; the paper gives no per-level widths (unconfirmed)
HOPE_PRESETS = {
    "760m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, num_memory_heads=16, chunk_size=16, cms_periods=[16, 256, 2048]),
    # small chunks and periods, so 13 tokens cross every boundary of the memory and two CMS levels
    "tiny": dict(chunk_size=2, cms_periods=[2, 5, None], num_persistent_mem_tokens=0),
    # chunks of 3 against the CMS's 2: the memories' pieces and the levels' chunks cross
    "tiny-self-modifying-chunks": dict(chunk_size=3, cms_periods=[2, None]),
    "tiny-attention": dict(variant="attention", cms_periods=[3, None, 4], sliding_window=5),
}


class HopeConfig(TitansConfig):
    """HOPE fields: Titans' memory fields (used by the ``titans`` variant) and the backbone's CMS
    fields (``cms_periods``, ``cms_max_lr``, ``cms_lr_bias_init``), with HOPE's defaults."""

    choices: ClassVar[dict[str, tuple]] = {**TitansConfig.choices,
                                           "variant": ("self_modifying", "titans", "attention")}

    # "self_modifying": the paper's HOPE (self-modifying Titans + CMS); "titans": Titans' memory + CMS;
    # "attention": HOPE-Attention
    variant: str = "self_modifying"
    sliding_window: int | None = None  # HOPE-Attention's attention window (None: full causal attention)
    # self_modifying: a memory's generated values v^ = M(v) are scaled down where their norm passes this
    # (the memories read unit-norm inputs; at init 99% of the v^ have a norm under 1.35: inactive)
    value_norm_cap: float = 2.0
    num_persistent_mem_tokens: int = 0  # unused: neither variant has Titans' attention branch
    mlp_type: str = "cms"  # the block MLP is the Continuum Memory System
    cms_periods: list[int | None] | None = None  # C^(l) per CMS level (None: [16, 256, 2048])

    def __post_init__(self, **kwargs):
        if self.mlp_type == "cms" and self.cms_periods is None:
            self.cms_periods = [16, 256, 2048]
        super().__post_init__(**kwargs)

    def validate(self) -> None:
        super().validate()
        if not self.value_norm_cap > 0:
            raise config_error("value_norm_cap", self.value_norm_cap, "must be > 0")


class HopeAttention(nn.Module):
    """HOPE-Attention's mixer: the backbone's softmax attention (the CMS is the block's MLP)."""

    def __init__(self, config: HopeConfig):
        super().__init__()
        self.attention = Attention(config, window=config.sliding_window, qk_norm=config.qk_norm)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        return self.attention(x, ctx, state)


#: the projection memories of the self-modifying Titans, in their engine's head order (memory-major)
PROJECTIONS = ("k", "v", "lr", "forget")


class SelfModifyingTitans(nn.Module):
    """HOPE's self-modifying Titans (module docstring): x (B, T, hidden) -> (B, T, hidden).

    ``memory``: the main memory M_memory (``num_memory_heads`` heads); ``projections``: M_k, M_v,
    M_eta, M_alpha as one engine of 4 x heads, head ``m * heads + h`` being memory ``PROJECTIONS[m]``
    of head h. State keys: the engines' ``memory.*`` and ``projections.*``.
    """

    def __init__(self, config: HopeConfig):
        super().__init__()
        self.num_heads = heads = config.num_memory_heads
        self.head_dim = dim = config.hidden_size // heads
        self.chunk_size = config.chunk_size
        self.value_norm_cap = config.value_norm_cap
        self.checkpoint_group = config.scan_checkpoint_group_size  # pieces per activation-checkpoint group

        def engine(n_heads: int, prefix: str) -> Memory:
            fast = MLPMemory(n_heads, dim, depth=config.mem_depth, expansion=config.mem_expansion_factor,
                             activation=config.mem_activation, bias=False, residual_norm=False, residual=True,
                             init_std=None)
            return Memory(fast, SquaredError(config.mem_loss_scale), DecayGD(), config.chunk_size, state_prefix=prefix)

        self.memory = engine(heads, "memory")
        self.projections = engine(len(PROJECTIONS) * heads, "projections")
        std = config.initializer_range
        self.lr_gate = HeadGate(dim, heads, config.mem_max_lr, config.lr_gate_bias_init, std)  # eta_t
        self.forget_gate = HeadGate(dim, heads, 1.0, config.forget_gate_bias_init, std)  # alpha_t
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)  # the static W_q
        self.out_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False) if config.use_gate else None
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False) if config.use_output_proj else None

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q = F.normalize(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)), dim=-1)
        heads_x = x.unflatten(-1, (self.num_heads, self.head_dim))
        if in_noncausal_mode():  # one chunk (an image): projections at the initial weights, one commit
            return self._output(self._piece(heads_x, q, None, None, None), x)
        real = ctx.mask if ctx.mask is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
        mine = (self.memory.prefix, self.projections.prefix)
        work = {k: v for k, v in (state or {}).items() if k.startswith(mine)}
        history = [] if in_reference_mode() else None
        if history is not None and state is not None:
            raise RuntimeError("the naive reference does not keep a decoding state")
        held = work.get("memory.n_pending", torch.zeros(batch, dtype=torch.long, device=x.device))
        ends = self._piece_ends(held, real)
        bounds = list(zip([0] + ends[:-1], ends))
        group = len(bounds)
        if self.checkpoint_group > 0 and torch.is_grad_enabled() and self.training and history is None:
            group = self.checkpoint_group

        def run(work: dict, pieces: list) -> tuple[list, dict]:
            """The pieces in order from the states `work` (a copy: a recomputation starts from the same)."""
            work, reads = dict(work), []
            with state_keeps_graph():
                for a, b in pieces:
                    mask = None if ctx.mask is None else ctx.mask[:, a:b]
                    reads.append(self._piece(heads_x[:, a:b], q[:, a:b], mask, work, history))
            return reads, work

        reads = []
        for lo in range(0, len(bounds), group):
            pieces = bounds[lo:lo + group]
            out, work = checkpoint(run, work, pieces, use_reentrant=False) if group < len(bounds) else run(work, pieces)
            reads += out
        read = torch.cat(reads, dim=1) if history is None else self._reference_reads(history)
        if state is not None:
            for key in [k for k in state if k.startswith(mine)]:
                del state[key]
            state.update(work if ctx.differentiable_state else {k: detached(v) for k, v in work.items()})
        return self._output(read, x)

    def _output(self, read: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reads (B, T, heads, head_dim) -> (B, T, hidden): RMSNorm, gate by x, projection."""
        out = self.out_norm(read.flatten(2).to(x.dtype))
        if self.gate_proj is not None:
            out = out * F.silu(self.gate_proj(x))
        return out if self.o_proj is None else self.o_proj(out)

    def _piece_ends(self, held: torch.Tensor, real: torch.Tensor) -> list[int]:
        """Where the call's pieces end: after every slot at which some row completes a chunk (`held`
        (B,): the real tokens each row holds pending, `real` (B, T): the call's real tokens), and at
        its end, so that no row's chunk boundary falls inside a piece."""
        seen = held[:, None] + real.long().cumsum(1)
        completes = (real & (seen % self.chunk_size == 0)).any(0)
        return sorted({*(completes.nonzero()[:, 0] + 1).tolist(), real.shape[1]})

    def _weights(self, engine: Memory, work: dict, history: list | None, like: torch.Tensor) -> dict:
        """The weights `engine` committed last, (batch * heads, ...): the fast path's state, or in
        reference mode the engine's naive reference over the call's history."""
        if history:
            committed = naive_memory(engine, *_joined(history, engine))[2]
            return {n: torch.cat([row[n] for row in committed]) for n in committed[0]}
        tokens = {"q": like, "k": like, "v": like}
        return engine.fast_weights(work, tokens)[0]

    @staticmethod
    def _read(engine: Memory, weights: dict, x: torch.Tensor) -> torch.Tensor:
        """The engine's fast model at `weights` on x (B, n, heads, d): (B, n, heads, d)."""
        return tokens_first(engine.fast.apply(heads_first(x), engine.fast.plain_linear(weights)), x.shape[0])

    def _piece(self, x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None, work: dict,
               history: list | None) -> torch.Tensor:
        """One piece (B, n, heads, d): projections at the committed weights, both engines' updates;
        the main memory's reads (update-then-read inside its chunk), or None in reference mode.
        Without a state `work` (a non-causal call) the projection memories' commit, which nothing
        would read, is skipped."""
        n_proj = len(PROJECTIONS)
        with autocast_off(x.device.type):
            x_in = F.normalize(upcast(x), dim=-1)  # each memory reads its head's slice of x, l2-normalised
            x_all = x_in.repeat(1, 1, n_proj, 1)
            proj_weights = self._weights(self.projections, work, history, x_all)
            k, v, lr_features, forget_features = self._read(self.projections, proj_weights, x_all).chunk(n_proj, dim=2)
            k = F.normalize(k, dim=-1)
            gates = {"lr": self.lr_gate(lr_features), "forget": self.forget_gate(forget_features)}
            # every memory's values are its own reads of v at its chunk-start weights, v^_t = M_{t-1}(v_t),
            # with no outer gradient through those weights (module docstring)
            fixed = lambda weights: {n: w.detach() for n, w in weights.items()}  # noqa: E731
            v_hat = _capped(self._read(self.memory, fixed(self._weights(self.memory, work, history, upcast(q))), v),
                            self.value_norm_cap)
            proj_v_hat = _capped(self._read(self.projections, fixed(proj_weights), v.repeat(1, 1, n_proj, 1)),
                                 self.value_norm_cap)
        proj_gates = {n: g.repeat(1, 1, n_proj) for n, g in gates.items()}
        if history is not None:
            history.append({self.memory: (q, k, v_hat, gates, mask),
                            self.projections: (x_all, k.repeat(1, 1, n_proj, 1), proj_v_hat, proj_gates, mask)})
            return None
        if work is not None:
            self.projections(x_all, k.repeat(1, 1, n_proj, 1), proj_v_hat, proj_gates, mask, work, read_start="only")
        return self.memory(q, k, v_hat, gates, mask, work)

    def _reference_reads(self, history: list) -> torch.Tensor:
        """Reference mode: the main memory's naive reference over the whole call."""
        return naive_memory(self.memory, *_joined(history, self.memory))[0]


def _capped(values: torch.Tensor, cap: float) -> torch.Tensor:
    """`values` (..., d) scaled down to norm `cap` where theirs is larger."""
    norm = values.norm(dim=-1, keepdim=True)
    return values * (cap / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp(max=1.0)


def _joined(history: list, engine: Memory) -> tuple:
    """`engine`'s inputs (q, k, v, gates, mask) over the pieces of `history`, joined along the tokens."""
    q, k, v, gates, mask = zip(*(piece[engine] for piece in history))
    joined = {g: torch.cat([piece[g] for piece in gates], dim=1) for g in gates[0]}
    return (torch.cat(q, dim=1), torch.cat(k, dim=1), torch.cat(v, dim=1), joined,
            None if mask[0] is None else torch.cat(mask, dim=1))


#: retrofit: Titans' map, and the self-modifying Titans' own static q and output projections
HOPE_FROM_ATTENTION = FromAttention(lambda mixer: TITANS_FROM_ATTENTION.projections(mixer) + qkvo(mixer.wiring),
                                    heads=TITANS_FROM_ATTENTION.heads)

VARIANTS: dict[str, type[nn.Module]] = {"self_modifying": SelfModifyingTitans, "titans": LMM,
                                         "attention": HopeAttention}


@register("hope", config=HopeConfig, presets=HOPE_PRESETS, paper_sizes={"760m": 760e6},
          paper="arXiv:2512.24695 (Behrouz, Razaviyayn, Zhong, Mirrokni, 2025)", from_attention=HOPE_FROM_ATTENTION)
class HopeMixer(nn.Module):
    """HOPE's mixer: x (B, T, hidden) -> (B, T, hidden), wired as `config.variant`."""

    def __init__(self, config: HopeConfig, layer_idx: int):
        super().__init__()
        self.wiring = VARIANTS[config.variant](config)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        return self.wiring(x, ctx, state)
