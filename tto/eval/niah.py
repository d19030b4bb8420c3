"""``niah``: single needle in a haystack (RULER's S-NIAH), scored by greedy exact match.

Needle kinds (``--grid niah.needles=...``):

* ``passkey``: a five-digit pass key in repeated noise (the sentences of builtin:passkey's filler),
  asked for as builtin:passkey asks, so a model trained on it is tested on its own format;
* ``number``: a seven-digit "special magic number" in held-out prose;
* ``uuid``: a uuid-like hex string in held-out prose.

A prompt is exactly ``length`` tokens: haystack up to the needle, the needle, the rest of the
haystack, the question; the answer follows. The needle goes at the sentence start nearest to
``depth`` x (haystack tokens); depth 0 is the start of the context, depth 1 just before the question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.corpora import FILLER, PASSKEY_DIGITS, PASSKEY_NEEDLE, PASSKEY_QUESTION, random_digits
from .base import SentenceStream, SourceOptions, Task, check_positive, greedy_hit, map_batches, option, start, task

#: digits of the "number" needle, hex groups of the "uuid" needle (RULER's values)
NUMBER_DIGITS = 7
UUID_GROUPS = (8, 4, 4, 4, 12)


def uuid_like(rng: random.Random) -> str:
    return "-".join("".join(rng.choices("0123456789abcdef", k=n)) for n in UUID_GROUPS)


@dataclass(frozen=True)
class Needle:
    haystack: str  # "noise" (FILLER sentences) or "prose" (held-out documents)
    sentence: str  # the needle, with {key}
    question: str  # ends where the answer starts
    key: Callable[[random.Random], str]


NEEDLES = {
    "passkey": Needle("noise", PASSKEY_NEEDLE, PASSKEY_QUESTION, lambda rng: random_digits(rng, PASSKEY_DIGITS)),
    "number": Needle("prose", "The special magic number is {key}. ",
                     "What is the special magic number? The special magic number is ",
                     lambda rng: random_digits(rng, NUMBER_DIGITS)),
    "uuid": Needle("prose", "The special magic uuid is {key}. ",
                   "What is the special magic uuid? The special magic uuid is ", uuid_like),
}


@dataclass
class NIAHOptions(SourceOptions):
    needles: list[str] = option(list(NEEDLES), f"needle kinds, of {list(NEEDLES)}")
    lengths: list[int] = option([256, 512, 1024, 2048], "context lengths in tokens (haystack + needle + question)")
    depths: list[float] = option([0.0, 0.25, 0.5, 0.75, 1.0], "needle depths, fractions of the haystack")
    samples: int = option(4, "prompts per (needle, length, depth) cell (--limit caps it)")

    def check(self) -> None:
        super().check()
        unknown = [n for n in self.needles if n not in NEEDLES]
        if unknown:
            raise ValueError(f"niah.needles: unknown kind(s) {unknown}; valid: {sorted(NEEDLES)}")
        check_positive("niah.lengths", self.lengths)
        check_positive("niah.samples", self.samples)
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"niah.depths {self.depths}: each must be in [0, 1]")


@dataclass
class NIAHExample:
    ids: list[int]  # prompt + answer
    prompt_length: int  # the answer starts here
    needle: tuple[int, int]  # [start, end) of the needle sentence
    answer: str


def niah_example(lm, stream: SentenceStream, kind: str, length: int, depth: float, rng: random.Random) -> NIAHExample | None:
    """One prompt of exactly `length` tokens; None when the needle and question alone do not fit."""
    spec = NEEDLES[kind]
    key = spec.key(rng)
    needle, question, answer = lm.encode(spec.sentence.format(key=key)), lm.encode(spec.question), lm.encode(key)
    hay_len = length - len(needle) - len(question)
    if hay_len < 0:
        return None
    hay, starts = stream.take(rng, hay_len)
    at = min(starts, key=lambda s: (abs(s - depth * hay_len), s))
    ids = hay[:at] + needle + hay[at:] + question
    return NIAHExample(ids + answer, len(ids), (at, at + len(needle)), key)


@task("niah")
class NIAH(Task):
    Options = NIAHOptions

    def __init__(self, options, **kw):
        super().__init__(options, **kw)
        self.texts = {"noise": [FILLER]}
        if any(NEEDLES[n].haystack == "prose" for n in options.needles):
            self.texts["prose"] = options.held_out_texts()

    def examples(self, lm) -> dict[tuple[str, int, float], list[NIAHExample]]:
        o = self.options
        streams = {k: SentenceStream.from_texts(lm, v) for k, v in self.texts.items()}
        out = {}
        for kind in o.needles:
            for length in o.lengths:
                for depth in o.depths:
                    out[kind, length, depth] = [
                        niah_example(lm, streams[NEEDLES[kind].haystack], kind, length, depth,
                                     random.Random(f"{self.seed}/{kind}/{length}/{depth}/{i}"))
                        for i in range(self.samples(o.samples))]
        return out

    def run(self, lm, bar=None) -> dict:
        o, cells = self.options, self.examples(lm)
        start(bar, sum(len(v) for v in cells.values() if None not in v))
        acc = {}
        for (kind, length, depth), examples in cells.items():
            if None in examples:  # the length cannot hold the needle and the question
                acc[kind, length, depth] = None
                continue
            hits = map_batches(lm, [e.ids for e in examples],
                               lambda logits, ids, rows: greedy_hit(logits, ids, examples[rows[0]].prompt_length,  # noqa: B023 - called within this iteration
                                                                    ids.shape[1]).tolist(),
                               self.batch_size, bar)
            acc[kind, length, depth] = sum(hits) / len(hits)
        grid = {kind: {"lengths": o.lengths, "depths": o.depths,
                       "accuracy": [[acc[kind, n, d] for n in o.lengths] for d in o.depths]} for kind in o.needles}
        scored = [a for a in acc.values() if a is not None]
        return {"needles": grid, "accuracy": sum(scored) / len(scored) if scored else None}

    def summary(self, result: dict) -> dict:
        return {"niah": result["accuracy"]}

    def plot(self, results: dict[str, dict], out_dir: Path) -> list[Path]:
        from .report import pyplot, safe_name, save_figure

        plt = pyplot()
        paths = []
        for name, r in results.items():
            kinds = list(r["needles"])
            fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1, 3.4), squeeze=False)
            for ax, kind in zip(axes[0], kinds):
                g = r["needles"][kind]
                grid = np.array([[np.nan if a is None else a for a in row] for row in g["accuracy"]], dtype=float)
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_xticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]], fontsize=7)
                ax.set_yticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=7)
                for (i, j), a in np.ndenumerate(grid):
                    ax.text(j, i, "-" if np.isnan(a) else f"{a:.2f}", ha="center", va="center", fontsize=7)
                ax.set_xlabel("context length (tokens)")
                ax.set_title(kind, fontsize=9)
            axes[0][0].set_ylabel("needle depth")
            fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match")
            fig.suptitle(f"needle in a haystack: {name}", fontsize=10)
            paths.append(save_figure(fig, out_dir / f"niah_{safe_name(name)}.png"))
        return paths
