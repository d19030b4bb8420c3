"""The one causal LM every registered type runs on.

``TTOModel``: embeddings -> blocks -> final RMSNorm. Each block is pre-norm with residuals:
an optional short-conv branch (``pre_conv``), the mixer of its layer type, in the type's
``prime_layers`` a prime SwiGLU MLP, and the MLP: a SwiGLU, or with ``mlp_type`` "cms" the Continuum
Memory System (:mod:`.layers.cms`), whose levels keep their fast weights in the layer's cache state
(``post_norm``: sublayer outputs normalised).
With prime layers, the blocks from the first one up run in TTT-E2E's inner loop (:mod:`.engine.e2e`).
``TTOForCausalLM`` adds the LM head, the loss and generation. The registry derives one pair of
these classes per type (``TTTForCausalLM``, ...) that differ only in their config class.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import registry
from .cache import Context, TTOCache
from .config import TTOConfig
from .engine import ChunkwiseMemory, Float32Parameters, e2e
from .layers.conv import ShortConv
from .layers.cms import ContinuumMemory
from .layers.mlp import SwiGLU

#: tokens per forward when `generate` reads a prompt (prefill): the prompt is fed in pieces of this
#: many tokens, each continuing the cache, so the activations of only one piece are alive at a time
#: and a memory model's peak memory does not grow with the prompt (the outputs are those of one
#: forward over the whole prompt). A multiple of every preset's mini-batch / chunk size.
PREFILL_CHUNK_TOKENS = 1024


class ConvBranch(nn.Module):
    """The Mamba-style pre-mixer branch (TTT's ``pre_conv``): ``h += Conv(RMSNorm(h))``."""

    def __init__(self, config: TTOConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv = ShortConv(config.hidden_size, config.conv_kernel)

    def forward(self, h: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        return self.conv(self.norm(h), ctx.mask, state, "pre_conv")


class Block(GradientCheckpointingLayer):
    """``h += mixer(RMSNorm(h))``, then, in a layer of ``config.prime_layers``, ``h += MLP'(RMSNorm(h))``
    (the prime MLP that TTT-E2E trains at test time), then ``h += MLP(RMSNorm(h))`` (SwiGLU or CMS); with
    ``post_norm`` each sublayer's output is RMS-normalised before its residual add."""

    def __init__(self, config: TTOConfig, layer_idx: int):
        super().__init__()
        norm = lambda: nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        post = lambda: norm() if config.post_norm else nn.Identity()  # noqa: E731
        self.layer_type = config.layer_mixers[layer_idx]
        self.pre_conv = ConvBranch(config) if config.pre_conv else None
        self.mixer_norm, self.mixer_post_norm = norm(), post()
        self.mixer = registry.get(self.layer_type).mixer_class(config.layer_config(layer_idx), layer_idx)
        self.prime = None
        if layer_idx in config.prime_layers:
            self.prime_norm, self.prime_post_norm = norm(), post()
            self.prime = e2e.PrimeMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.mlp_norm, self.mlp_post_norm = norm(), post()
        self.mlp = (ContinuumMemory(config) if config.mlp_type == "cms" else
                    SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias))

    def forward(self, h: torch.Tensor, ctx: Context, past_key_values: dict | None = None,
                prime_weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """h (B, T, hidden); ``prime_weights``: the prime MLP's per-row (gate, up, down) weights
        (B, out, in) as adapted so far (default: its own parameters)."""
        if self.pre_conv is not None:
            h = h + self.pre_conv(h, ctx, past_key_values)
        h = h + self.mixer_post_norm(self.mixer(self.mixer_norm(h), ctx, past_key_values))
        if self.prime is not None:
            h = h + self.prime_post_norm(self.prime(self.prime_norm(h), prime_weights))
        x = self.mlp_norm(h)
        return h + self.mlp_post_norm(self.mlp(x, ctx, past_key_values) if isinstance(self.mlp, ContinuumMemory)
                                      else self.mlp(x))


class TTOPreTrainedModel(PreTrainedModel):
    config_class = TTOConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _is_stateful = True
    _supports_sdpa = True

    def post_init(self) -> None:
        """Also: ``from_pretrained(dtype=torch.bfloat16 or float16)`` loads every memory's parameters
        and prime MLP as float32 (Transformers' per-instance keep-in-float32 list; casts keep them
        float32 too, see :class:`tto.engine.Float32Parameters`)."""
        super().post_init()
        self._keep_in_fp32_modules_strict.update(
            "^" + re.escape(name) + r"\." for name, m in self.named_modules() if isinstance(m, Float32Parameters))

    def _init_weights(self, module: nn.Module) -> None:
        """Transformers' initialisation (linear layers and embeddings ~ N(0, initializer_range^2)),
        RMSNorm weights at 1, then a module's own ``_tto_init(init)`` where it defines one: each such
        module draws from the fields it was built with (its std among them)."""
        super()._init_weights(module)
        if isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        custom = getattr(module, "_tto_init", None)
        if custom is not None:
            custom(init)


class TTOModel(TTOPreTrainedModel):
    def __init__(self, config: TTOConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        #: progress of the inner-lr warm-up of prime layers, in [0, 1]: the inner lr is
        #: inner_lr_init + (inner_lr - inner_lr_init) * this (1 outside training; set per step by
        #: tto.training.callbacks.InnerLRWarmup)
        self.inner_lr_warmup = 1.0
        self.post_init()
        if config.compile_inner_step:
            memories = [m for m in self.modules() if isinstance(m, ChunkwiseMemory)]
            if not memories:
                raise ValueError(f"compile_inner_step: no layer of this model has a memory (layer_mixers: "
                                 f"{sorted(set(config.layer_mixers))}); set it only for memory types")
            for memory in memories:
                memory.compile_step()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: TTOCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        lm_head: nn.Module | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``lm_head``: the LM head, which a model with prime layers (TTT-E2E) needs for its inner loss."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        if t == 0:
            raise ValueError(f"the input has no tokens (shape {tuple(h.shape[:2])}); give at least one token")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = TTOCache(len(self.layers))
        if past_key_values is not None and not isinstance(past_key_values, TTOCache):
            raise TypeError(f"past_key_values must be a TTOCache, got {type(past_key_values).__name__}")

        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -t:].to(torch.bool)  # generate passes the mask of cache + new tokens
            if bool(mask.all()):
                mask = None
        offset = past_key_values.real_tokens if past_key_values is not None else None
        if position_ids is None:
            if mask is None:
                position_ids = torch.arange(t, device=h.device).expand(b, t)
            else:
                position_ids = (mask.long().cumsum(1) - 1).clamp_min(0)
            if offset is not None:
                position_ids = position_ids + offset[:, None]
        ctx = Context(mask=mask, positions=position_ids)

        states = past_key_values.states if past_key_values is not None else [None] * len(self.layers)
        prime = self.config.prime_layers
        first = prime[0] if prime else len(self.layers)
        for i, layer in enumerate(self.layers[:first]):
            h = layer(h, ctx, past_key_values=states[i])
            self._check_finite(h, f"layer {i} ({self.config.layer_mixers[i]})")
        if prime:
            if lm_head is None or input_ids is None:
                raise ValueError(f"type {self.config.tto_type!r} trains its prime MLPs at test time on the next-token "
                                 "loss: it needs input_ids and the LM head (use its ForCausalLM class)")
            c = self.config
            loop = e2e.InnerLoop(c.mini_batch_size, c.inner_lr_init + (c.inner_lr - c.inner_lr_init) * self.inner_lr_warmup,
                                 c.inner_grad_clip, c.remat_mini_batches)
            h = e2e.run_suffix(self.layers[first:], h, ctx, input_ids, states[first:] if past_key_values is not None
                               else None, lambda x: lm_head(self.norm(x)), loop,
                               lambda x, i: self._check_finite(x, f"layer {first + i} ({c.layer_mixers[first + i]})"))
        h = self.norm(h)

        if past_key_values is not None:
            new = torch.full((b,), t, device=h.device) if mask is None else mask.sum(1)
            past_key_values.real_tokens = new if offset is None else offset + new
            past_key_values.seen_slots += t
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=past_key_values if use_cache else None)

    def _check_finite(self, h: torch.Tensor, where: str) -> None:
        if self.config.check_finite and not bool(torch.isfinite(h).all()):
            raise FloatingPointError(f"{where} produced NaN/Inf; the layers below it were finite "
                                     "(set check_finite=False to skip this check)")


class TTOForCausalLM(TTOPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TTOConfig):
        super().__init__(config)
        self.model = TTOModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own TTOCache

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """``GenerationMixin.generate`` reading the prompt in pieces of :data:`PREFILL_CHUNK_TOKENS`
        (unless ``prefill_chunk_size`` is set by the call or the generation config) into a cache made
        here when none is given, so a long prompt costs no more memory than one piece."""
        config = generation_config if generation_config is not None else self.generation_config
        if kwargs.get("prefill_chunk_size", config.prefill_chunk_size) is None:
            kwargs["prefill_chunk_size"] = PREFILL_CHUNK_TOKENS
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", config.use_cache) is not False:
            kwargs["past_key_values"] = TTOCache(self.config.num_hidden_layers)
        return super().generate(inputs, generation_config, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: TTOCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            lm_head=self.lm_head,
        )
        h = out.last_hidden_state
        logits = self.lm_head(h if logits_to_keep == 0 else h[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
