"""TTT-E2E: "End-to-End Test-Time Training for Long Context" (arXiv 2512.23675), following the
official JAX code (test-time-training/e2e, ``ttt/model/transformer.py``, ``attention.py``).

A sliding-window transformer with QK-norm, pre- and post-sublayer RMSNorm and RoPE (theta 5e5).
The last ``num_ttt_blocks`` blocks (a quarter: 3 of 12, 6 of 24, 8 of 32) carry a "prime" SwiGLU
MLP between the attention and the static MLP, each with its own residual:
``h += post(SWA(pre(h))); h += post(MLP'(pre(h))); h += post(MLP(pre(h)))``. The prime MLPs are
the only weights the inner loop changes: one SGD step of the model's next-token cross-entropy per
mini-batch of ``mini_batch_size`` tokens, the gradient clipped to a global norm, apply-then-update
(:mod:`tto.engine.e2e`). Training is meta-learning: the LM loss of each mini-batch is taken under
the weights adapted on the ones before it and differentiated through the inner steps; the inner lr
warms up from ``inner_lr_init`` over the first ``inner_lr_warmup_ratio`` of the outer steps
(:class:`tto.training.callbacks.InnerLRWarmup`). The intermediate size is reduced from the
transformer's to pay for the prime MLPs (125m 2048 -> 1664, 350m 2816 -> 2304, 760m 4096 -> 3328,
1b 5376 -> 4352, 3b 6912 -> 5632).

Differences from the official code: the last mini-batch of a sequence takes no inner step (its last
target is unknown); the paper's decode kernel is not reproduced (a call re-reads the unfinished
mini-batch, see :mod:`tto.engine.e2e`).
"""

from __future__ import annotations

from typing import ClassVar

from ..config import TTOConfig, config_error
from ..layers.attention import Attention
from ..registry import FromAttention, qkvo, register

#: the official configs/model/*.yaml with the e2e experiments' overrides (suffix_len, intermediate
#: size, mini-batch 1024, window 8192, rope 5e5) and the Llama-3 vocabulary
TTT_E2E_PRESETS = {
    name: dict(vocab_size=128256, hidden_size=d, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
               num_ttt_blocks=suffix)
    for name, d, i, n, heads, suffix in [("125m", 768, 1664, 12, 12, 3), ("350m", 1024, 2304, 24, 16, 6),
                                        ("760m", 1536, 3328, 24, 16, 6), ("1b", 2048, 4352, 24, 32, 6),
                                        ("3b", 2560, 5632, 32, 32, 8)]
}
#: the full-attention baselines' intermediate sizes (official configs/model/*.yaml), which the
#: presets' reduced ones pay for the prime MLPs against
TRANSFORMER_INTERMEDIATE = {"125m": 2048, "350m": 2816, "760m": 4096, "1b": 5376, "3b": 6912}
TTT_E2E_PRESETS |= {
    "tiny": dict(mini_batch_size=4, sliding_window=6),
}


class TTTE2EConfig(TTOConfig):
    """TTT-E2E fields; names follow the official config (``suffix_len`` is ``num_ttt_blocks``,
    ``ilr`` is ``inner_lr``)."""

    positive_fields: ClassVar[tuple[str, ...]] = TTOConfig.positive_fields + ("mini_batch_size",)

    # the last blocks with a prime MLP (None: a quarter of the blocks, at least 1, but no more than the
    # trailing run of ttt_e2e layers: 0 when the last layer is a plain attention layer); 0: the SWA transformer
    num_ttt_blocks: int | None = None
    mini_batch_size: int = 1024  # b: tokens per inner SGD step; the sliding window k must be >= b
    inner_lr: float = 1.0  # ilr: SGD step size of the prime MLPs (0: the SWA transformer with static prime MLPs)
    inner_lr_init: float = 0.1  # ilr at the first training step, raised linearly to inner_lr over the warm-up
    inner_lr_warmup_ratio: float = 0.1  # warm-up length as a fraction of training_args.max_steps (0: none)
    inner_grad_clip: float | None = 1.0  # the inner gradient is clipped to this global norm per row (None: not clipped)
    remat_mini_batches: bool = True  # training keeps each mini-batch's inputs only and recomputes it in the backward
    # the paper's backbone: every sublayer post-normed, QK-norm, RoPE base 5e5, window 8192
    post_norm: bool = True
    qk_norm: bool = True
    rope_theta: float = 500000.0
    sliding_window: int | None = 8192

    @property
    def prime_layers(self) -> tuple[int, ...]:
        n = self.num_ttt_blocks
        if n is None:
            trailing = next((i for i, kind in enumerate(reversed(self.layer_mixers)) if kind != self.tto_type),
                            self.num_hidden_layers)
            n = min(max(1, self.num_hidden_layers // 4), trailing)
        return tuple(range(self.num_hidden_layers - n, self.num_hidden_layers))

    def validate(self) -> None:
        super().validate()
        n = self.num_ttt_blocks
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.num_hidden_layers):
            raise config_error("num_ttt_blocks", n, f"must be an integer in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.prime_layers and self.sliding_window is not None and self.sliding_window < self.mini_batch_size:
            raise ValueError(f"config fields sliding_window={self.sliding_window} < mini_batch_size={self.mini_batch_size}: "
                             "the window k must hold a whole mini-batch b (k >= b)")
        wrong = [i for i in self.prime_layers if self.layer_mixers[i] != self.tto_type]
        if wrong:
            raise config_error("layer_mixers", self.layer_mixers,
                               f"the prime layers {list(self.prime_layers)} (num_ttt_blocks) must be {self.tto_type!r}; "
                               f"layers {wrong} are not")
        if self.inner_lr < 0 or self.inner_lr_init < 0:
            raise config_error("inner_lr" if self.inner_lr < 0 else "inner_lr_init",
                               min(self.inner_lr, self.inner_lr_init), "must be >= 0")
        if not 0 <= self.inner_lr_warmup_ratio <= 1:
            raise config_error("inner_lr_warmup_ratio", self.inner_lr_warmup_ratio, "must be in [0, 1]")
        if self.inner_grad_clip is not None and self.inner_grad_clip <= 0:
            raise config_error("inner_grad_clip", self.inner_grad_clip, "must be > 0 or None")


@register("ttt_e2e", config=TTTE2EConfig, presets=TTT_E2E_PRESETS, paper="arXiv:2512.23675",
          from_attention=FromAttention(qkvo))
class SWAMixer(Attention):
    """TTT-E2E's sliding-window attention with QK-norm: x (B, T, hidden) -> (B, T, hidden). A prime
    layer keeps b more slots than the window (the unfinished mini-batch that the next call re-reads)."""

    def __init__(self, config: TTTE2EConfig, layer_idx: int):
        window = config.sliding_window
        extra = config.mini_batch_size if layer_idx in config.prime_layers and window is not None else 0
        super().__init__(config, qk_norm=config.qk_norm, max_cached=None if window is None else window - 1 + extra)
