"""What every evaluation task shares: the task registry, the model under test, text sources, scoring.

A task is a class registered with :func:`task` under its ``--tasks`` name. Its ``Options`` dataclass
holds every setting with a documented default; list-valued fields are the axes of its grid and any
field can be set from the command line (``--grid niah.lengths=256,512``). Scores that need an
answer use *greedy exact match*: the answer is right when the argmax prediction at each of its
tokens, given everything before it, is that token. One forward pass over ``prompt + answer``
therefore gives exactly what greedy decoding of ``len(answer)`` tokens would.
"""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..config import suggest
from ..data.corpora import haystack, split_sentences
from ..training import DatasetSection
from ..typed import TypedError, annotations, convert

TASKS: dict[str, type["Task"]] = {}


def task(name: str):
    """Class decorator registering a :class:`Task` under its ``--tasks`` name."""

    def decorate(cls):
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return decorate


def get_task(name: str) -> type["Task"]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}{suggest(name, TASKS)}; valid tasks: {sorted(TASKS)}")
    return TASKS[name]


def option(default, help: str):
    """A task option with its documentation (shown by ``eval.py --list-tasks``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SourceOptions:
    """Where held-out text comes from: the same fields and split as train.py's dataset section."""

    dataset: str = option(DatasetSection.name, "documents, given like train.py's dataset.name")
    eval_fraction: float = option(DatasetSection.eval_fraction, "share of documents held out (train.py's split)")
    split_seed: int = option(DatasetSection.seed, "seed of the held-out split (train.py's dataset.seed)")

    def check(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: {self.eval_fraction} must be in [0, 1)")

    def section(self, **more) -> DatasetSection:
        return DatasetSection(name=self.dataset, eval_fraction=self.eval_fraction, seed=self.split_seed, **more)

    def held_out_texts(self) -> list[str]:
        """The held-out documents (all documents when eval_fraction is 0)."""
        from ..training import split_documents

        train, held_out = split_documents(self.section())
        return list((held_out if held_out is not None else train)["text"])


def parse_value(text: str, annotation: Any, name: str):
    """`text` converted to the option's declared type by :func:`tto.typed.convert` (lists: comma-separated)."""
    try:
        if typing.get_origin(annotation) is list:
            (element,) = typing.get_args(annotation)
            return [convert(name, part.strip(), element) for part in text.split(",") if part.strip()]
        return convert(name, text, annotation)
    except TypedError as err:
        raise ValueError(f"--grid {err}") from None


def apply_grid(options: Any, task_name: str, items: dict[str, str]) -> Any:
    """Options with ``field=value`` strings applied; unknown fields raise naming the valid ones."""
    valid = annotations(type(options))
    changes = {}
    for key, text in items.items():
        if key not in valid:
            raise ValueError(f"--grid {task_name}.{key}: unknown option of task {task_name!r}{suggest(key, valid)}; "
                             f"valid: {sorted(valid)}")
        changes[key] = parse_value(text, valid[key], f"{task_name}.{key}")
        if isinstance(changes[key], list) and not changes[key]:
            raise ValueError(f"--grid {task_name}.{key}: empty list")
    options = dataclasses.replace(options, **changes)
    options.check()
    return options


@dataclass
class LM:
    """A causal LM under test: any ``AutoModelForCausalLM`` with its tokenizer."""

    name: str
    path: str
    model: Any
    tokenizer: Any
    device: str

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) float32 next-token logits, with no cache carried over."""
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float().cpu()


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) loss of each token given the ones before it (column 0: NaN)."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return torch.cat([torch.full_like(nll[:, :1], math.nan), nll], dim=1)


def greedy_hit(logits: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(B,) bool: the argmax prediction equals ids at every position in [start, end) of each row."""
    return (logits[:, start - 1 : end - 1].argmax(-1) == ids[:, start:end]).all(dim=1)


def map_batches(lm: LM, seqs: list[list[int]], reduce: Callable, batch_size: int, bar=None) -> list:
    """``reduce(logits (B,T,V), ids (B,T), rows)`` over batches of equal-length `seqs`; one result per seq,
    in the order of `seqs`. ``rows`` are the indices of the batch's sequences in `seqs`."""
    out: list = [None] * len(seqs)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_length.setdefault(len(s), []).append(i)
    for rows_all in by_length.values():
        for k in range(0, len(rows_all), batch_size):
            rows = rows_all[k : k + batch_size]
            ids = torch.tensor([seqs[i] for i in rows], dtype=torch.long)
            for i, r in zip(rows, reduce(lm.logits(ids), ids, rows)):
                out[i] = r
            if bar is not None:
                bar.update(len(rows))
    return out


@dataclass
class SentenceStream:
    """Text as tokenized sentences, read cyclically from a chosen start: a haystack cut at sentence
    starts, so a needle is never inserted inside a word."""

    sentences: list[list[int]]

    @classmethod
    def from_texts(cls, lm: LM, texts: list[str]) -> "SentenceStream":
        parts = [s for text in texts for s in split_sentences(text)]
        return cls([ids for ids in (lm.encode(p) for p in parts) if ids])

    def take(self, rng: random.Random, n: int) -> tuple[list[int], list[int]]:
        """`n` tokens ending at the end of a sentence (whole sentences from a random one on, the first
        one cut at its start to fit), and the indices in them where sentences start (with 0 and `n`)."""
        return haystack(rng, self.sentences, n)


class Task:
    """One evaluation. Subclasses set ``Options`` and implement :meth:`run`, :meth:`summary`, :meth:`plot`."""

    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options, *, seed: int = 0, limit: int | None = None, batch_size: int = 8):
        self.options, self.seed, self.limit, self.batch_size = options, seed, limit, batch_size

    def samples(self, wanted: int) -> int:
        """Examples per grid cell: the option, capped by --limit."""
        return wanted if self.limit is None else min(wanted, self.limit)

    def run(self, lm: LM, bar=None) -> dict:
        """JSON-ready results of one model."""
        raise NotImplementedError

    def summary(self, result: dict) -> dict[str, float | None]:
        """The few numbers of `result` shown in the printed table."""
        raise NotImplementedError

    def plot(self, results: dict[str, dict], out_dir: Path) -> list[Path]:
        """PNG files drawn from ``{model name: result}``; [] for tasks without a plot."""
        return []


def start(bar, total: int) -> None:
    """Set the progress bar's total once a task knows how many sequences it will score."""
    if bar is not None:
        bar.reset(total=total)


def check_positive(name: str, values) -> None:
    for v in values if isinstance(values, list) else [values]:
        if v <= 0:
            raise ValueError(f"{name}: {v} must be positive")
