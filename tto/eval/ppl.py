"""``ppl``: perplexity and bits per byte on held-out blocks of a dataset."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import SourceOptions, Task, check_positive, map_batches, option, start, task, token_nll


@dataclass
class PPLOptions(SourceOptions):
    length: int = option(512, "tokens per block (train.py's max_seq_length)")
    blocks: int = option(1000, "at most this many held-out blocks (--limit caps it)")

    def check(self) -> None:
        super().check()
        check_positive("ppl.length", self.length)
        check_positive("ppl.blocks", self.blocks)


@task("ppl")
class PPL(Task):
    """Mean loss over every predicted token of the held-out blocks (packed as train.py packs them:
    documents joined with EOS); ppl = exp(loss); bpb = total loss in bits / UTF-8 bytes of the
    predicted tokens' text (specials excluded)."""

    Options = PPLOptions

    def __init__(self, options, **kw):
        super().__init__(options, **kw)
        self.texts = options.held_out_texts()

    def blocks(self, lm) -> list[list[int]]:
        from datasets import Dataset

        from ..data import pack_documents

        packed = pack_documents(Dataset.from_dict({"text": self.texts}), lm.tokenizer, self.options.length)
        return packed["input_ids"][: self.samples(self.options.blocks)]

    def run(self, lm, bar=None) -> dict:
        blocks = self.blocks(lm)
        if not blocks:
            raise ValueError(f"ppl: dataset {self.options.dataset!r} holds out fewer than {self.options.length} tokens")
        start(bar, len(blocks))
        sums = map_batches(lm, blocks, lambda logits, ids, rows: token_nll(logits, ids)[:, 1:].sum(1).tolist(),
                           self.batch_size, bar)
        tokens = len(blocks) * (self.options.length - 1)
        nbytes = sum(len(lm.tokenizer.decode(b[1:], skip_special_tokens=True).encode("utf-8")) for b in blocks)
        loss = sum(sums) / tokens
        return {"loss": loss, "ppl": math.exp(loss), "bpb": sum(sums) / math.log(2) / nbytes if nbytes else None,
                "blocks": len(blocks), "tokens": tokens, "bytes": nbytes}

    def summary(self, result: dict) -> dict:
        return {"ppl": result["ppl"], "bpb": result["bpb"]}
