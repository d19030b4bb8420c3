"""Shared pieces of the command-line entry points."""

from __future__ import annotations

import argparse

#: --dtype choices of the entry points (torch dtype names)
DTYPES = ("float32", "bfloat16", "float16")


class OneLineErrors(argparse.ArgumentParser):
    """Bad usage ends with one line on stderr and exit status 2, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


#: the tokenizer of a model directory without its own (train.py always saves one)
DEFAULT_TOKENIZER = "builtin:bytes"


def resolve_device(spec: str) -> str:
    """``auto`` -> cuda when present, else cpu; anything else is returned as given."""
    import torch

    return spec if spec != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def tokenizer_spec(model_dir: str | None, spec: str | None = None) -> str:
    """`spec` when given, else the model directory's own tokenizer when it has one, else builtin:bytes."""
    from pathlib import Path

    if spec is not None:
        return spec
    has_own = model_dir is not None and (Path(model_dir) / "tokenizer_config.json").exists()
    return model_dir if has_own else DEFAULT_TOKENIZER
