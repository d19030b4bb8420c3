"""What is benchmarked: every registered tto type/variant, the same-size HF Llama, and the optional
``titans-pytorch`` peers, each wrapped in a small adapter that knows how to train, prefill and
decode it.

Cases come in three groups. ``lm``: whole language models, compared with ``llama``. ``layer``: one
mixer alone on hidden states (batch, seq, hidden), compared with ``sdpa-attention``, a plain causal
SDPA attention layer (q/k/v and output projections, no RoPE). ``image``: whole image classifiers
(every image type of the registry), compared with the ``vit`` type (softmax attention).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import tto
from tto.cache import Context
from tto.engine import ChunkwiseMemory

#: The "small" configuration of PEERS-CPU.md, passed to every model.
SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             tie_word_embeddings=True)
#: Per (type, variant) settings matched to a peer: Titans MAC as titans-pytorch's MAC case, whose
#: memory chunk is its attention segment (128 tokens + its 16 long-term memory tokens). Its inner
#: step keeps the default bound: the engine's step bound keeps a 128-token chunk stable.
MATCH_VARIANT = {("titans", "mac"): dict(chunk_size=128)}
#: The image cases' configuration: ViT³-T's (vit3's "6m" preset, the official vittt_tiny: 224 x 224
#: RGB images in 16 x 16 patches, so 196 tokens, width 192, 6 heads x 32, MLP 768, 1000 classes) at
#: 4 layers instead of 12, so that every image type trains in seconds on one CPU thread.
IMAGE_SMALL = dict(image_size=224, patch_size=16, num_channels=3, hidden_size=192, intermediate_size=768,
                   num_hidden_layers=4, num_attention_heads=6, num_labels=1000)
#: the backbone fields of a registered type's cases, by its task
BACKBONE = {"causal-lm": SMALL, "image-classification": IMAGE_SMALL}
DECODE_TOKENS = 32  # greedy tokens timed per decode sample
PREFILL_PIECE = 2048  # long decode contexts are prefilled (untimed) in pieces of this many tokens
LM_BASELINE, LAYER_BASELINE, IMAGE_BASELINE = "llama", "sdpa-attention", "vit"  # IMAGE_BASELINE: a registered type
COMPILED_SUFFIX = "+compile"  # names the compile_inner_step twin of a case (bench.py --compile)


@functools.lru_cache(maxsize=None)
def token_ids(batch: int, seq: int) -> torch.Tensor:
    """Fixed random token ids (batch, seq), shared by every LM case."""
    return torch.randint(0, SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seq))


@functools.lru_cache(maxsize=None)
def hidden_states(batch: int, seq: int) -> torch.Tensor:
    """Fixed random layer inputs (batch, seq, hidden), shared by every layer case."""
    return torch.randn(batch, seq, SMALL["hidden_size"], generator=torch.Generator().manual_seed(seq))


@functools.lru_cache(maxsize=None)
def images(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random pixel values (batch, channels, size, size) and labels (batch,), shared by every image case."""
    gen = torch.Generator().manual_seed(size)
    return (torch.randn(batch, IMAGE_SMALL["num_channels"], size, size, generator=gen),
            torch.randint(0, IMAGE_SMALL["num_labels"], (batch,), generator=gen))


class CausalLM:
    """A Hugging Face causal LM (Llama or a tto model): loss from labels, decoding with its own cache."""

    can_decode = True
    #: the forward's argument and output field that carry the decoding state
    cache_field = "past_key_values"

    def __init__(self, model: nn.Module):
        self.module = model

    def train(self, batch: int, seq: int) -> None:
        """Forward + backward of the LM loss (no optimizer step)."""
        x = token_ids(batch, seq)
        self.module.train()
        self.module(x, labels=x).loss.backward()
        self.module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(self, batch: int, seq: int) -> None:
        """One forward over the whole sequence, no cache."""
        self.module.eval()
        self.module(token_ids(batch, seq), use_cache=False)

    @torch.no_grad()
    def start_decode(self, batch: int, context: int):
        """Prefill `context` tokens in pieces; returns (cache, first greedy token) to decode from."""
        self.module.eval()
        x, cache, out = token_ids(batch, context), None, None
        for start in range(0, context, PREFILL_PIECE):  # whole mini-batches of the official TTT, as its cache requires
            out = self.module(x[:, start : start + PREFILL_PIECE], **{self.cache_field: cache}, use_cache=True)
            cache = getattr(out, self.cache_field)
        return cache, out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def decode(self, state, tokens: int = DECODE_TOKENS) -> None:
        """`tokens` greedy tokens one at a time from `state` (which it advances)."""
        cache, token = state
        for _ in range(tokens):
            out = self.module(token, **{self.cache_field: cache}, use_cache=True)
            cache, token = getattr(out, self.cache_field), out.logits[:, -1:].argmax(-1)


class TitansPytorchMAC:
    """titans-pytorch's MemoryAsContextTransformer: its own loss (`return_loss`), no decode here."""

    can_decode = False

    def __init__(self, model: nn.Module):
        self.module = model

    def train(self, batch: int, seq: int) -> None:
        x = token_ids(batch, seq + 1)  # return_loss predicts x[:, 1:] from x[:, :-1]: seq positions
        self.module.train()
        self.module(x, return_loss=True).backward()
        self.module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(self, batch: int, seq: int) -> None:
        self.module.eval()
        self.module(token_ids(batch, seq))


class OfficialTTT(CausalLM):
    """The official TTT code's ``TTTForCausalLM`` (test-time-training/ttt-lm-pytorch ``ttt.py``): its
    decoding state is a ``TTTCache`` passed as ``cache_params`` (it has no ``past_key_values``)."""

    cache_field = "cache_params"


class ImageClassifier:
    """A tto image classifier: training is forward + backward of the classification loss, the
    ``prefill`` measure is inference (one forward, no grad); `size` is the image side in pixels."""

    can_decode = False

    def __init__(self, model: nn.Module):
        self.module = model

    def train(self, batch: int, size: int) -> None:
        """Forward + backward of the cross-entropy of random labels (no optimizer step)."""
        pixel_values, labels = images(batch, size)
        self.module.train()
        self.module(pixel_values, labels=labels).loss.backward()
        self.module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(self, batch: int, size: int) -> None:
        """Inference: one forward to the logits."""
        self.module.eval()
        self.module(images(batch, size)[0])


#: how a registered type's whole model is driven, and the group of its cases, by its task
ADAPTER = {"causal-lm": CausalLM, "image-classification": ImageClassifier}
MODEL_GROUP = {"causal-lm": "lm", "image-classification": "image"}


class Layer:
    """One mixer on hidden states; training is forward + backward of sum(output), input grad included."""

    can_decode = False

    def __init__(self, module: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        self.module, self._call = module, call

    def train(self, batch: int, seq: int) -> None:
        x = hidden_states(batch, seq).detach().requires_grad_(True)
        self.module.train()
        self._call(self.module, x).sum().backward()
        self.module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(self, batch: int, seq: int) -> None:
        self.module.eval()
        self._call(self.module, hidden_states(batch, seq))


@dataclass
class Case:
    """One benchmarked model. `build` returns its adapter; `config` records how it was configured."""

    name: str
    group: str  # "lm", "layer" or "image"
    build: Callable[[], object]
    config: dict = field(default_factory=dict)


class SDPAAttention(nn.Module):
    """Baseline layer: causal softmax attention, 4 heads x 64, fused q/k/v and an output projection."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


def _tto_mixer_call(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    b, t = x.shape[:2]
    return mixer(x, Context(mask=None, positions=torch.arange(t).expand(b, t)), None)


def _tto_config(entry, variant_fields: dict, **overrides):
    variant = next(iter(variant_fields.values()), None)
    fields = {**BACKBONE[entry.task], **variant_fields, **MATCH_VARIANT.get((entry.name, variant), {}), **overrides}
    return fields, tto.build_config(entry.name, **fields)


def _build_tto_model(entry, variant_fields: dict, **overrides):
    return ADAPTER[entry.task](entry.model_class(_tto_config(entry, variant_fields, **overrides)[1]))


def _build_tto_layer(entry, variant_fields: dict, **overrides) -> Layer:
    # A one-layer model initializes the mixer exactly as the full model does; keep only its mixer.
    model = entry.model_class(_tto_config(entry, variant_fields, num_hidden_layers=1, **overrides)[1])
    return Layer(model.model.layers[0].mixer, _tto_mixer_call)


def _has_memory(entry) -> bool:
    """Whether the type's model holds a memory engine (something for compile_inner_step to compile);
    built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        model = entry.model_class(_tto_config(entry, {}, num_hidden_layers=1)[1])
    return any(isinstance(m, ChunkwiseMemory) for m in model.modules())


def selected_tasks(types: list[str] | None) -> set[str]:
    """The tasks whose groups run: those of the named `types`, every task without a filter."""
    return {tto.get(name).task for name in types} if types else set(tto.registry.TASKS)


def _registered(task: str, types: list[str] | None, variants: list[str] | None, keep: str | None = None):
    """(entry, {variant field: variant}, case name) for every registered type of `task` and
    variant passing the filters (a type without variants passes `variants`; type `keep` passes both)."""
    for name in tto.available(task):
        if types and name not in types and name != keep:
            continue
        entry = tto.get(name)
        for variant, variant_fields in entry.variant_configs():
            if variants and variant is not None and variant not in variants and name != keep:
                continue
            yield entry, variant_fields, f"{name}-{variant}" if variant else name


def tto_cases(types: list[str] | None, variants: list[str] | None, compiled: bool = False) -> list[Case]:
    """An `lm` and a `layer` case for every registered language-model type and variant passing the
    filters; with `compiled`, also their twins built with ``compile_inner_step`` (named
    ``<case>+compile``) for the types that have a memory."""
    out = []
    for entry, variant_fields, name in _registered("causal-lm", types, variants):
        twins = [("", {})] + ([(COMPILED_SUFFIX, {"compile_inner_step": True})]
                              if compiled and _has_memory(entry) else [])
        for suffix, extra in twins:
            fields = _tto_config(entry, variant_fields, **extra)[0]
            out.append(Case(name + suffix, "lm", functools.partial(_build_tto_model, entry, variant_fields, **extra),
                            {"type": entry.name, **fields}))
            out.append(Case(name + suffix, "layer", functools.partial(_build_tto_layer, entry, variant_fields, **extra),
                            {"type": entry.name, **fields, "num_hidden_layers": 1}))
    return out


def image_cases(types: list[str] | None, variants: list[str] | None) -> list[Case]:
    """An `image` case for every registered image type and variant passing the filters, at
    IMAGE_SMALL, and always the baseline type IMAGE_BASELINE (softmax attention), first."""
    return sorted([Case(name, MODEL_GROUP[entry.task], functools.partial(_build_tto_model, entry, variant_fields),
                 {"type": entry.name, **_tto_config(entry, variant_fields)[0]})
            for entry, variant_fields, name in _registered("image-classification", types, variants, IMAGE_BASELINE)],
                  key=lambda case: case.name != IMAGE_BASELINE)


def baseline_cases() -> list[Case]:
    """The same-size HF Llama (SDPA) and the plain SDPA attention layer."""
    llama = dict(SMALL, attn_implementation="sdpa")
    return [
        Case(LM_BASELINE, "lm", lambda: CausalLM(LlamaForCausalLM(LlamaConfig(**llama))),
             {"class": "transformers.LlamaForCausalLM", **llama}),
        Case(LAYER_BASELINE, "layer",
             lambda: Layer(SDPAAttention(SMALL["hidden_size"], SMALL["num_attention_heads"]), lambda m, x: m(x)),
             {"class": "bench.models.SDPAAttention", "hidden": SMALL["hidden_size"],
              "heads": SMALL["num_attention_heads"]}),
    ]


def titans_pytorch_version() -> str | None:
    try:
        return importlib.metadata.version("titans-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _matched_chunk_size() -> int:
    """The chunk size of tto's titans memory at the small config (the peer layer is matched to it)."""
    entry = tto.get("titans")
    return _tto_config(entry, {})[1].chunk_size


def load_official_ttt(path: str):
    """The official TTT module from the file `path` (ttt-lm-pytorch's ``ttt.py``, not part of tto).
    Its ``TTTForCausalLM`` declares its tied weights as a list, which transformers 5 rejects in
    ``post_init``; the class gets the mapping form of the same tie (lm_head <- embed_tokens)."""
    spec = importlib.util.spec_from_file_location("ttt_official", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.TTTForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    return module


def official_ttt_cases(path: str) -> list[Case]:
    """TTT-Linear and TTT-MLP of the official code at `path` (lm), the small configuration with its
    defaults otherwise (mini-batch 16, base lr 1, no pre-conv), decoding with its ``TTTCache``."""
    fields = dict(SMALL, max_position_embeddings=2048)
    out = []
    for layer_type in ("linear", "mlp"):
        config = dict(fields, ttt_layer_type=layer_type)

        def build(config=config):
            module = load_official_ttt(path)
            return OfficialTTT(module.TTTForCausalLM(module.TTTConfig(**config)))

        out.append(Case(f"ttt-official-{layer_type}", "lm", build, {"class": "ttt.TTTForCausalLM", "path": path, **config}))
    return out


def peer_cases() -> list[Case]:
    """titans-pytorch's NeuralMemory (layer) and MAC transformer (lm), when the package is installed.

    NeuralMemory: dim 256, 4 heads x 64, its default MLP memory (depth 2, expansion 4), chunk size
    of tto's titans entry. MAC: the PEERS-CPU.md settings (README values with 4 heads x 64;
    everything else library default), so it is not parameter-matched (about 9M parameters).
    """
    if titans_pytorch_version() is None:
        return []
    heads, hidden = SMALL["num_attention_heads"], SMALL["hidden_size"]
    mac = dict(num_tokens=SMALL["vocab_size"], dim=hidden, depth=SMALL["num_hidden_layers"], heads=heads,
               dim_head=hidden // heads, segment_len=128, num_persist_mem_tokens=4, num_longterm_mem_tokens=16)

    def build_mac():
        from titans_pytorch import MemoryAsContextTransformer

        return TitansPytorchMAC(MemoryAsContextTransformer(**mac))

    out = [Case("titans-pytorch-mac", "lm", build_mac, {"class": "titans_pytorch.MemoryAsContextTransformer", **mac})]
    if "titans" in tto.available():
        memory = dict(dim=hidden, heads=heads, dim_head=hidden // heads, chunk_size=_matched_chunk_size(),
                      default_model_kwargs=dict(depth=2, expansion_factor=4.0))

        def build_memory():
            from titans_pytorch import NeuralMemory

            return Layer(NeuralMemory(**memory), lambda m, x: m(x)[0])

        out.append(Case("titans-pytorch-nm", "layer", build_memory, {"class": "titans_pytorch.NeuralMemory", **memory}))
    return out
