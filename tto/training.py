"""Training recipes: the YAML schema of ``train.py`` and the run it describes.

A recipe has four sections (the schema of the original TTO configs)::

    dataset:       {name, max_seq_length, ...}        see DatasetSection
    model:         {type: <registered type>, <that type's config fields>,
                    <another type>: {<its fields, used only when type is that type>}}
    tokenizer:     builtin:bytes | <local dir> | <hub name>
    training_args: <transformers.TrainingArguments fields> + device, project, resume_from_checkpoint,
                   overwrite_output_dir

Everything is checked before any work is done: unknown sections, dataset fields, model fields and
training arguments are errors that name the key and suggest the close match.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .config import suggest

SECTIONS = ("dataset", "model", "tokenizer", "training_args")
#: recipe keys in training_args that are not TrainingArguments fields
EXTRA_TRAINING_KEYS = ("device", "resume_from_checkpoint", "overwrite_output_dir")
#: training_args names of the original TTO configs that Transformers 5 renamed (a ratio < 1 in
#: warmup_steps is read as a fraction of the training steps)
RENAMED_TRAINING_KEYS = {"warmup_ratio": "warmup_steps", "gradient_checkpointing": "activation_checkpointing"}


@dataclass(kw_only=True)
class DatasetSection:
    name: str = "builtin:pydoc"  # builtin:*, local file/dir/glob, saved dataset dir, or hub name
    max_seq_length: int = 512  # tokens per training block
    split: str = "train"  # split of a hub / saved dataset
    subset: str | None = None  # hub dataset configuration name
    text_field: str = "text"  # column holding the documents
    eval_fraction: float = 0.05  # share of documents held out for evaluation (0: no eval split)
    num_proc: int | None = None  # tokenization processes
    options: dict = field(default_factory=dict)  # arguments of a built-in corpus (e.g. num_documents, seed)
    seed: int = 0  # seed of the held-out split
    max_eval_samples: int | None = None  # evaluate on at most this many held-out blocks (None: all)
    # "all": every token is a target; "answers": only the answer spans a built-in synthetic corpus
    # marks (builtin:recall: the asked values; builtin:passkey: the key after the question)
    loss_on: str = "all"
    packing: bool = True  # False: one document per block, right-padded (no document cut or read after another)

    def check(self) -> None:
        """ValueError for a bad loss_on, or loss_on=answers on data that marks no answers."""
        from .data.corpora import MARKED_CORPORA
        from .data.datasets import LOSS_ON

        if self.loss_on not in LOSS_ON:
            raise ValueError(f"dataset.loss_on={self.loss_on!r}: valid values are {list(LOSS_ON)}")
        if self.loss_on == "answers" and self.name not in MARKED_CORPORA:
            raise ValueError(f"dataset.loss_on=answers needs a corpus that marks its answers, of "
                             f"{sorted(MARKED_CORPORA)}; {self.name!r} does not (use loss_on=all)")


@dataclass(kw_only=True)
class Recipe:
    dataset: DatasetSection
    model: dict[str, Any]
    tokenizer: str = "builtin:bytes"
    training_args: dict[str, Any] = field(default_factory=dict)


def _unknown(kind: str, keys, valid) -> ValueError:
    lines = "".join(f"\n  {k!r}{suggest(k, valid)}" for k in keys)
    return ValueError(f"unknown {kind}:{lines}\nvalid: {sorted(valid)}")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings (value parsed as YAML) set into the nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        path, value = item.split("=", 1)
        node = raw
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        parsed = yaml.safe_load(value)
        # YAML 1.1 reads yes/no/on/off as booleans; on the command line they are words ("eval_strategy=no")
        node[leaf] = value if isinstance(parsed, bool) and value.lower() not in ("true", "false") else parsed
    return raw


def model_fields(model: dict) -> dict:
    """The model section for its type. A key that names a registered type holds fields for that type
    only (``titans: {mem_max_lr: 0.01}``: a recipe shared by every type sets what one type needs);
    they are merged when ``type`` is that type, under the section's own fields (so a command-line
    ``model.<field>=`` still wins), and dropped otherwise. Each such section is checked against its
    type's config whatever the chosen type, so a misspelled field fails with any type."""
    import tto

    per_type = {k: v for k, v in model.items() if k in tto.available()}
    for name, section in per_type.items():
        if not isinstance(section, dict):
            raise ValueError(f"model.{name} holds fields for type {name!r} only: a mapping, not {section!r}")
        tto.build_config(name, **section)
    own = {k: v for k, v in model.items() if k not in per_type}
    return {"type": own["type"], **per_type.get(own["type"], {}), **own}


def parse_recipe(raw: dict) -> Recipe:
    """Validate a recipe dict (sections, dataset fields, training argument names, model type and fields)."""
    import tto
    from transformers import TrainingArguments

    if not isinstance(raw, dict):
        raise ValueError("a recipe is a mapping with sections " + ", ".join(SECTIONS))
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise _unknown("recipe section(s)", unknown, SECTIONS)
    data = raw.get("dataset") or {}
    unknown = [k for k in data if k not in {f.name for f in fields(DatasetSection)}]
    if unknown:
        raise _unknown("dataset field(s)", unknown, [f.name for f in fields(DatasetSection)])
    args = dict(raw.get("training_args") or {})
    for old, new in RENAMED_TRAINING_KEYS.items():
        if old in args:
            if new in args:
                raise ValueError(f"training_args sets both {old!r} and its new name {new!r}; keep {new!r}")
            args[new] = args.pop(old)
    valid_args = set(TrainingArguments.__dataclass_fields__) | set(EXTRA_TRAINING_KEYS)
    unknown = [k for k in args if k not in valid_args]
    if unknown:
        raise _unknown("training_args", unknown, valid_args)
    model = dict(raw.get("model") or {})
    if "type" not in model:
        raise ValueError(f"the model section needs a type; registered types: {sorted(tto.available())}")
    model = model_fields(model)
    fields_only = {k: v for k, v in model.items() if k != "type"}
    tto.build_config(model["type"], **fields_only)  # unknown type / field / bad value -> ValueError now
    dataset = DatasetSection(**data)
    dataset.check()
    return Recipe(dataset=dataset, model=model, tokenizer=raw.get("tokenizer") or "builtin:bytes",
                  training_args=args)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return parse_recipe(apply_overrides(raw, list(overrides)))


def check_output_dir(output_dir: Path, resume, overwrite: bool) -> None:
    """Refuse to write into a non-empty directory unless resuming or explicitly allowed, and make
    sure there is a checkpoint to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    if output_dir.exists() and any(output_dir.iterdir()) and not (resume or overwrite):
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} is not empty; resume with training_args.resume_from_checkpoint=true "
            f"(or a checkpoint path), allow it with training_args.overwrite_output_dir=true, or pick another dir"
        )
    if resume is True and not (output_dir.is_dir() and get_last_checkpoint(str(output_dir))):
        raise FileNotFoundError(f"resume_from_checkpoint=true, but output_dir {str(output_dir)!r} has no checkpoint-*")
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={resume!r}: no such checkpoint directory")


def configure_wandb(report_to) -> None:
    """Log offline when wandb is asked for but has no credentials or no network."""
    wanted = report_to == "wandb" or (isinstance(report_to, (list, tuple)) and "wandb" in report_to)
    if not wanted or os.environ.get("WANDB_MODE"):
        return
    from .data.offline import host_reachable

    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
    if not has_key or not host_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        os.environ["WANDB_MODE"] = "offline"


def save_atomically(model, tokenizer, output_dir: Path) -> None:
    """Write the final model into a temporary directory, then move each file into place
    (config last), so an interrupted save never leaves a half-written model behind."""
    tmp = output_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for name in names:
        os.replace(tmp / name, output_dir / name)
    tmp.rmdir()


def split_documents(ds: DatasetSection):
    """The dataset's documents as ``(train, held_out)`` (held_out None when ``eval_fraction`` is 0).

    The split depends only on the section (``eval_fraction``, ``seed``), so an evaluation given the same
    dataset section reads exactly the documents training held out.
    """
    from .data import load_documents

    docs = load_documents(ds.name, split=ds.split, subset=ds.subset, text_field=ds.text_field, options=ds.options,
                          answers=ds.loss_on == "answers")
    if ds.eval_fraction <= 0:
        return docs, None
    parts = docs.train_test_split(test_size=ds.eval_fraction, seed=ds.seed)
    return parts["train"], parts["test"]


def build_trainer(recipe: Recipe, callbacks=()):
    """Everything before the first step: output dir check, tokenizer, data, model, Trainer.

    Returns ``(trainer, resume_from_checkpoint)``. Problems with the recipe or its inputs raise
    ValueError / OSError here, before any training.
    """
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    import tto

    from .data import load_tokenizer, pack_documents

    args = dict(recipe.training_args)
    device = args.pop("device", "auto")
    resume = args.pop("resume_from_checkpoint", None)
    overwrite = bool(args.pop("overwrite_output_dir", False))
    args.setdefault("output_dir", "runs/" + recipe.model["type"])
    args.setdefault("report_to", "none")
    args.setdefault("data_seed", args.get("seed", 42))  # else the sampler may draw its seed from the clock
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        args["use_cpu"] = True
    check_output_dir(Path(args["output_dir"]), resume, overwrite)
    configure_wandb(args["report_to"])

    tokenizer = load_tokenizer(recipe.tokenizer)
    fields_ = {k: v for k, v in recipe.model.items() if k != "type"}
    fields_.setdefault("vocab_size", len(tokenizer))
    if fields_["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.vocab_size={fields_['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        fields_.setdefault(name, getattr(tokenizer, name))
    config = tto.build_config(recipe.model["type"], **fields_)

    ds = recipe.dataset
    docs, held_out = split_documents(ds)
    eval_set = None
    if held_out is not None:
        eval_set = pack_documents(held_out, tokenizer, ds.max_seq_length, ds.num_proc, loss_on=ds.loss_on,
                                  packing=ds.packing)
        if ds.max_eval_samples is not None:
            eval_set = eval_set.select(range(min(ds.max_eval_samples, len(eval_set))))
    train_set = pack_documents(docs, tokenizer, ds.max_seq_length, ds.num_proc, loss_on=ds.loss_on,
                               packing=ds.packing)
    if len(train_set) == 0:
        raise ValueError(f"dataset {ds.name!r} has fewer than max_seq_length={ds.max_seq_length} tokens")

    training_args = TrainingArguments(**args)
    set_seed(training_args.seed)  # the initial weights depend on the recipe's seed only
    model = tto.get(recipe.model["type"]).model_class(config)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      eval_dataset=eval_set if eval_set is not None and len(eval_set) else None,
                      data_collator=default_data_collator, processing_class=tokenizer, callbacks=list(callbacks))
    return trainer, resume


def run(trainer, resume=None) -> dict:
    """Train, evaluate the final model (unless that was just done) and save it; returns the metrics."""
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        if last is None or last["step"] != trainer.state.global_step:
            last = trainer.evaluate()
        metrics.update({k: v for k, v in last.items() if k.startswith("eval_")})
    if trainer.is_world_process_zero():
        output_dir = Path(trainer.args.output_dir)
        save_atomically(trainer.model, trainer.processing_class, output_dir)
        (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def train(recipe: Recipe, callbacks=()) -> dict:
    """Run a recipe with the HF Trainer; returns the final metrics."""
    return run(*build_trainer(recipe, callbacks))
