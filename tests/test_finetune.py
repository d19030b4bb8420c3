"""Fine-tuning tools as Trainer features: parameter groups and freezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tto.training import build_trainer, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(tmp_path: Path, *overrides: str, name: str = "ttt"):
    return load_recipe(TINY / f"{name}.yml", [f"training_args.output_dir={tmp_path / 'out'}",
                                               *overrides])


MEMORY_GROUP = "optimizer.param_groups=[{params: '*.memory.*', lr: 1.0e-4, weight_decay: 0.0}, " \
               "{params: ['*.q_proj.*', '*.k_proj.*'], lr: 2.0e-5}]"


def test_param_groups_get_their_learning_rates_and_weight_decay(tmp_path):
    trainer, _ = build_trainer(tiny_recipe(tmp_path, MEMORY_GROUP, "training_args.weight_decay=0.1"))
    model = trainer.model
    optimizer = trainer.create_optimizer()
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = by_id[id(p)]
        if ".memory." in name:
            assert (group["name"], group["lr"], group["weight_decay"]) == ("*.memory.*", 1e-4, 0.0), name
        elif ".q_proj." in name or ".k_proj." in name:
            # no weight_decay in the group: the Trainer's (these are weights, so decayed)
            assert (group["name"], group["lr"], group["weight_decay"]) == ("*.q_proj.*|*.k_proj.*", 2e-5, 0.1), name
        else:
            assert group["name"] == "default" and group["lr"] == 0.003, name
            assert group["weight_decay"] == (0.0 if "norm" in name or "bias" in name else 0.1), name
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.param_groups[0]["name"] == "default"  # the lr the Trainer logs


class GroupLRs(TrainerCallback):
    """Records each optimizer group's lr after every step."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})


def test_scheduler_scales_every_group_alike(tmp_path):
    record = GroupLRs()
    trainer, _ = build_trainer(tiny_recipe(tmp_path, MEMORY_GROUP, "training_args.max_steps=4",
                                           "training_args.warmup_steps=2", "training_args.eval_strategy=no"),
                               callbacks=[record])
    trainer.train()
    base = {"default": 0.003, "*.memory.*": 1e-4, "*.q_proj.*|*.k_proj.*": 2e-5}
    # the linear schedule with 2 warm-up steps of 4, after steps 1..4: 1/2, 2/2, then (4 - s) / (4 - 2)
    for lrs, factor in zip(record.seen, [0.5, 1.0, 0.5, 0.0], strict=True):
        assert lrs == pytest.approx({name: factor * lr for name, lr in base.items()})


def test_frozen_parameters_get_no_gradients_and_do_not_change(tmp_path):
    recipe = tiny_recipe(tmp_path, "freeze=['model.embed_tokens.*', '*.mlp.*', 'model.layers.0.*']",
                         "training_args.max_steps=3", "training_args.eval_strategy=no", "training_args.weight_decay=0.1")
    trainer, _ = build_trainer(recipe)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n in before if n.startswith(("model.embed_tokens.", "model.layers.0.")) or ".mlp." in n}
    assert frozen and {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    grads = {}
    hooks = [p.register_hook(lambda g, n=n: grads.__setitem__(n, g)) for n, p in model.named_parameters()
             if p.requires_grad]
    trainer.train()
    for h in hooks:
        h.remove()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, before[name]), name
        else:
            assert name in grads and not torch.equal(p, before[name]), name


def test_freeze_and_group_patterns_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"freeze pattern '\*.memroy.\*' matches no parameter"):
        build_trainer(tiny_recipe(tmp_path, "freeze=['*.memroy.*']"))
    with pytest.raises(ValueError, match=r"optimizer.param_groups pattern 'model.layer.\*' matches no parameter"):
        build_trainer(tiny_recipe(tmp_path, "optimizer.param_groups=[{params: 'model.layer.*'}]"))
    with pytest.raises(ValueError, match=r"every parameter it matches is frozen or belongs to an earlier group"):
        build_trainer(tiny_recipe(tmp_path, "freeze=['*.memory.*']", "optimizer.param_groups=[{params: '*.fast.*'}]"))
    assert not (tmp_path / "out").exists()  # nothing written
    base = {"model": {"type": "ttt"}}
    cases = [({**base, "optimizer": {"param_group": []}}, "'param_group' \\(did you mean 'param_groups'\\?\\)"),
             ({**base, "optimizer": {"param_groups": [{"params": "*", "weight_decy": 1}]}}, "did you mean 'weight_decay'"),
             ({**base, "optimizer": {"param_groups": [{"lr": 1.0}]}}, "needs \\['params'\\]"),
             ({**base, "optimizer": {"param_groups": [{"params": "*", "lr": -1}]}}, "lr=-1: a number >= 0"),
             ({**base, "freeze": [3]}, "freeze: a name pattern or a list of name patterns"),
             ({**base, "frezee": ["*"]}, "did you mean 'freeze'")]
    for raw, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_recipe(raw)
