"""Tokenizers: the built-in byte-level one (no download), a local directory, or a hub name."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .offline import hub_error, hub_reachable, looks_like_hub_id

BYTE_TOKENIZER = "builtin:bytes"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; the 256 bytes follow


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0..255 used by byte-level BPE (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def byte_tokenizer(model_max_length: int = 1 << 20) -> PreTrainedTokenizerFast:
    """UTF-8 bytes as tokens: ids 0-3 are specials, byte b is id 4 + b. Any text round-trips."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({symbol: len(SPECIALS) + b for b, symbol in enumerate(byte_symbols())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def load_tokenizer(spec: str):
    """`builtin:bytes`, a local directory, a GGUF file (``.gguf`` or ``pkg:PACKAGE/FILE``, see
    :mod:`tto.pretrained`), or a hub name (failing fast when the hub is unreachable)."""
    from ..pretrained import GGUF_SUFFIX, PACKAGE_PREFIX, load_pretrained_tokenizer

    if spec == BYTE_TOKENIZER:
        return byte_tokenizer()
    if spec.startswith("builtin:"):
        raise ValueError(f"unknown built-in tokenizer {spec!r}; valid: [{BYTE_TOKENIZER!r}]")
    if spec.startswith(PACKAGE_PREFIX) or spec.endswith(GGUF_SUFFIX):
        tok = load_pretrained_tokenizer(spec)
    else:
        if not Path(spec).is_dir():
            if not looks_like_hub_id(spec):
                raise FileNotFoundError(f"tokenizer {spec!r}: no such directory")
            hub_reachable()
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except OSError as err:
            if Path(spec).is_dir():
                raise
            raise hub_error("tokenizer", spec, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
