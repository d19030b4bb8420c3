"""Training recipes: the YAML schema of ``train.py``, its overrides and their checks.

A recipe has four sections (the schema of the original TTO configs)::

    dataset:       {name, max_seq_length, ...}        see DatasetSection
    model:         {type: <registered type>, <that type's config fields>,
                    <another type>: {<its fields, used only when type is that type>}}
                   or a pretrained start (see pretrained_section):
                   {from_pretrained: <dir | .gguf file | pkg:PACKAGE/FILE | hub name>,
                    config: {<fields of its config to change on load, e.g. a memory's chunk sizes>},
                    retrofit: {type: <registered type>, layers: last_quarter | [<index>, ...], <its fields>}}
    tokenizer:     builtin:bytes | <local dir> | <.gguf file> | pkg:PACKAGE/FILE | <hub name>
                   (default: the pretrained model's own, else builtin:bytes)
    training_args: <transformers.TrainingArguments fields> + device, project, resume_from_checkpoint,
                   overwrite_output_dir

and optional fine-tuning sections::

    freeze:        [<parameter-name pattern>, ...]     see tto.training.optim
    optimizer:     {param_groups: [{params, lr, weight_decay}, ...]}
    monitor:       {every: N}                          see tto.training.monitor
    curriculum:    [{max_seq_length, max_steps}, ...]  see tto.training.curriculum
    adapter:       {type: lora | tinylora, target_modules: [...], <its peft config's fields>}
                   see tto.adapters (needs model.from_pretrained: the base it adapts)

Everything is checked before any work is done: unknown sections, dataset fields, model fields and
training arguments are errors that name the key and suggest the close match; every value is
converted to the type its class declares and checked against its declared range (:mod:`tto.typed`:
``learning_rate: 3e-3`` is a float, ``model.hidden_size=abc`` is one line naming the expected int).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..cli import MAX_MMAP_THRESHOLD, MMAP_THRESHOLD
from ..config import suggest
from ..data import BYTE_TOKENIZER
from ..typed import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Bound,
    convert,
    convert_fields,
    shown,
)
from .curriculum import Stage, check_steps
from .monitor import MonitorSection
from .optim import OptimizerSection, ParamGroup, parse_freeze

SECTIONS = ("dataset", "model", "tokenizer", "training_args", "freeze", "optimizer", "monitor", "curriculum",
            "adapter")
RECIPE_SHAPE = "a recipe is a mapping with sections " + ", ".join(SECTIONS)
#: training_args names of the original TTO configs that Transformers 5 renamed (a ratio < 1 in
#: warmup_steps is read as a fraction of the training steps)
RENAMED_TRAINING_KEYS = {"warmup_ratio": "warmup_steps", "gradient_checkpointing": "activation_checkpointing"}


@dataclass(kw_only=True)
class RunOptions:
    """The recipe keys in training_args that are not TrainingArguments fields."""

    device: str = "auto"  # auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...
    resume_from_checkpoint: bool | str | None = None  # true: the newest checkpoint in output_dir; or a path
    overwrite_output_dir: bool = False  # allow writing into a non-empty output_dir
    # glibc's mmap threshold in bytes for the run (tto.cli.return_freed_memory): tensors from this size
    # on give their pages back when freed; lower saves memory where fast weights are large, costs speed
    mmap_threshold: int | None = MMAP_THRESHOLD

    bounds: ClassVar[dict[str, Bound]] = {"mmap_threshold": Bound(low=0, high=MAX_MMAP_THRESHOLD)}


#: recipe keys in training_args that are not TrainingArguments fields
EXTRA_TRAINING_KEYS = tuple(f.name for f in fields(RunOptions))

#: ranges of TrainingArguments fields (Transformers declares their types only). max_steps -1 (the
#: default) means "train num_train_epochs"; *_steps below 1 are fractions of the training steps
TRAINING_ARGS_BOUNDS: dict[str, Bound] = {
    "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "eval_accumulation_steps": AT_LEAST_1,
    "max_steps": Bound(low=-1),
    "num_train_epochs": POSITIVE,
    "learning_rate": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_beta1": Bound(low=0, high=1, high_open=True),
    "adam_beta2": Bound(low=0, high=1, high_open=True),
    "adam_epsilon": POSITIVE,
    "warmup_steps": NON_NEGATIVE,
    "logging_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "save_steps": POSITIVE,
    "save_total_limit": AT_LEAST_1,
    "dataloader_num_workers": NON_NEGATIVE,
    "label_smoothing_factor": Bound(low=0, high=1, high_open=True),
    "seed": SEED,
    "data_seed": SEED,
}


@dataclass(kw_only=True)
class DatasetSection:
    name: str = "builtin:pydoc"  # builtin:*, local file/dir/glob, saved dataset dir, or hub name
    max_seq_length: int = 512  # tokens per training block
    split: str = "train"  # split of a hub / saved dataset
    subset: str | None = None  # hub dataset configuration name
    text_field: str = "text"  # column holding the documents (format chat: the key holding each line's conversation)
    # "text": documents; "chat": a .jsonl file of conversations, one a line (see tto.data.chat)
    format: str = "text"
    eval_fraction: float = 0.05  # share of documents held out for evaluation (0: no eval split)
    num_proc: int | None = None  # tokenization processes
    options: dict = field(default_factory=dict)  # arguments of a built-in corpus (e.g. num_documents, seed)
    seed: int = 0  # seed of the held-out split
    max_eval_samples: int | None = None  # evaluate on at most this many held-out blocks (None: all)
    # "all": every token is a target; "answers": only the answer spans a built-in synthetic corpus
    # marks (builtin:recall: the asked values; builtin:passkey: the key after the question) or, with
    # format chat, the assistant turns. None: "answers" with format chat, else "all"
    loss_on: str | None = None
    packing: bool = True  # False: one document per block, right-padded (no document cut or read after another)

    #: ranges of the fields (checked with their types, before any data is read)
    bounds: ClassVar[dict[str, Bound]] = {
        "max_seq_length": AT_LEAST_1,
        "eval_fraction": Bound(low=0, high=1, high_open=True),
        "num_proc": AT_LEAST_1,
        "max_eval_samples": AT_LEAST_1,
        "seed": SEED,
    }

    @property
    def targets(self) -> str:
        """The tokens the loss is on: ``loss_on``, or its default for the format."""
        from ..data.chat import DEFAULT_LOSS_ON

        return self.loss_on or DEFAULT_LOSS_ON[self.format]

    def check(self) -> None:
        """ValueError for a bad format or loss_on, or loss_on=answers on data that marks no answers."""
        from ..data.chat import DEFAULT_LOSS_ON
        from ..data.corpora import MARKED_CORPORA
        from ..data.datasets import LOSS_ON

        if self.format not in DEFAULT_LOSS_ON:
            raise ValueError(f"dataset.format={self.format!r}: valid values are {list(DEFAULT_LOSS_ON)}")
        if self.targets not in LOSS_ON:
            raise ValueError(f"dataset.loss_on={self.loss_on!r}: valid values are {list(LOSS_ON)}")
        if self.targets == "answers" and self.format == "text" and self.name not in MARKED_CORPORA:
            raise ValueError(f"dataset.loss_on=answers needs a corpus that marks its answers, of "
                             f"{sorted(MARKED_CORPORA)}; {self.name!r} does not (use loss_on=all)")


@dataclass(kw_only=True)
class Recipe:
    dataset: DatasetSection
    model: dict[str, Any]
    tokenizer: str = BYTE_TOKENIZER
    training_args: dict[str, Any] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns that do not train
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    monitor: MonitorSection | None = None  # inner-loop statistics every N steps
    curriculum: list[Stage] = field(default_factory=list)  # context-length stages (empty: dataset.max_seq_length)
    adapter: Any = None  # the peft config of the adapter section (None: the whole model trains)


def _section(kind: str, raw, cls):
    """``cls(**raw)`` for a mapping whose keys are `cls`'s fields, each converted to its declared type
    and range; unknown keys fail with a suggestion."""
    if not isinstance(raw, dict):
        raise ValueError(f"{kind}: a mapping with keys {sorted(f.name for f in fields(cls))}, not {shown(raw)}")
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise _unknown(f"{kind} key(s)", unknown, valid)
    missing = [f.name for f in fields(cls) if f.name not in raw and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{kind} needs {missing}")
    return cls(**convert_fields(cls, raw, kind))


def _unknown(kind: str, keys, valid) -> ValueError:
    named = ", ".join(f"{shown(k)}{suggest(str(k), valid)}" for k in keys)
    return ValueError(f"unknown {kind}: {named}; valid: {sorted(valid)}")


def _mapping(name: str, value) -> dict:
    """A recipe section: a mapping with text keys (an empty section is {})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"recipe section {name!r} must be a mapping of names to values, not {shown(value)}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{name}: keys are names, not {shown(bad[0])}")
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` strings (value parsed as YAML) set into the nested dict."""
    if not isinstance(raw, dict):
        raise ValueError(RECIPE_SHAPE)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        path, value = item.split("=", 1)
        node = raw
        *parents, leaf = path.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not YAML ({getattr(err, 'problem', None) or err})") from None
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
            raise ValueError(f"model.{name} holds fields for type {name!r} only: a mapping, not {shown(section)}")
        per_type[name] = convert_fields(tto.get(name).config_class, _mapping(f"model.{name}", section), f"model.{name}")
        tto.build_config(name, **per_type[name])
    own = {k: v for k, v in model.items() if k not in per_type}
    own["type"] = convert("model.type", own["type"], str)
    own = convert_fields(tto.get(own["type"]).config_class, own, "model")
    return {"type": own["type"], **per_type.get(own["type"], {}), **own}


#: keys of a model section that starts from a pretrained model
PRETRAINED_KEYS = ("from_pretrained", "config", "retrofit")


def config_changes(source, changes) -> dict:
    """``model.config`` of a pretrained start: a mapping of `source`'s config fields (a tto config's
    declared fields; another config's attributes), converted and range-checked; ValueError naming an
    unknown field or a changed config that its class refuses (e.g. TNT's local chunks that do not
    divide its shard)."""
    from ..pretrained import changed_config

    if not isinstance(changes, dict):
        raise ValueError(f"model.config={changes!r}: a mapping {{field: value}} of the pretrained model's config")
    names = type(source).field_names() if hasattr(type(source), "field_names") else set(source.to_dict())
    unknown = [k for k in changes if k not in names]
    if unknown:
        raise _unknown("model.config field(s) of the pretrained model", unknown, names)
    changes = convert_fields(type(source), changes, "model.config")
    if hasattr(source, "validate"):
        changed_config(source, changes).validate()
    return changes


def pretrained_section(model: dict) -> dict:
    """Check ``{from_pretrained: spec, config: {<fields>}, retrofit: {type, layers, <fields>}}``: its
    keys, that the spec names a model (its config is read: no weights), the config changes (fields of
    that config, converted and range-checked, and the changed config valid), and the retrofit's
    type, layers and fields against the changed config (:func:`tto.retrofit.retrofit_config`).
    Without ``retrofit`` the pretrained model trains as it is (with its config changes)."""
    from ..pretrained import changed_config, load_pretrained_config
    from ..retrofit import retrofit_config

    unknown = [k for k in model if k not in PRETRAINED_KEYS]
    if unknown:
        raise _unknown("model key(s) beside from_pretrained", unknown, PRETRAINED_KEYS)
    spec = model["from_pretrained"]
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model.from_pretrained={spec!r}: a directory, .gguf file, pkg:PACKAGE/FILE or hub name")
    source = load_pretrained_config(spec)
    if model.get("config") is not None:
        model = {**model, "config": config_changes(source, model["config"])}
        source = changed_config(source, model["config"])
    retro = model.get("retrofit")
    if retro is not None:
        if not isinstance(retro, dict) or "type" not in retro:
            raise ValueError(f"model.retrofit={retro!r}: a mapping {{type: <registered type>, layers: last_quarter | "
                             f"[<index>, ...], <that type's fields>}}")
        retrofit_config(source, **retro)
    return model


def parse_recipe(raw: dict) -> Recipe:
    """Validate a recipe dict (sections, dataset fields, training argument names, model type and fields)."""
    from transformers import TrainingArguments

    import tto

    if not isinstance(raw, dict):
        raise ValueError(RECIPE_SHAPE)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise _unknown("recipe section(s)", unknown, SECTIONS)
    data = _mapping("dataset", raw.get("dataset"))
    unknown = [k for k in data if k not in {f.name for f in fields(DatasetSection)}]
    if unknown:
        raise _unknown("dataset field(s)", unknown, [f.name for f in fields(DatasetSection)])
    data = convert_fields(DatasetSection, data, "dataset")
    args = dict(_mapping("training_args", raw.get("training_args")))
    for old, new in RENAMED_TRAINING_KEYS.items():
        if old in args:
            if new in args:
                raise ValueError(f"training_args sets both {old!r} and its new name {new!r}; keep {new!r}")
            args[new] = args.pop(old)
    valid_args = set(TrainingArguments.__dataclass_fields__) | set(EXTRA_TRAINING_KEYS)
    unknown = [k for k in args if k not in valid_args]
    if unknown:
        raise _unknown("training_args", unknown, valid_args)
    run = {k: v for k, v in args.items() if k in EXTRA_TRAINING_KEYS}  # they take the place of any HF namesake
    hf = {k: v for k, v in args.items() if k not in run}
    args = {**convert_fields(TrainingArguments, hf, "training_args", TRAINING_ARGS_BOUNDS),
            **convert_fields(RunOptions, run, "training_args")}
    model = dict(_mapping("model", raw.get("model")))
    if raw.get("adapter") is not None and ("from_pretrained" not in model or model.get("retrofit") is not None):
        raise ValueError("adapter: needs model.from_pretrained without retrofit, the saved base it adapts (train "
                         "or retrofit a model first, then give its output_dir as model.from_pretrained)")
    if "from_pretrained" in model:
        model = pretrained_section(model)
    else:
        if "type" not in model:
            raise ValueError(f"the model section needs a type (or from_pretrained); registered types: "
                             f"{sorted(tto.available())}")
        model = model_fields(model)
        fields_only = {k: v for k, v in model.items() if k != "type"}
        tto.build_config(model["type"], **fields_only)  # unknown type / field / bad value -> ValueError now
    dataset = DatasetSection(**data)
    dataset.check()
    optimizer = _section("optimizer", raw.get("optimizer") or {}, OptimizerSection)
    groups = optimizer.param_groups if isinstance(optimizer.param_groups, list) else [optimizer.param_groups]
    optimizer.param_groups = [_section("optimizer.param_groups[]", g, ParamGroup) for g in groups]
    stages = raw.get("curriculum") or []
    if not isinstance(stages, list):
        raise ValueError(f"curriculum: a list of stages {{max_seq_length, max_steps}}, not {shown(stages)}")
    curriculum = [_section("curriculum[]", stage, Stage) for stage in stages]
    if curriculum:
        args["max_steps"] = check_steps(curriculum, args)
    tokenizer = convert("tokenizer", raw.get("tokenizer") or model.get("from_pretrained") or BYTE_TOKENIZER, str)
    adapter = None
    if raw.get("adapter") is not None:
        from ..adapters import parse_adapter  # peft is imported by recipes that use it only

        adapter = parse_adapter(raw["adapter"])
    return Recipe(dataset=dataset, model=model, tokenizer=tokenizer,
                  training_args=args, freeze=parse_freeze(raw.get("freeze")), optimizer=optimizer,
                  monitor=None if raw.get("monitor") is None else _section("monitor", raw["monitor"], MonitorSection),
                  curriculum=curriculum, adapter=adapter)


def read_yaml(path: str | Path):
    """The YAML document in `path`; a syntax error or undecodable text is one line naming the file
    and (for syntax) the line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ValueError(f"{path}{where}: invalid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    raw = read_yaml(path)
    return parse_recipe(apply_overrides({} if raw is None else raw, list(overrides)))
