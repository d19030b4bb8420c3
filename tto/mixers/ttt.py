"""TTT-Linear and TTT-MLP: "Learning to (Learn at Test Time): RNNs with Expressive Hidden States"
(Sun et al., arXiv:2407.04620), following the official PyTorch reference
(test-time-training/ttt-lm-pytorch, ``ttt.py``).

The hidden state is a per-head fast model ``f(x) = x + LN(g(x))``, with ``g`` linear (TTT-Linear)
or a 2-layer GELU MLP of width 4 * head_dim (TTT-MLP). Reading a token is one step of mini-batch
gradient descent on the self-supervised loss ``1/2 ||f(k_t) - v_t||^2``, then ``z_t = f(q_t)``:

* views: q, k, v are linear maps of the block input x (``share_qk``: one projection for q and k,
  followed by a separate short causal conv for each), RoPE on q and k with positions taken modulo
  the mini-batch size;
* inner learning rate: ``lr_t = ttt_base_lr * sigmoid(x_t . w_h + b_h) / head_dim`` per head;
* mini-batches of ``mini_batch_size`` tokens, gradients at the mini-batch start weights, token t
  of a mini-batch reading ``W_t = W_0 - eta_t * sum_{s<=t} lr_s * grad_s`` with the learned
  position scale ``eta_t = max(0, 1/t + learnable_token_idx_t)``
  (:class:`tto.engine.MiniBatchGD`), computed in the dual form by the shared engine;
* output: ``o_proj(gate(LayerNorm(z)))`` with the optional gate ``gelu_tanh(g_proj(x)) * .``.

The Mamba-style backbone of the paper (``share_qk``, ``use_gate``, ``pre_conv``) is a set of config
flags; ``pre_conv`` is the backbone's conv branch (:class:`tto.modeling.ConvBranch`).

Differences from the reference: decoding works from any position (the reference's cache raises
"fractional update not supported" mid-mini-batch), padded tokens are masked out of the inner
updates (the reference lets left padding enter the state), and the weights a mini-batch passes on
take its gradients times the engine's step bound (:mod:`tto.engine.memory`), which is exactly 1,
the reference's update, wherever that update does not expand the fast weights.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Context
from ..config import MemoryConfig, TTOConfig, config_error
from ..engine import MiniBatchGD, MLPMemory, Memory, SquaredError
from ..layers.conv import ShortConv
from ..layers.rope import interleaved_rope_tables, rope_cos_sin, rotate_interleaved
from ..registry import FromAttention, qkvo, register

#: TTT_STANDARD_CONFIGS of the reference
TTT_PRESETS = {
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=32),
    # small mini-batches so a few tokens cross several mini-batch boundaries (tests, smoke runs)
    "tiny": dict(mini_batch_size=4),
    # the paper's Mamba backbone (shared q/k + convs, output gate, pre-conv branch) on TTT-MLP
    "tiny-mamba-mlp": dict(mini_batch_size=4, ttt_layer_type="mlp", share_qk=True, use_gate=True, pre_conv=True),
}


class TTTConfig(MemoryConfig):
    """TTT fields, named as in the reference's ``TTTConfig`` (its defaults are the 1B model's)."""

    choices: ClassVar[dict[str, tuple]] = {**TTOConfig.choices, "ttt_layer_type": ("linear", "mlp")}
    variant_field: ClassVar[str] = "ttt_layer_type"
    positive_fields: ClassVar[tuple[str, ...]] = MemoryConfig.positive_fields + ("mini_batch_size", "pretraining_tp")
    chunk_field: ClassVar[str] = "mini_batch_size"

    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 24
    num_attention_heads: int = 32  # the reference's TTT heads (num_memory_heads defaults to it)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    ttt_layer_type: str = "linear"  # "linear": TTT-Linear; "mlp": TTT-MLP
    ttt_base_lr: float = 1.0  # scale of the inner learning rate (the paper uses 1.0 Linear, 0.1 MLP)
    mini_batch_size: int = 16  # tokens per inner gradient step (b)
    share_qk: bool = False  # one projection for q and k, then a separate short conv for each (Mamba backbone)
    use_gate: bool = False  # output gate gelu_tanh(g_proj(x)) * z (Mamba backbone)
    scan_checkpoint_group_size: int = 0  # mini-batches per activation-checkpoint group in training (0: none)
    ttt_norm_eps: float = 1e-6  # epsilon of the LayerNorm inside the fast model
    post_norm_eps: float = 1e-6  # epsilon of the LayerNorm on the TTT output
    pretraining_tp: int = 1  # accepted for compatibility with the reference; tto has no tensor-parallel slicing

    def validate(self) -> None:
        super().validate()
        if self.pretraining_tp != 1:
            raise config_error("pretraining_tp", self.pretraining_tp, "only 1 is supported (it changes no math)")
        if self.scan_checkpoint_group_size < 0:
            raise config_error("scan_checkpoint_group_size", self.scan_checkpoint_group_size, "must be >= 0")


#: retrofit (tto.retrofit): q, k, v, o from the attention's (k, v repeated from grouped KV heads to
#: every head; with share_qk, q_proj from q and k's conv from init). Its heads are the backbone's
#: (num_attention_heads), each hidden_size / heads wide. TTT rotates adjacent pairs, so each head's
#: q/k rows are reordered to keep every frequency on the same pair of values; the positions are
#: taken modulo mini_batch_size, not absolute as in the attention. The lr gate, fast weights and
#: post-norm start from init.
TTT_FROM_ATTENTION = FromAttention(qkvo, rope="interleaved")


@functools.lru_cache(maxsize=None)
def mini_batch_rope_tables(mini_batch_size: int, head_dim: int, theta: float, device: torch.device,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The interleaved RoPE tables (:func:`interleaved_rope_tables`, (1, mini_batch_size, ...)) of
    the positions in a mini-batch, 0 .. mini_batch_size - 1: TTT's positions are taken modulo the
    mini-batch size, so these are all it ever needs; built once per device and dtype."""
    positions = torch.arange(mini_batch_size, device=device)[None]
    return interleaved_rope_tables(*rope_cos_sin(positions, head_dim, theta), dtype)


# "125m" follows GPT-3's size names; the reference code builds 110.3M (TTT-Linear) and 114.4M (TTT-MLP) at it
@register("ttt", config=TTTConfig, presets=TTT_PRESETS, paper_sizes={"125m": 110.3e6, "350m": 350e6, "760m": 760e6,
                                                                   "1b": 1.3e9}, paper="arXiv:2407.04620 (Sun et al., 2024)",
          from_attention=TTT_FROM_ATTENTION)
class TTTMixer(nn.Module):
    """TTT layer: x (B, T, hidden) -> (B, T, hidden)."""

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.num_heads = config.num_memory_heads
        self.head_dim = config.hidden_size // config.num_memory_heads
        self.mini_batch_size = config.mini_batch_size
        self.base_lr = config.ttt_base_lr
        self.rope_theta = config.rope_theta
        width = config.hidden_size

        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = None if config.share_qk else nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        if config.share_qk:
            self.conv_q = ShortConv(width, config.conv_kernel)
            self.conv_k = ShortConv(width, config.conv_kernel)
        # inner learning-rate gate: one linear map of x to a scalar per head
        self.lr_gate_weight = nn.Parameter(torch.empty(self.num_heads, width))
        self.lr_gate_bias = nn.Parameter(torch.empty(self.num_heads))
        self.lr_gate_std = config.initializer_range
        self.g_proj = nn.Linear(width, width, bias=False) if config.use_gate else None
        self.post_norm = nn.LayerNorm(width, eps=config.post_norm_eps)

        depth = {"linear": 1, "mlp": 2}[config.ttt_layer_type]
        fast = MLPMemory(self.num_heads, self.head_dim, depth=depth, expansion=4, activation="gelu_tanh",
                         bias=True, residual_norm=True, norm_eps=config.ttt_norm_eps, init_std=config.initializer_range)
        self.memory = Memory(fast, SquaredError(1.0), MiniBatchGD(config.mini_batch_size), config.mini_batch_size,
                             checkpoint_group=config.scan_checkpoint_group_size)

    def _tto_init(self, init) -> None:
        init.normal_(self.lr_gate_weight, mean=0.0, std=self.lr_gate_std)
        init.zeros_(self.lr_gate_bias)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        b, t, width = x.shape
        heads = (b, t, self.num_heads, self.head_dim)
        if self.k_proj is None:
            shared = self.q_proj(x)
            q, k = self.conv_q(shared, ctx.mask, state, "conv_q"), self.conv_k(shared, ctx.mask, state, "conv_k")
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        q, k, v = q.view(heads), k.view(heads), self.v_proj(x).view(heads)
        key = (self.mini_batch_size, self.head_dim, self.rope_theta, q.device, q.dtype)
        tables = ctx.shared_value(("ttt_rope", *key), lambda: tuple(
            t[0, ctx.positions % self.mini_batch_size] for t in mini_batch_rope_tables(*key)))
        q, k = rotate_interleaved(torch.stack((q, k)), *tables).unbind(0)

        lr = self.base_lr * torch.sigmoid(x @ self.lr_gate_weight.T + self.lr_gate_bias) / self.head_dim
        z = self.memory(q, k, v, {"lr": lr}, ctx.mask, state).reshape(b, t, width)

        z = self.post_norm(z)
        if self.g_proj is not None:
            z = F.gelu(self.g_proj(x), approximate="tanh") * z
        return self.o_proj(z)
