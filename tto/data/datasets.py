"""Documents from anywhere, tokenized and packed into fixed-length blocks.

Sources (``dataset.name``): a built-in corpus (``builtin:*``), local files (txt, json/jsonl,
parquet, csv, arrow; a path, a directory of them or a glob), a directory written by
``Dataset.save_to_disk``, or a hub dataset name. Documents are tokenized in parallel
(``num_proc``, cached by ``datasets``), joined with the EOS token as separator, and cut into
blocks of ``max_seq_length`` tokens, so no position is padding.

Two options change that, for the synthetic tasks (``dataset.loss_on``, ``dataset.packing``):

* ``loss_on="answers"``: only the tokens of the answer spans a corpus marks (see
  ``tto.data.corpora``) are targets; every other label is -100, which the loss ignores. Each
  document is tokenized piece by piece (text before an answer, the answer, ...), so an answer's
  tokens are exactly the tokens of its text, as the evaluation tasks encode them.
* ``packing=False``: one document per block, right-padded to ``max_seq_length`` (padding has
  attention_mask 0 and label -100), so no document is cut or read after another one.
"""

from __future__ import annotations

import glob
from itertools import chain
from pathlib import Path

import datasets
from datasets import Dataset, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from .chat import read_conversations
from .corpora import MARKED_CORPORA, builtin_documents, builtin_marked_documents
from .offline import OFFLINE_HINT, hub_error, hub_reachable, looks_like_hub_id

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _local_files(name: str) -> list[str] | None:
    path = Path(name)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix in FORMATS)
    matches = sorted(glob.glob(name, recursive=True))
    return matches or None


#: values of ``loss_on``: every token is a target, or only the marked answers
LOSS_ON = ("all", "answers")


def load_documents(name: str, *, split: str = "train", subset: str | None = None, text_field: str = "text",
                   options: dict | None = None, answers: bool = False, format: str = "text") -> Dataset:
    """A Dataset with one ``text`` column, from any supported source; with `answers`, also an
    ``answers`` column of [start, end) character spans (built-in corpora that mark them only).
    ``format="chat"``: local .jsonl conversations, one ``messages`` column (see :mod:`tto.data.chat`)."""
    if format == "chat":
        files = _local_files(name)
        if files is None:
            raise FileNotFoundError(f"dataset {name!r}: no such file (format chat reads local .jsonl files)")
        return read_conversations(files, text_field)
    if answers:
        if not name.startswith("builtin:"):
            raise ValueError(f"dataset {name!r}: dataset.loss_on=answers needs a built-in corpus that marks its "
                             f"answers ({', '.join(sorted(MARKED_CORPORA))}); use loss_on=all for other data")
        marked = builtin_marked_documents(name, **(options or {}))
        return Dataset.from_dict({"text": [t for t, _ in marked], "answers": [[list(s) for s in a] for _, a in marked]})
    if name.startswith("builtin:"):
        return Dataset.from_dict({"text": builtin_documents(name, **(options or {}))})
    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    elif (files := _local_files(name)) is not None:
        kinds = {FORMATS.get(Path(f).suffix) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(f"dataset {name!r}: files must share one format of {sorted(FORMATS)}, got {files[:5]}")
        ds = _read_files(name, kinds.pop(), files)
    elif not looks_like_hub_id(name) or Path(name).suffix in FORMATS or Path(Path(name).parts[0]).is_dir():
        # a path (its first part a local directory, e.g. data/nope) is not taken for a hub name
        raise FileNotFoundError(f"dataset {name!r}: no such file or directory, and no file matches it as a glob")
    else:
        hub_reachable()
        try:
            ds = load_dataset(name, subset, split=split)
        except (ConnectionError, OSError, FileNotFoundError) as err:
            if not hub_reachable():  # say first that it is not a local path either
                raise FileNotFoundError(f"dataset {name!r}: no such file or directory, and not a cached hub dataset "
                                        f"(the Hugging Face hub is not reachable from here); {OFFLINE_HINT}") from None
            raise hub_error("dataset", name, err) from None
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds.select_columns(["text"])


def _read_files(name: str, kind: str, files: list[str]) -> Dataset:
    """Local `files` of one format; an empty or unreadable file is a ValueError naming it."""
    readable = [f for f in files if Path(f).stat().st_size > 0]
    if not readable:
        raise ValueError(f"dataset {name!r}: {'the file is' if len(files) == 1 else f'all {len(files)} files are'} "
                         "empty; it needs documents")
    try:
        return load_dataset(kind, data_files=readable, split="train")
    except DatasetGenerationError as err:
        cause = str(err.__cause__ or err).splitlines()[0]
        raise ValueError(f"dataset {name!r}: cannot read it as {kind}: {cause}") from None


def answer_pieces(text: str, spans: list) -> list[tuple[str, bool]]:
    """`text` cut at the answer `spans` ([start, end) characters) into (piece, is_answer) pieces.
    ValueError unless the spans are in order, do not overlap, are not empty and lie inside the text."""
    pieces, at = [], 0
    for span in spans:
        start, end = span
        if not at <= start < end <= len(text):
            raise ValueError(f"answer spans {spans} of a document of {len(text)} characters must be non-empty, "
                             f"in order, not overlapping and inside the text; {[start, end]} is not")
        pieces += [(text[at:start], False), (text[start:end], True)]
        at = end
    return [(p, a) for p, a in pieces + [(text[at:], False)] if p]


def pack_documents(ds: Dataset, tokenizer, max_seq_length: int, num_proc: int | None = None, *,
                   loss_on: str = "all", packing: bool = True) -> Dataset:
    """Tokenize, join with EOS and cut into ``max_seq_length`` blocks of {input_ids, labels}.

    ``loss_on="answers"`` (`ds` needs an ``answers`` column, see :func:`load_documents`): labels are
    -100 except on the tokens of the answer spans. ``packing=False``: one document (and its EOS) per
    block, right-padded, with an ``attention_mask``; a longer document is an error.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}: valid values are {list(LOSS_ON)}")
    if loss_on == "answers" and "answers" not in ds.column_names:
        raise ValueError("loss_on=answers needs documents with an 'answers' column of [start, end) character spans "
                         f"(built-in corpora that mark them: {', '.join(sorted(MARKED_CORPORA))})")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if not packing and pad is None:
        raise ValueError("packing=False pads each document: the tokenizer needs a pad token")

    def tokenize(batch):
        if loss_on == "all":
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"ids": [doc + [eos] for doc in ids], "targets": [doc + [eos] for doc in ids]}
        out = {"ids": [], "targets": []}
        for text, spans in zip(batch["text"], batch["answers"]):
            pieces = answer_pieces(text, spans)
            encoded = tokenizer([p for p, _ in pieces], add_special_tokens=False)["input_ids"]
            ids = list(chain.from_iterable(encoded)) + [eos]
            targets = [t if answer else -100 for (_, answer), piece in zip(pieces, encoded) for t in piece] + [-100]
            out["ids"].append(ids)
            out["targets"].append(targets)
        return out

    def pack(batch):
        flat = list(chain.from_iterable(batch["ids"]))
        targets = list(chain.from_iterable(batch["targets"]))
        usable = len(flat) // max_seq_length * max_seq_length
        cuts = range(0, usable, max_seq_length)
        return {"input_ids": [flat[i : i + max_seq_length] for i in cuts],
                "labels": [targets[i : i + max_seq_length] for i in cuts]}

    def pad_each(batch):
        longest = max(map(len, batch["ids"]), default=0)
        if longest > max_seq_length:
            raise ValueError(f"packing=False: a document of {longest} tokens (with its EOS) is longer than "
                             f"max_seq_length={max_seq_length}; raise max_seq_length or shorten the documents")
        fill = [max_seq_length - len(ids) for ids in batch["ids"]]
        return {"input_ids": [ids + [pad] * n for ids, n in zip(batch["ids"], fill)],
                "labels": [t + [-100] * n for t, n in zip(batch["targets"], fill)],
                "attention_mask": [[1] * len(ids) + [0] * n for ids, n in zip(batch["ids"], fill)]}

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                       desc="tokenizing")
    if not packing:
        return tokenized.map(pad_each, batched=True, remove_columns=["ids", "targets"], num_proc=num_proc,
                             desc=f"padding to {max_seq_length} tokens")
    # pack in large batches so few tokens are lost at batch ends
    return tokenized.map(pack, batched=True, batch_size=1000, remove_columns=["ids", "targets"], num_proc=num_proc,
                         desc=f"packing into {max_seq_length}-token blocks")
