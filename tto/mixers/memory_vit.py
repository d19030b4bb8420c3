"""`memory_vit`: any causal memory type of the zoo as an image mixer, in its non-causal form (the
setting of ViT³, arXiv:2512.01643: the whole image is one chunk).

``memory_type`` names a registered language-model type and ``memory_fields`` passes that type's own
fields; the layer is that type's mixer, built from its own config class (so a misspelled field
fails as it would for the language model) with this config's backbone fields (widths, heads, init)
and its chunk field (:attr:`tto.config.MemoryConfig.chunk_field`: TTT's ``mini_batch_size``,
Titans' ``chunk_size``, ...) set to the image's token count N = (image_size / patch_size)^2. It reads
the image's N patch tokens in raster order as one sequence, inside :func:`tto.engine.noncausal`:
every memory engine of the mixer takes the N tokens as one chunk, commits that chunk from the
gradients of all N keys and values at its initial weights (the engine's own commit: its optimizer,
gates, step bound and retention, :mod:`tto.engine.memory`), and every query reads the committed
weights. ViT³'s one normalised gradient step (:mod:`tto.engine.one_step`) is this with its own
update; here each type keeps its update.

What stays causal: the parts of a type's mixer around its memory run as the type defines them, over
raster order: short causal convolutions (Titans, Miras, ATLAS: a token mixes the three before it)
and 1D RoPE on the raster positions (TTT). They are position encodings here, beside the backbone's
CPE; a query still reads weights written by every token of the image.

Which types run: the registry's language-model types whose default config runs this way (derived
when first asked, :func:`noncausal_types`: their tiny mixer built and read once), and a type with
other fields where its mixer does. Refused, with the reason in the error:

- ``deltanet``, ``gated_deltanet``: the delta rule is a per-token sequential update (each token
  steps from the state the token before it left): there is no chunk commit to read, only a causal
  scan in raster order;
- ``lact``, ``transformer``, ``ttt_e2e``, and the ``mac`` / ``mag`` / ``mal`` variants of Titans and
  TNT: they hold causal softmax attention (the image form of attention is the ``vit`` type);
- ``tnt``: its global memory reads only its chunk-start weights, which for one chunk are its
  initial weights and do not depend on the image.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import nn

from .. import registry
from ..cache import Context
from ..config import TTOConfig, config_error
from ..engine import ChunkwiseMemory, noncausal
from ..layers.attention import Attention
from ..registry import TINY_BACKBONE, register
from ..vision import VisionConfig

MEMORY_VIT_PRESETS = {
    # 8x8 images (scikit-learn's digits) in 2x2 patches: a 4x4 grid, as vit3's and vit's tiny presets
    "tiny": dict(image_size=8, patch_size=2, num_channels=1, num_labels=10),
}

#: the token count of the probe that decides which types run non-causally (a 4 x 4 grid)
PROBE_TOKENS = 16


def refusal(mixer: nn.Module) -> str | None:
    """Why a built language-model mixer cannot run non-causally, from its modules (None: it can, as
    far as its modules tell; a forward may still refuse, e.g. chunk-start reads)."""
    modules = list(mixer.modules())
    if any(isinstance(m, Attention) for m in modules):
        return "it holds causal softmax attention (the image form of attention is the 'vit' type)"
    engines = [m for m in modules if isinstance(m, ChunkwiseMemory)]
    if not engines:
        return "it has no memory engine"
    for engine in engines:
        if engine.causal_only is not None:
            return f"its {type(engine).__name__} engine: {engine.causal_only}"
    return None


def with_chunk(entry: registry.Entry, own: dict[str, Any], tokens: int, where: str) -> dict[str, Any]:
    """`own` fields of `entry`'s type with its chunk field set to `tokens` (one chunk per image)."""
    field = getattr(entry.config_class, "chunk_field", None)
    if field is None:
        return dict(own)
    if field in own:
        raise config_error(f"{where}[{field!r}]", own[field], f"is set by the image: one chunk of its {tokens} tokens")
    return {**own, field: tokens}


def read_noncausally(mixer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A language-model mixer's output for x (B, N, hidden) read non-causally (raster positions)."""
    batch, length = x.shape[:2]
    positions = torch.arange(length, device=x.device).expand(batch, length)
    with noncausal():
        return mixer(x, Context(mask=None, positions=positions), None)


@functools.cache
def noncausal_refusals() -> dict[str, str | None]:
    """Every registered language-model type -> why its default config cannot run non-causally
    (None: it can). Decided by building its mixer at the tiny backbone and reading a random image
    of :data:`PROBE_TOKENS` tokens."""
    reasons = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's random stream stays as it was
        for entry in registry.entries():
            if entry.task != "causal-lm":
                continue
            config = entry.config_class(**TINY_BACKBONE, **with_chunk(entry, {}, PROBE_TOKENS, "memory_fields"))
            mixer = entry.mixer_class(config, 0)
            reason = refusal(mixer)
            if reason is None:
                for p in mixer.parameters():
                    nn.init.normal_(p, std=config.initializer_range)
                try:
                    read_noncausally(mixer, torch.randn(1, PROBE_TOKENS, config.hidden_size))
                except ValueError as err:
                    reason = str(err)
            reasons[entry.name] = reason
    return reasons


def noncausal_types() -> tuple[str, ...]:
    """The language-model types whose default config runs as an image mixer (module docstring)."""
    return tuple(name for name, reason in noncausal_refusals().items() if reason is None)


class MemoryViTConfig(VisionConfig):
    """Image fields plus the memory type and its own fields (module docstring)."""

    choices: ClassVar[dict[str, Any]] = {**VisionConfig.choices, "memory_type": noncausal_types}
    variant_field: ClassVar[str] = "memory_type"

    memory_type: str = "ttt"  # the language-model type whose mixer reads each image (one chunk)
    # that type's own fields ({field: value}, e.g. {"ttt_layer_type": "mlp"}), checked by its config class;
    # backbone fields (widths, heads, init) are this config's, its chunk field is the image's token count
    memory_fields: dict[str, Any] | None = None

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        reason = noncausal_refusals().get(self.memory_type)
        if reason is not None:
            raise config_error("memory_type", self.memory_type, f"cannot run non-causally: {reason}", noncausal_types())
        super().validate()
        self.memory_config()

    def memory_config(self) -> TTOConfig:
        """The memory type's config: this config's backbone fields, ``memory_fields``, and its chunk
        field at the image's token count."""
        entry = registry.get(self.memory_type)
        own = with_chunk(entry, self.memory_fields or {}, self.image_tokens, "memory_fields")
        return self.type_config(self.memory_type, own, "memory_fields")


@register("memory_vit", config=MemoryViTConfig, presets=MEMORY_VIT_PRESETS,
          paper="the zoo's memory types, non-causal over one image (ViT³'s setting, arXiv:2512.01643)")
class NonCausalMemoryMixer(nn.Module):
    """The mixer of ``memory_type`` read non-causally: x (B, N, hidden), grid -> (B, N, hidden)."""

    def __init__(self, config: MemoryViTConfig, layer_idx: int):
        super().__init__()
        self.mixer = registry.get(config.memory_type).mixer_class(config.memory_config(), layer_idx)
        reason = refusal(self.mixer)
        if reason is not None:
            raise config_error("memory_fields", config.memory_fields,
                               f"make {config.memory_type!r} unable to run non-causally: {reason}", noncausal_types())

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return read_noncausally(self.mixer, x)

