"""Built-in corpora: nothing to download.

* ``builtin:pydoc``: the English prose CPython ships as ``pydoc_data.topics`` (79 documents, ~466 KB).
* ``builtin:recall``: associative recall: ``key=value`` pairs, then the same keys asked again in a
  shuffled order, each followed by its value. A model can only predict the answers by remembering
  the pairs it read.
* ``builtin:passkey``: a five-digit pass key hidden at a random depth in filler text, asked for at
  the end: before or after one of ``filler_repeats`` filler paragraphs, or (``prompt_length``) at
  any sentence start of a filler that begins at a random sentence, as eval's niah builds its prompts.

Synthetic corpora are deterministic given their ``seed`` (options of the dataset section).

The synthetic corpora also *mark their answers*: the character spans a model can only predict by
using what it read earlier (recall: each asked value; passkey: the key after the question). The
random keys and values themselves are unpredictable noise; with ``dataset.loss_on: answers`` the
training loss is computed on the marked spans only (see ``tto.data.datasets.pack_documents``).
"""

from __future__ import annotations

import random
import re
import string
from typing import Sequence

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


#: where text is cut into sentences: the whitespace after a sentence's end
SENTENCE_END = re.compile(r"(?<=[.!?\n])\s+")


def split_sentences(text: str) -> list[str]:
    """`text`'s sentences, each followed by one space."""
    return [s + " " for s in SENTENCE_END.split(text) if s.strip()]


def haystack(rng: random.Random, sentences: Sequence[Sequence], n: int) -> tuple[list, list[int]]:
    """`n` items ending at the end of a sentence (whole sentences from a random one on, read cyclically,
    the first one cut at its start to fit), and the indices in them where sentences start (with 0 and
    `n`). A sentence is a string (items: characters) or a list of token ids; builtin:passkey's filler
    and eval's niah haystacks are both built here."""
    items: list = []
    starts = []
    i = rng.randrange(len(sentences))
    while len(items) < n:
        starts.append(len(items))
        items.extend(sentences[i])
        i = (i + 1) % len(sentences)
    cut = len(items) - n
    return items[cut:], sorted({s - cut for s in starts if s >= cut} | {0, n})


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


#: a document and its answers: [start, end) character spans, in order and not overlapping
Marked = tuple[str, list[tuple[int, int]]]


def count_range(value: int | list[int], option: str) -> tuple[int, int]:
    """An option that is a count, or [min, max]: a count drawn uniformly per document, as (min, max);
    ValueError naming `option` (e.g. "builtin:recall pairs") for a bad one."""
    lo, hi = (value, value) if isinstance(value, int) else tuple(value) if len(value) == 2 else (0, -1)
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"{option}={value!r}: a positive count or [min, max] with 1 <= min <= max")
    return lo, hi


def draw(rng: random.Random, lo: int, hi: int) -> int:
    """A count from min..max (no draw when they are equal, so a fixed count leaves `rng` alone)."""
    return lo if lo == hi else rng.randint(lo, hi)


def pair_counts(pairs: int | list[int], key_length: int) -> tuple[int, int]:
    """builtin:recall's ``pairs`` option as (min, max) (:func:`count_range`); ValueError for a bad one."""
    lo, hi = count_range(pairs, "builtin:recall pairs")
    if hi > len(string.ascii_lowercase) ** key_length:
        raise ValueError(f"builtin:recall pairs={pairs!r}: more than the {len(string.ascii_lowercase) ** key_length} "
                         f"distinct keys of {key_length} letters")
    return lo, hi


def recall_marked(num_documents: int = 4000, pairs: int | list[int] = 8, key_length: int = RECALL_KEY_LENGTH,
                  value_digits: int = RECALL_VALUE_DIGITS, seed: int = 0) -> list[Marked]:
    """Each document: ``k1=v1 k2=v2 ... | kπ1=vπ1 kπ2=vπ2 ...`` with distinct keys; the answers are the
    asked values (``vπ1``, ``vπ2``, ...). ``pairs=[min, max]`` draws each document's number of pairs
    uniformly from min..max (a mix of easy and hard documents)."""
    lo, hi = pair_counts(pairs, key_length)
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        table = recall_table(rng, draw(rng, lo, hi), key_length, value_digits)
        asked = list(table)
        rng.shuffle(asked)
        text = " ".join(recall_pair(k, v) for k, v in table.items()) + RECALL_SEPARATOR
        answers = []
        for i, k in enumerate(asked):
            text += (" " if i else "") + recall_pair(k, "")
            answers.append((len(text), len(text) + len(table[k])))
            text += table[k]
        docs.append((text, answers))
    return docs


def recall_documents(num_documents: int = 4000, pairs: int | list[int] = 8, key_length: int = RECALL_KEY_LENGTH,
                     value_digits: int = RECALL_VALUE_DIGITS, seed: int = 0) -> list[str]:
    """The texts of :func:`recall_marked`."""
    return [text for text, _ in recall_marked(num_documents, pairs, key_length, value_digits, seed)]


#: the pass key sentence hidden in the filler, and the question that asks for it (the key follows)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
PASSKEY_DIGITS = 5


def passkey_filler_length(prompt_length: int) -> int:
    """Filler characters in a builtin:passkey prompt of `prompt_length` characters (filler, needle,
    question); ValueError when the needle and question alone do not fit."""
    filler = prompt_length - len(PASSKEY_NEEDLE.format(key="0" * PASSKEY_DIGITS)) - len(PASSKEY_QUESTION)
    if filler < 0:
        raise ValueError(f"builtin:passkey prompt_length={prompt_length}: the needle and the question alone "
                         f"take {prompt_length - filler} characters")
    return filler


def passkey_marked(num_documents: int = 2000, filler_repeats: int = 8, seed: int = 0,
                   prompt_length: int | list[int] | None = None) -> list[Marked]:
    """Each document: filler, ``The pass key is NNNNN. Remember it.`` somewhere in it, the question,
    the key; the answer is the key after the question.

    ``prompt_length=None``: the filler is `filler_repeats` copies of :data:`FILLER`, the needle
    between two of them (depth 0..filler_repeats paragraphs, uniformly). ``prompt_length=N``
    (`filler_repeats` unused): eval's niah construction for the pass key needle; the prompt (filler,
    needle, question) is exactly N characters (niah.lengths=N tokens with the builtin:bytes
    tokenizer), the filler is FILLER's sentences read cyclically from a random one and cut at its
    start to fit (:func:`haystack`), and the needle goes at one of its sentence starts chosen
    uniformly (depth 0 and 1 included). ``prompt_length=[min, max]``: each document's N drawn
    uniformly from min..max (a model that reads every length up to max, not one)."""
    rng = random.Random(seed)
    sentences = split_sentences(FILLER)
    lengths = None if prompt_length is None else count_range(prompt_length, "builtin:passkey prompt_length")
    if lengths is not None:
        passkey_filler_length(lengths[0])  # the shortest must fit the needle and the question
    docs = []
    for _ in range(num_documents):
        key = random_digits(rng, PASSKEY_DIGITS)
        needle = PASSKEY_NEEDLE.format(key=key)
        if lengths is None:
            depth = rng.randint(0, filler_repeats)
            prompt = FILLER * depth + needle + FILLER * (filler_repeats - depth) + PASSKEY_QUESTION
        else:
            chars, starts = haystack(rng, sentences, passkey_filler_length(draw(rng, *lengths)))
            at = rng.choice(starts)
            prompt = "".join(chars[:at]) + needle + "".join(chars[at:]) + PASSKEY_QUESTION
        docs.append((f"{prompt}{key}.", [(len(prompt), len(prompt) + len(key))]))
    return docs


def passkey_documents(num_documents: int = 2000, filler_repeats: int = 8, seed: int = 0,
                      prompt_length: int | list[int] | None = None) -> list[str]:
    """The texts of :func:`passkey_marked`."""
    return [text for text, _ in passkey_marked(num_documents, filler_repeats, seed, prompt_length)]


BUILTIN_CORPORA = {
    "builtin:pydoc": pydoc_documents,
    "builtin:recall": recall_documents,
    "builtin:passkey": passkey_documents,
}

#: the built-in corpora that mark answer spans (``dataset.loss_on: answers``)
MARKED_CORPORA = {
    "builtin:recall": recall_marked,
    "builtin:passkey": passkey_marked,
}


def _check_name(name: str, valid) -> None:
    if name not in valid:
        from ..config import suggest

        raise ValueError(f"unknown built-in corpus {name!r}{suggest(name, valid)}; valid: {sorted(valid)}")


def builtin_documents(name: str, **options) -> list[str]:
    _check_name(name, BUILTIN_CORPORA)
    return BUILTIN_CORPORA[name](**options)


def builtin_marked_documents(name: str, **options) -> list[Marked]:
    """A built-in corpus's documents with their answer spans; ValueError for a corpus that marks none."""
    _check_name(name, BUILTIN_CORPORA)
    if name not in MARKED_CORPORA:
        raise ValueError(f"built-in corpus {name!r} marks no answers (dataset.loss_on: answers); "
                         f"corpora that do: {sorted(MARKED_CORPORA)}")
    return MARKED_CORPORA[name](**options)
