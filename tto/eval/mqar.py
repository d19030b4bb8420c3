"""``mqar``: multi-query associative recall accuracy vs number of key-value pairs and sequence length.

A sequence is builtin:recall's format with a distractor gap: ``k1=v1 k2=v2 ...``, filler noise up to
the sequence length, `` | ``, then every key asked once in a shuffled order, each followed by its
value. A query is right when its whole value is predicted greedily (earlier answers are in the
context, as in Zoology's MQAR). With no room for a gap the text is exactly builtin:recall's.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

from ..data.corpora import FILLER, RECALL_KEY_LENGTH, RECALL_SEPARATOR, RECALL_VALUE_DIGITS, recall_pair, recall_table
from .base import Task, check_positive, greedy_hit, map_batches, option, start, task


@dataclass
class MQAROptions:
    pairs: list[int] = option([4, 8, 16], "key-value pairs per sequence")
    lengths: list[int] = option([128, 256, 512], "sequence lengths in tokens (pairs + gap + queries)")
    samples: int = option(8, "sequences per (pairs, length) cell (--limit caps it)")
    key_length: int = option(RECALL_KEY_LENGTH, "letters per key (builtin:recall's default)")
    value_digits: int = option(RECALL_VALUE_DIGITS, "digits per value (builtin:recall's default)")

    def check(self) -> None:
        for name in ("pairs", "lengths", "samples", "key_length", "value_digits"):
            check_positive(f"mqar.{name}", getattr(self, name))
        if max(self.pairs) > len(string.ascii_lowercase) ** self.key_length:
            raise ValueError(f"mqar.pairs {max(self.pairs)}: more than the {len(string.ascii_lowercase) ** self.key_length} "
                             f"distinct keys of {self.key_length} letters")


@dataclass
class MQARExample:
    ids: list[int]
    table: dict[str, str]  # key -> value, in written order
    answers: list[tuple[int, int]]  # [start, end) of each asked value, in asked order


def mqar_example(lm, rng: random.Random, pairs: int, length: int, key_length: int, value_digits: int) -> MQARExample | None:
    """A sequence of exactly `length` tokens; None when the pairs and queries alone are longer."""
    table = recall_table(rng, pairs, key_length, value_digits)
    asked = list(table)
    rng.shuffle(asked)
    written = lm.encode(" ".join(recall_pair(k, v) for k, v in table.items()))
    queries, answers = lm.encode(RECALL_SEPARATOR), []
    for i, k in enumerate(asked):
        queries += lm.encode((" " if i else "") + recall_pair(k, ""))
        answers.append((len(queries), len(queries) + len(value := lm.encode(table[k]))))
        queries += value
    gap = length - len(written) - len(queries)
    if gap < 0:
        return None
    noise = lm.encode(" " + FILLER * (gap // len(FILLER) + 1))[:gap] if gap else []
    offset = len(written) + gap
    return MQARExample(written + noise + queries, table, [(a + offset, b + offset) for a, b in answers])


@task("mqar")
class MQAR(Task):
    Options = MQAROptions

    def examples(self, lm) -> dict[tuple[int, int], list[MQARExample | None]]:
        o = self.options
        return {(p, n): [mqar_example(lm, random.Random(f"{self.seed}/{p}/{n}/{i}"), p, n, o.key_length, o.value_digits)
                         for i in range(self.samples(o.samples))]
                for p in o.pairs for n in o.lengths}

    def run(self, lm, bar=None) -> dict:
        o, cells = self.options, self.examples(lm)
        start(bar, sum(len(v) for v in cells.values() if None not in v))
        acc = {}
        for key, examples in cells.items():
            if None in examples:  # the pairs and queries alone exceed the length
                acc[key] = None
                continue

            def reduce(logits, ids, rows):
                return [sum(bool(greedy_hit(logits[j : j + 1], ids[j : j + 1], a, b)) for a, b in examples[r].answers)  # noqa: B023 - called within this iteration
                        for j, r in enumerate(rows)]

            right = map_batches(lm, [e.ids for e in examples], reduce, self.batch_size, bar)
            acc[key] = sum(right) / (len(examples) * key[0])
        scored = [a for a in acc.values() if a is not None]
        return {"pairs": o.pairs, "lengths": o.lengths,
                "accuracy": [[acc[p, n] for n in o.lengths] for p in o.pairs],
                "mean": sum(scored) / len(scored) if scored else None}

    def summary(self, result: dict) -> dict:
        return {"mqar": result["mean"]}

    def plot(self, results: dict[str, dict], out_dir: Path) -> list[Path]:
        from .report import pyplot, save_figure

        plt = pyplot()
        lengths = next(iter(results.values()))["lengths"]
        fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths) + 0.5, 3.4), squeeze=False, sharey=True)
        for j, (ax, n) in enumerate(zip(axes[0], lengths)):
            for name, r in results.items():
                ys = [row[j] for row in r["accuracy"]]
                ax.plot(r["pairs"], [float("nan") if y is None else y for y in ys], marker="o", label=name)
            ax.set_title(f"length {n}", fontsize=9)
            ax.set_xlabel("key-value pairs")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("query accuracy (exact)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle("multi-query associative recall", fontsize=10)
        return [save_figure(fig, out_dir / "mqar.png")]
