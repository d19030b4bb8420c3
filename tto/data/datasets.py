"""Documents from anywhere, tokenized and packed into fixed-length blocks.

Sources (``dataset.name``): a built-in corpus (``builtin:*``), local files (txt, json/jsonl,
parquet, csv, arrow; a path, a directory of them or a glob), a directory written by
``Dataset.save_to_disk``, or a hub dataset name. Documents are tokenized in parallel
(``num_proc``, cached by ``datasets``), joined with the EOS token as separator, and cut into
blocks of ``max_seq_length`` tokens, so no position is padding.
"""

from __future__ import annotations

import glob
from itertools import chain
from pathlib import Path

import datasets
from datasets import Dataset, load_dataset, load_from_disk

from .corpora import builtin_documents
from .offline import hub_error, hub_reachable, looks_like_hub_id

FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _local_files(name: str) -> list[str] | None:
    path = Path(name)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix in FORMATS)
    matches = sorted(glob.glob(name, recursive=True))
    return matches or None


def load_documents(name: str, *, split: str = "train", subset: str | None = None, text_field: str = "text",
                   options: dict | None = None) -> Dataset:
    """A Dataset with one ``text`` column, from any supported source."""
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
        ds = load_dataset(kinds.pop(), data_files=files, split="train")
    elif not looks_like_hub_id(name) or Path(name).suffix in FORMATS:
        raise FileNotFoundError(f"dataset {name!r}: no such file or directory, and no file matches it as a glob")
    else:
        hub_reachable()
        try:
            ds = load_dataset(name, subset, split=split)
        except (ConnectionError, OSError, FileNotFoundError) as err:
            raise hub_error("dataset", name, err) from None
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds.select_columns(["text"])


def pack_documents(ds: Dataset, tokenizer, max_seq_length: int, num_proc: int | None = None) -> Dataset:
    """Tokenize, join with EOS and cut into ``max_seq_length`` blocks of {input_ids, labels}."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    def pack(batch):
        flat = list(chain.from_iterable(batch["ids"]))
        usable = len(flat) // max_seq_length * max_seq_length
        blocks = [flat[i : i + max_seq_length] for i in range(0, usable, max_seq_length)]
        return {"input_ids": blocks, "labels": blocks}

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                       desc="tokenizing")
    # pack in large batches so few tokens are lost at batch ends
    return tokenized.map(pack, batched=True, batch_size=1000, remove_columns=["ids"], num_proc=num_proc,
                         desc=f"packing into {max_seq_length}-token blocks")
