"""Labelled images for the image types: scikit-learn's bundled 8x8 digits (``builtin:digits``,
offline) or a ``datasets`` imagefolder directory (``<dir>/<label>/<image>``, or a ``train`` /
``test`` level above that).

Every image becomes ``pixel_values`` (channels, image_size, image_size), float32 in [0, 1]: grey
images are repeated to three channels and colour images averaged to one when the model asks for it,
and each is resized (bilinear) to the model's ``image_size``. Labels are ``labels``, integers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, load_dataset

#: the built-in image dataset
DIGITS = "builtin:digits"
#: scikit-learn's digits hold 4-bit grey levels, 0..16
DIGITS_MAX_VALUE = 16.0


def to_pixels(image: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """An image (c, h, w) in [0, 1] as (channels, size, size): grey -> repeated, colour -> mean, resized."""
    if image.shape[0] != channels:
        if image.shape[0] == 1:
            image = image.expand(channels, -1, -1)
        elif channels == 1:
            image = image.mean(0, keepdim=True)
        else:
            raise ValueError(f"images with {image.shape[0]} channels cannot feed a model of num_channels={channels}")
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return image.contiguous()


def load_images(name: str, *, split: str = "train", channels: int, size: int) -> tuple[Dataset, int]:
    """(a Dataset with ``pixel_values`` and ``labels`` as torch tensors, number of classes)."""
    if name == DIGITS:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / DIGITS_MAX_VALUE
        pixels = torch.stack([to_pixels(image, channels, size) for image in images])
        ds = Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": digits.target.astype(np.int64)})
        return ds.with_format("torch"), len(digits.target_names)
    if name.startswith("builtin:"):
        raise ValueError(f"dataset {name!r}: the built-in image dataset is {DIGITS!r}")
    if not Path(name).is_dir():
        raise FileNotFoundError(f"dataset {name!r}: an image dataset is {DIGITS!r} or an imagefolder directory "
                                "(<dir>/<label>/<image files>)")
    ds = load_dataset("imagefolder", data_dir=name, split=split)
    features = ds.features.get("label")
    if not isinstance(features, ClassLabel):
        raise ValueError(f"dataset {name!r}: found no class folders (<dir>/<label>/<image files>)")

    def transform(batch):  # decoded when read; the columns carry the model's argument names (the Trainer keeps those)
        pixels = []
        for image in batch["pixel_values"]:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
            tensor = torch.from_numpy(array)[None] if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1)
            pixels.append(to_pixels(tensor, channels, size))
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch["labels"])}

    ds = ds.rename_columns({"image": "pixel_values", "label": "labels"})
    return ds.with_transform(transform), features.num_classes
