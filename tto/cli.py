"""Shared pieces of the command-line entry points."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
from pathlib import Path

#: --dtype choices of the entry points (torch dtype names)
DTYPES = ("float32", "bfloat16", "float16")


class OneLineErrors(argparse.ArgumentParser):
    """Bad usage ends with one line on stderr and exit status 2, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


#: glibc's mmap threshold in bytes that training holds fixed by default (:func:`return_freed_memory`;
#: a recipe sets its own with ``training_args.mmap_threshold``)
MMAP_THRESHOLD = 4 << 20
#: the largest threshold glibc accepts on 64-bit systems (half its arena heap size)
MAX_MMAP_THRESHOLD = 32 << 20
#: mallopt's parameter number for the mmap threshold (glibc's malloc.h)
M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int | None = MMAP_THRESHOLD) -> None:
    """Fix glibc's mmap threshold at `threshold` bytes, so that every tensor from that size on gets
    its own pages and gives them back when freed (None: glibc's default). By default glibc raises
    the threshold to the largest block freed so far (up to 32 MiB); from then on such tensors come
    from the heap, whose freed space stays with the process, and a memory engine's chunk loop
    frees many weight-sized tensors per chunk: at ATLAS 340m's size (9-18 MB each) the heap grew
    by about 1.3 GB per layer beyond the tensors alive (2 layers at 512 tokens: 7.3 GB peak by
    default, 4.9 GB at 128 KiB, 5.4 GB at 4 MiB).

    Own pages cost a page fault per 4 KiB at every allocation, so the threshold trades speed for
    memory: training at 2,048 tokens, two threads, bench's small models, tokens/s by default / at
    4 MiB / at 128 KiB: Titans LMM 600 / 599 / 478, TTT-MLP 1,685 / 1,660 / 1,103 (same peaks
    within 0.3 GB); ATLAS 340m (2 layers, 512 tokens) 7.5 / 12.6 / 16.1 s per step. The default,
    4 MiB, keeps the small and medium memories' speed; a recipe whose fast weights are several MB
    per chunk takes a lower one (``configs/atlas_340m.yml``: 128 KiB; 18.5 GB peak at 4 MiB). No-op
    where the C library has no ``mallopt`` (not glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None and threshold is not None:
        mallopt(M_MMAP_THRESHOLD, threshold)


#: the tokenizer of a model directory without its own (train.py always saves one)


def valid_devices() -> list[str]:
    """What ``--device`` accepts on this machine: auto, cpu and each accelerator present (cuda, cuda:0, ...)."""
    import torch

    valid = ["auto", "cpu"]
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        valid += [kind] + [f"{kind}:{i}" for i in range(torch.accelerator.device_count())]
    return valid


def resolve_device(spec: str, name: str = "--device") -> str:
    """``auto`` -> the accelerator when present, else cpu; a device this machine has is returned as
    given; anything else raises ValueError naming `name` (the flag or recipe key) and the valid choices."""
    import torch

    valid = valid_devices()
    if spec == "auto":
        return valid[2] if len(valid) > 2 else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    index = 0 if device is None or device.index is None else device.index
    present = device is not None and (device.type == "cpu" or f"{device.type}:{index}" in valid)
    if not present:
        raise ValueError(f"{name} {spec!r}: no such device on this machine; valid: {', '.join(valid)}")
    return spec


def os_reason(err: OSError) -> str:
    """The cause an OSError names, in words ('permission denied', 'no such file or directory', ...)."""
    return os.strerror(err.errno).lower() if err.errno else str(err)


#: the weight files `from_pretrained` reads, in its order of preference
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_weights(spec: str, directory: Path, names: list[str]) -> None:
    """Every weight file of the model readable, and each safetensors file whole (its header parses and
    covers the file); else ValueError naming the file and what is wrong with it."""
    from safetensors import SafetensorError, safe_open

    found = [n for n in WEIGHT_FILES if n in names]
    if not found:
        raise ValueError(f"--model {spec!r}: no weights there (none of {', '.join(WEIGHT_FILES)})")
    files = [directory / found[0]]
    try:
        if found[0].endswith(".index.json"):
            files = [directory / shard for shard in sorted(set(json.loads(files[0].read_text())["weight_map"].values()))]
        for path in files:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as err:
        raise ValueError(f"--model {spec!r}: cannot read {Path(err.filename or files[0]).name} "
                         f"({os_reason(err)})") from None
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"--model {spec!r}: {found[0]} is not a valid weight index ({err})") from None
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, "pt"):
                    pass
            except SafetensorError as err:
                raise ValueError(f"--model {spec!r}: {path.name} is truncated or corrupt ({err})") from None


def resolve_model(spec: str) -> str:
    """The directory of model `spec`: a local directory, or a hub name found in the local Hugging Face
    cache (no download). Its config and weights are checked readable and whole; anything wrong raises
    ValueError in one line naming the problem (missing, permission denied, truncated, ...)."""
    from .data.offline import looks_like_hub_id

    directory = Path(spec)
    if not os.path.lexists(spec) and looks_like_hub_id(spec):
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        if not isinstance(cached, str):
            raise ValueError(f"--model {spec!r}: no such directory, and not in the local Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}); download it there first, or give a directory")
        directory = Path(cached).parent
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise ValueError(f"--model {spec!r}: no such directory") from None
    except OSError as err:
        raise ValueError(f"--model {spec!r}: cannot read the directory ({os_reason(err)})") from None
    if "config.json" not in names:
        raise ValueError(f"--model {spec!r}: no config.json there (a directory written by train.py or save_pretrained)")
    try:
        json.loads((directory / "config.json").read_bytes())
    except OSError as err:
        raise ValueError(f"--model {spec!r}: cannot read config.json ({os_reason(err)})") from None
    except ValueError as err:
        raise ValueError(f"--model {spec!r}: config.json is not valid JSON ({err})") from None
    _check_weights(spec, directory, names)
    return str(directory)


def tokenizer_spec(model_dir: str | None, spec: str | None = None) -> str:
    """`spec` when given, else the model directory's own tokenizer when it has one, else builtin:bytes."""
    from .data import BYTE_TOKENIZER

    if spec is not None:
        return spec
    has_own = model_dir is not None and (Path(model_dir) / "tokenizer_config.json").exists()
    return model_dir if has_own else BYTE_TOKENIZER
