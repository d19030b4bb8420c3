"""The run a recipe describes: output directory checks, data, model, the Hugging Face Trainer, the
final save."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..cli import MMAP_THRESHOLD, resolve_device, return_freed_memory
from .callbacks import Diverged, InnerLRWarmup, StopOnNonFiniteLoss
from .checkpoints import (FINAL_STAGING_DIR, STAGING_DIR, CheckpointingTrainer, StopOnSignal, TrainingInterrupted,
                          fsync, newest_complete_checkpoint, remove_staging, resolve_resume)
from .curriculum import CurriculumTrainer
from .monitor import InnerLoopMonitor
from .optim import freeze, optimizer_cls_and_kwargs
from .recipe import DatasetSection, Recipe


def check_writable(output_dir: Path) -> None:
    """OSError now, not when the trained model is saved, unless `output_dir` can be created and
    written: its nearest existing ancestor must be a directory that ``os.access`` finds writable
    (permissions and read-only mounts). Nothing is created."""
    existing = output_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"output_dir {str(output_dir)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == output_dir.absolute() else f"would be created in {str(existing)!r}, which is"
        raise PermissionError(f"output_dir {str(output_dir)!r} {where} not writable (read-only mount or "
                              f"permissions); pick another training_args.output_dir")


def check_output_dir(output_dir: Path, resume, overwrite: bool) -> None:
    """Refuse to write into a non-empty directory unless resuming or explicitly allowed, and make
    sure there is a complete checkpoint to resume from. What an interrupted save left behind
    (``.staging``, ``.saving``) does not count."""
    entries = [p for p in output_dir.iterdir() if p.name not in (STAGING_DIR, FINAL_STAGING_DIR)] \
        if output_dir.is_dir() else []
    if entries and not (resume or overwrite):
        newest, _ = newest_complete_checkpoint(output_dir)
        how = (f"resume from {newest.name} with training_args.resume_from_checkpoint=true, " if newest else
               "it has no complete checkpoint to resume from; ")
        raise FileExistsError(f"output_dir {str(output_dir)!r} is not empty; {how}allow overwriting with "
                              f"training_args.overwrite_output_dir=true, or pick another dir")
    resolve_resume(output_dir, resume)


def configure_wandb(report_to, project: str | None) -> None:
    """Log offline when wandb is asked for but has no credentials or no network; a recipe's
    ``project`` names the wandb project (the Trainer's wandb callback reads it from WANDB_PROJECT)."""
    wanted = report_to == "wandb" or (isinstance(report_to, (list, tuple)) and "wandb" in report_to)
    if not wanted:
        return
    if project is not None:
        os.environ["WANDB_PROJECT"] = project
    if os.environ.get("WANDB_MODE"):
        return
    from ..data.offline import host_reachable

    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().exists()
    if not has_key or not host_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        os.environ["WANDB_MODE"] = "offline"


def save_atomically(model, tokenizer, output_dir: Path) -> None:
    """Write the final model (or adapter) into a temporary directory, then move each file into place
    (config last), so an interrupted save never leaves a half-written model behind (a kill leaves the
    temporary directory, which the next run ignores and deletes)."""
    from ..adapters import ADAPTER_CONFIG

    tmp = output_dir / FINAL_STAGING_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:  # image models have none
            tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n in ("config.json", ADAPTER_CONFIG))
        for name in names:  # the data reaches the disk before its name, as for checkpoints
            fsync(tmp / name)
            os.replace(tmp / name, output_dir / name)
        fsync(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_documents(ds: DatasetSection):
    """The dataset's documents as ``(train, held_out)`` (held_out None when ``eval_fraction`` is 0);
    with ``format: chat``, conversations (see :func:`tto.data.chat.render_chats`).

    The split depends only on the section (``eval_fraction``, ``seed``), so an evaluation given the same
    dataset section reads exactly the documents training held out.
    """
    from ..data import load_documents

    docs = load_documents(ds.name, split=ds.split, subset=ds.subset, text_field=ds.text_field, options=ds.options,
                          answers=ds.targets == "answers" and ds.format == "text", format=ds.format)
    if ds.eval_fraction <= 0:
        return docs, None
    parts = docs.train_test_split(test_size=ds.eval_fraction, seed=ds.seed)
    return parts["train"], parts["test"]


def run_name(model: dict) -> str:
    """The default output directory name of a model section: its type, ``retrofit_<type>``, or ``pretrained``."""
    if "from_pretrained" not in model:
        return model["type"]
    retro = model.get("retrofit")
    return "pretrained" if retro is None else f"retrofit_{retro['type']}"


def pretrained_model(model: dict, tokenizer):
    """The model of a ``from_pretrained`` section: loaded, then retrofitted when it says so (the new
    mixers' init follows the global seed). ValueError, before any weight is read, when the
    tokenizer has more tokens than the model."""
    from ..pretrained import load_pretrained, load_pretrained_config
    from ..retrofit import retrofit

    vocab = load_pretrained_config(model["from_pretrained"]).vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"model.from_pretrained={model['from_pretrained']!r} has {vocab} token ids, fewer than the "
                         f"tokenizer ({len(tokenizer)}); use the model's own tokenizer")
    loaded = load_pretrained(model["from_pretrained"], model.get("config"))
    return loaded if model.get("retrofit") is None else retrofit(loaded, **model["retrofit"])


def build_trainer(recipe: Recipe, callbacks=()):
    """Everything before the first step: output dir check, tokenizer, data, model, Trainer.

    Returns ``(trainer, resume_from_checkpoint)``. Problems with the recipe or its inputs raise
    ValueError / OSError here, before any training.
    """
    import torch
    from transformers import TrainingArguments, default_data_collator, set_seed

    import tto

    from ..data import load_tokenizer, pack_documents
    from ..data.chat import render_chats

    args = dict(recipe.training_args)
    device = args.pop("device", "auto")
    resolve_device(device, "training_args.device")  # one this machine has, before any work
    resume = args.pop("resume_from_checkpoint", None)
    overwrite = bool(args.pop("overwrite_output_dir", False))
    return_freed_memory(args.pop("mmap_threshold", MMAP_THRESHOLD))
    args.setdefault("output_dir", "runs/" + run_name(recipe.model))
    args.setdefault("report_to", "none")
    args.setdefault("data_seed", args.get("seed", 42))  # else the sampler may draw its seed from the clock
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        args["use_cpu"] = True
    check_writable(Path(args["output_dir"]))
    check_output_dir(Path(args["output_dir"]), resume, overwrite)
    configure_wandb(args["report_to"], args.get("project"))
    try:  # its own checks (strategies, step multiples, optional packages) before any data
        training_args = TrainingArguments(**args)
    except (ImportError, TypeError, ValueError) as err:
        raise ValueError(f"training_args: {' '.join(str(err).split())}") from None

    if "from_pretrained" not in recipe.model and tto.get(recipe.model["type"]).task == "image-classification":
        return build_image_trainer(recipe, training_args, callbacks), resume
    tokenizer = load_tokenizer(recipe.tokenizer)
    if "from_pretrained" in recipe.model:
        set_seed(training_args.seed)  # the new mixers' initial weights depend on the recipe's seed only
        model = pretrained_model(recipe.model, tokenizer)
    else:
        fields_ = {k: v for k, v in recipe.model.items() if k != "type"}
        fields_.setdefault("vocab_size", len(tokenizer))
        if fields_["vocab_size"] < len(tokenizer):
            raise ValueError(f"model.vocab_size={fields_['vocab_size']} is smaller than the tokenizer ({len(tokenizer)})")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            fields_.setdefault(name, getattr(tokenizer, name))
        config = tto.build_config(recipe.model["type"], **fields_)
        set_seed(training_args.seed)  # the initial weights depend on the recipe's seed only
        model = tto.get(recipe.model["type"]).model_class(config)
    freeze(model, recipe.freeze)  # a pattern that matches nothing fails here, before the data is read
    if recipe.adapter is not None:  # only the adapter trains
        from ..adapters import with_adapter

        model = with_adapter(model, recipe.adapter, recipe.model["from_pretrained"])
    optimizer = optimizer_cls_and_kwargs(model, recipe.optimizer, training_args)

    ds = recipe.dataset
    docs, held_out = split_documents(ds)
    if ds.format == "chat":  # conversations -> documents with their assistant spans, in the chat template
        docs = render_chats(docs, tokenizer)
        held_out = None if held_out is None else render_chats(held_out, tokenizer)
    eval_set = None
    if held_out is not None:
        eval_set = pack_documents(held_out, tokenizer, ds.max_seq_length, ds.num_proc, loss_on=ds.targets,
                                  packing=ds.packing)
        if ds.max_eval_samples is not None:
            eval_set = eval_set.select(range(min(ds.max_eval_samples, len(eval_set))))
    lengths = [stage.max_seq_length for stage in recipe.curriculum] or [ds.max_seq_length]
    train_sets = [pack_documents(docs, tokenizer, n, ds.num_proc, loss_on=ds.targets, packing=ds.packing)
                  for n in lengths]
    for n, train_set in zip(lengths, train_sets):
        if len(train_set) == 0:
            raise ValueError(f"dataset {ds.name!r} has fewer than max_seq_length={n} tokens")

    common = dict(model=model, args=training_args, eval_dataset=eval_set if eval_set is not None and len(eval_set) else None,
                  data_collator=default_data_collator, processing_class=tokenizer,
                  callbacks=[StopOnNonFiniteLoss(), InnerLRWarmup(), *callbacks, StopOnSignal()], optimizer_cls_and_kwargs=optimizer)
    if recipe.curriculum:
        trainer = CurriculumTrainer(stages=recipe.curriculum, stage_sets=train_sets, **common)
    else:
        trainer = CheckpointingTrainer(train_dataset=train_sets[0], **common)
    if recipe.monitor is not None:
        trainer.add_callback(InnerLoopMonitor(trainer, recipe.monitor.every))
    return trainer, resume


def top1(prediction) -> dict:
    """``accuracy``: the share of images whose largest logit is their label (Trainer compute_metrics)."""
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def build_image_trainer(recipe: Recipe, training_args, callbacks=()):
    """The Trainer of an image type (``task = "image-classification"``): labelled images
    (:mod:`tto.data.images`, ``dataset.eval_fraction`` of them held out, at most ``max_eval_samples``),
    ``num_labels`` from the data unless the model section sets it, top-1 accuracy (``eval_accuracy``)
    at every evaluation. The text-only sections (curriculum, monitor, adapter) are errors here."""
    from transformers import default_data_collator, set_seed

    import tto

    from ..data.images import load_images

    name = recipe.model["type"]
    for section in ("curriculum", "monitor", "adapter"):
        if getattr(recipe, section):
            raise ValueError(f"{section}: not for image type {name!r} (a whole image is read at once)")
    ds = recipe.dataset
    fields_ = {k: v for k, v in recipe.model.items() if k != "type"}
    shape = tto.build_config(name, **fields_)
    images, classes = load_images(ds.name, split=ds.split, channels=shape.num_channels, size=shape.image_size)
    fields_.setdefault("num_labels", classes)
    if fields_["num_labels"] < classes:
        raise ValueError(f"model.num_labels={fields_['num_labels']} is smaller than the {classes} classes of {ds.name!r}")
    set_seed(training_args.seed)  # the initial weights depend on the recipe's seed only
    model = tto.get(name).model_class(tto.build_config(name, **fields_))
    freeze(model, recipe.freeze)
    eval_set = None
    if ds.eval_fraction > 0:
        parts = images.train_test_split(test_size=ds.eval_fraction, seed=ds.seed)
        images, eval_set = parts["train"], parts["test"]
        if ds.max_eval_samples is not None:
            eval_set = eval_set.select(range(min(ds.max_eval_samples, len(eval_set))))
    return CheckpointingTrainer(model=model, args=training_args, train_dataset=images, eval_dataset=eval_set,
                                data_collator=default_data_collator, compute_metrics=top1,
                                callbacks=[StopOnNonFiniteLoss(), *callbacks, StopOnSignal()],
                                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, recipe.optimizer, training_args))


def run(trainer, resume=None) -> dict:
    """Train, evaluate the final model (unless that was just done) and save it; returns the metrics
    (with ``trainable_parameters``: those not frozen, the adapter's with an adapter).

    A non-finite loss (or a layer's NaN/Inf, with ``check_finite``) raises :class:`Diverged` naming
    the step, before that step's update: nothing is saved, the checkpoints written so far are kept.
    SIGINT / SIGTERM during training saves a checkpoint and raises :class:`TrainingInterrupted`.
    """
    if trainer.is_world_process_zero():
        remove_staging(Path(trainer.args.output_dir))
    stop = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignal)), None)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except FloatingPointError as err:
        raise Diverged.at(trainer.state, err) from err
    finally:  # a run that raised (diverged, a second Ctrl-C) never reaches on_train_end
        if stop is not None:
            stop.restore()
    if stop is not None and stop.received is not None:
        raise TrainingInterrupted(stop.received, Path(trainer.args.output_dir) / f"checkpoint-{result.global_step}")
    metrics = dict(result.metrics)
    metrics["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
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
