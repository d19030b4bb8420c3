"""Built-in corpora: nothing to download.

* ``builtin:pydoc``: the English prose CPython ships as ``pydoc_data.topics`` (79 documents, ~466 KB).
* ``builtin:recall``: associative recall: ``key=value`` pairs, then the same keys asked again in a
  shuffled order, each followed by its value. A model can only predict the answers by remembering
  the pairs it read.
* ``builtin:passkey``: a five-digit pass key hidden at a random depth in filler text, asked for at
  the end.

Synthetic corpora are deterministic given their ``seed`` (options of the dataset section).
"""

from __future__ import annotations

import random
import string

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def random_digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.digits, k=n))


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def recall_table(rng: random.Random, pairs: int, key_length: int, value_digits: int) -> dict[str, str]:
    """`pairs` distinct lowercase keys of `key_length` letters, each with a value of `value_digits` digits."""
    keys: dict[str, None] = {}  # insertion-ordered (a set's order changes with the process's hash seed)
    while len(keys) < pairs:
        keys["".join(rng.choices(string.ascii_lowercase, k=key_length))] = None
    return {k: random_digits(rng, value_digits) for k in keys}


def recall_pair(key: str, value: str) -> str:
    """One written or asked pair: ``key=value``."""
    return f"{key}={value}"


#: between the written pairs and the asked ones
RECALL_SEPARATOR = " | "


#: builtin:recall's default key and value sizes (the mqar eval task uses the same)
RECALL_KEY_LENGTH = 3
RECALL_VALUE_DIGITS = 2


def recall_documents(num_documents: int = 4000, pairs: int = 8, key_length: int = RECALL_KEY_LENGTH,
                     value_digits: int = RECALL_VALUE_DIGITS, seed: int = 0) -> list[str]:
    """Each document: ``k1=v1 k2=v2 ... | kπ1=vπ1 kπ2=vπ2 ...`` with distinct keys."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        table = recall_table(rng, pairs, key_length, value_digits)
        asked = list(table)
        rng.shuffle(asked)
        docs.append(" ".join(recall_pair(k, v) for k, v in table.items()) + RECALL_SEPARATOR
                    + " ".join(recall_pair(k, table[k]) for k in asked))
    return docs


#: the pass key sentence hidden in the filler, and the question that asks for it (the key follows)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
PASSKEY_DIGITS = 5


def passkey_documents(num_documents: int = 2000, filler_repeats: int = 8, seed: int = 0) -> list[str]:
    """Each document: filler, ``The pass key is NNNNN.`` at a random depth, filler, the question."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        key = random_digits(rng, PASSKEY_DIGITS)
        depth = rng.randint(0, filler_repeats)
        needle = PASSKEY_NEEDLE.format(key=key)
        body = FILLER * depth + needle + FILLER * (filler_repeats - depth)
        docs.append(body + f"{PASSKEY_QUESTION}{key}.")
    return docs


BUILTIN_CORPORA = {
    "builtin:pydoc": pydoc_documents,
    "builtin:recall": recall_documents,
    "builtin:passkey": passkey_documents,
}


def builtin_documents(name: str, **options) -> list[str]:
    if name not in BUILTIN_CORPORA:
        from ..config import suggest

        raise ValueError(f"unknown built-in corpus {name!r}{suggest(name, BUILTIN_CORPORA)}; "
                         f"valid: {sorted(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[name](**options)
