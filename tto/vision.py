"""The image classifier every image type runs on (``task = "image-classification"``).

``TTOVisionModel``: patch embedding (a ``patch_size`` stride convolution) -> blocks -> final
LayerNorm, over the (image_size / patch_size)^2 grid of patch tokens, row-major, with no position
embedding and no class token (ViT³'s backbone, the DeiT layout). Each block is
``h += CPE(h)`` (a 3x3 depthwise convolution over the grid, the conditional position encoding;
``cpe``), ``h += mixer(LN(h))``, ``h += MLP(LN(h))`` with a two-layer ``hidden_act`` MLP.
``TTOForImageClassification`` averages the tokens and applies a linear head (``num_labels``),
with cross-entropy on ``labels``. A mixer of an image type is called as ``mixer(x, grid)``: x
(B, N, hidden), grid = (rows, columns) of the N tokens. The registry derives one pair of these
classes per image type (``Vit3ForImageClassification``, ...).
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput

from . import registry
from .config import TTOConfig, config_error
from .engine import Float32Parameters


class VisionConfig(TTOConfig):
    """Backbone fields of the image types (besides TTOConfig's widths, depth, heads and init)."""

    task: ClassVar[str] = "image-classification"
    positive_fields: ClassVar[tuple[str, ...]] = TTOConfig.positive_fields + ("image_size", "patch_size", "num_channels")

    image_size: int = 224  # square input images of image_size x image_size pixels
    patch_size: int = 16  # square patches, one token each
    num_channels: int = 3  # colour channels of the input
    hidden_act: str = "gelu"  # activation of the two-layer MLP
    mlp_bias: bool = True  # biases in the MLP
    layer_norm_eps: float = 1e-6  # epsilon of every LayerNorm
    cpe: bool = True  # h += 3x3 depthwise conv of h over the grid before each mixer (conditional position encoding)

    def validate(self) -> None:
        super().validate()
        if self.image_size % self.patch_size:
            raise config_error("patch_size", self.patch_size, f"must divide image_size={self.image_size}")


class MLP(nn.Module):
    """fc2(act(fc1(x)))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """``h += CPE(h); h += mixer(LN(h), grid); h += MLP(LN(h))``."""

    def __init__(self, config: VisionConfig, layer_idx: int):
        super().__init__()
        width = config.hidden_size
        self.layer_type = config.layer_mixers[layer_idx]
        self.cpe = nn.Conv2d(width, width, 3, padding=1, groups=width) if config.cpe else None
        self.mixer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mixer = registry.get(self.layer_type).mixer_class(config.layer_config(layer_idx), layer_idx)
        self.mlp_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """h (B, N, hidden), grid = (rows, columns), N = rows * columns."""
        if self.cpe is not None:
            h = h + self.cpe(h.transpose(1, 2).unflatten(2, grid)).flatten(2).transpose(1, 2)
        h = h + self.mixer(self.mixer_norm(h), grid)
        return h + self.mlp(self.mlp_norm(h))


class TTOVisionPreTrainedModel(PreTrainedModel):
    config_class = VisionConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    _no_split_modules = ["VisionBlock"]

    def post_init(self) -> None:
        """Also: memories' parameters load as float32 under any ``dtype`` (as the language models')."""
        super().post_init()
        self._keep_in_fp32_modules_strict.update(
            "^" + re.escape(name) + r"\." for name, m in self.named_modules() if isinstance(m, Float32Parameters))

    def _init_weights(self, module: nn.Module) -> None:
        """Transformers' initialisation (linear and conv weights ~ N(0, initializer_range^2), LayerNorm
        at 1 and 0, RMSNorm weights at 1), then a module's own ``_tto_init(init)`` where it defines one."""
        super()._init_weights(module)
        if isinstance(module, nn.RMSNorm):  # the memory types' (tto.mixers.memory_vit)
            init.ones_(module.weight)
        custom = getattr(module, "_tto_init", None)
        if custom is not None:
            custom(init)


class TTOVisionModel(TTOVisionPreTrainedModel):
    def __init__(self, config: VisionConfig):
        super().__init__(config)
        self.patch_embed = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.layers = nn.ModuleList(VisionBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutput:
        """pixel_values (B, num_channels, image_size, image_size) -> last_hidden_state (B, N, hidden)."""
        c = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; this model reads "
                             f"(batch, {c.num_channels}, {c.image_size}, {c.image_size})")
        grid = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        rows, columns = grid.shape[-2:]
        h = grid.flatten(2).transpose(1, 2)
        for i, layer in enumerate(self.layers):
            h = layer(h, (rows, columns))
            if c.check_finite and not bool(torch.isfinite(h).all()):
                raise FloatingPointError(f"layer {i} ({c.layer_mixers[i]}) produced NaN/Inf; the layers below it were "
                                         "finite (set check_finite=False to skip this check)")
        return BaseModelOutput(last_hidden_state=self.norm(h))


class TTOForImageClassification(TTOVisionPreTrainedModel):
    def __init__(self, config: VisionConfig):
        super().__init__(config)
        self.model = TTOVisionModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None, **kwargs) -> ImageClassifierOutput:
        """pixel_values (B, C, H, W) -> logits (B, num_labels); loss: cross-entropy with `labels` (B,)."""
        h = self.model(pixel_values).last_hidden_state
        logits = self.classifier(h.mean(dim=1))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)
