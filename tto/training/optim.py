"""Which parameters train, and with which learning rate and weight decay: the recipe's ``freeze``
and ``optimizer.param_groups``, chosen by parameter-name patterns.

Patterns are shell-style (:mod:`fnmatch`: ``*`` matches any run of characters, dots included) and
are matched against the names of ``model.named_parameters()`` (tied aliases included, so
``lm_head.*`` names the embedding when the two are tied)::

    freeze: ["model.embed_tokens.*", "model.layers.[0-5].*"]     # or ["*", "!*.mixer.*"]: all but the mixers
    optimizer:
      param_groups:
        - {params: "*.memory.*", lr: 1.0e-4, weight_decay: 0.0}
        - {params: ["*.q_proj.*", "*.k_proj.*"], lr: 2.0e-5}

- ``freeze``: matching parameters get ``requires_grad = False``: no gradient, no optimizer state,
  unchanged by training. Patterns apply in order, and ``!pattern`` exempts what it matches from
  the patterns before it (``["*", "!*.mixer.*"]``: everything but the mixers).
- ``param_groups``: each trainable parameter joins the *first* group with a pattern that matches
  it. A group's ``lr`` defaults to ``training_args.learning_rate``; without ``weight_decay`` it
  follows the Trainer's rule (``training_args.weight_decay``, none on biases and norms). Trainable
  parameters matched by no group train as they would without groups. The Trainer's scheduler
  scales every group's lr alike (warm-up, decay); the ``learning_rate`` the Trainer logs is that of
  the ungrouped parameters (the optimizer's first group).

A pattern that matches no parameter is an error naming it, raised before training starts; so is a
group left with no parameter (every match frozen or taken by an earlier group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import ClassVar

from torch import nn

from ..config import suggest
from ..typed import NON_NEGATIVE, Bound


def _patterns(value, where: str) -> list[str]:
    """A pattern or a list of patterns, as a list of non-empty strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
        raise ValueError(f"{where}: a name pattern or a list of name patterns, not {value!r}")
    return items


@dataclass(kw_only=True)
class ParamGroup:
    """One entry of ``optimizer.param_groups``."""

    params: str | list[str]  # name pattern(s) of the group's parameters
    lr: float | None = None  # learning rate (None: training_args.learning_rate)
    weight_decay: float | None = None  # weight decay (None: the Trainer's, none on biases and norms)

    #: ranges of the fields, checked with their types when a recipe is read (tto.typed)
    bounds: ClassVar[dict[str, Bound]] = {"lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE}

    def __post_init__(self):
        self.params = _patterns(self.params, "optimizer.param_groups[].params")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"optimizer.param_groups[].{name}={value!r}: a number >= 0")


@dataclass(kw_only=True)
class OptimizerSection:
    """The recipe's ``optimizer:`` section (the optimizer itself is ``training_args.optim``)."""

    param_groups: list[ParamGroup] = field(default_factory=list)


def parse_freeze(value) -> list[str]:
    """The recipe's ``freeze:`` value (a pattern or a list of patterns; None: nothing frozen)."""
    return [] if value is None else _patterns(value, "freeze")


def _names(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _no_match(kind: str, pattern: str, names) -> ValueError:
    names = sorted(names)
    close = suggest(pattern, names)
    sample = ", ".join(names[: min(len(names), 4)])
    return ValueError(f"{kind} pattern {pattern!r} matches no parameter{close}; names look like: {sample}, ...")


def matching(pattern: str, names) -> list[str]:
    """The names `pattern` matches (fnmatch, case-sensitive)."""
    return [n for n in names if fnmatchcase(n, pattern)]


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set ``requires_grad = False`` on every parameter the patterns select; returns their names.

    Patterns apply in order; ``!pattern`` takes its matches back out of the selection so far, so
    ``["*", "!*.mixer.*"]`` freezes all but the mixers. ValueError naming a pattern that matches
    nothing (before anything is changed)."""
    params = _names(model)
    chosen: dict[str, None] = {}  # insertion-ordered set
    for pattern in patterns:
        keep = pattern.startswith("!")
        found = matching(pattern[1:] if keep else pattern, params)
        if not found:
            raise _no_match("freeze", pattern, params)
        for name in found:
            if keep:
                chosen.pop(name, None)
            else:
                chosen[name] = None
    for name in chosen:
        params[name].requires_grad_(False)
    # a tied parameter is frozen through any of its names: keep the names that share it in step
    frozen = {id(params[n]) for n in chosen}
    return [n for n, p in params.items() if id(p) in frozen]


def param_groups(model: nn.Module, groups: list[ParamGroup], lr: float, weight_decay: float,
                 decayed: set[str]) -> list[dict]:
    """torch optimizer param groups: the ungrouped trainable parameters first (``lr``, decay
    ``weight_decay`` on the `decayed` names only), then each recipe group (first match wins).
    Every torch group carries ``name`` (``"default"`` or the group's patterns joined by ``|``)."""
    params = _names(model)
    decay_ids = {id(p) for n, p in model.named_parameters() if n in decayed}
    taken: set[int] = set()
    members: list[list[tuple[str, nn.Parameter]]] = []
    for group in groups:
        mine = []
        for pattern in group.params:
            found = matching(pattern, params)
            if not found:
                raise _no_match("optimizer.param_groups", pattern, params)
            for name in found:
                p = params[name]
                if p.requires_grad and id(p) not in taken:
                    taken.add(id(p))
                    mine.append((name, p))
        if not mine:
            raise ValueError(f"optimizer.param_groups {group.params}: every parameter it matches is frozen "
                             "or belongs to an earlier group")
        members.append(mine)

    def split(name: str, members_, group_lr: float, decay: float | None) -> list[dict]:
        if decay is not None:
            return [{"name": name, "params": [p for _, p in members_], "lr": group_lr, "weight_decay": decay}]
        parts = [[p for _, p in members_ if id(p) not in decay_ids], [p for _, p in members_ if id(p) in decay_ids]]
        return [{"name": name, "params": ps, "lr": group_lr, "weight_decay": wd}
                for ps, wd in zip(parts, (0.0, weight_decay)) if ps]

    seen: set[int] = set()
    rest = []
    for n, p in params.items():
        if p.requires_grad and id(p) not in taken and id(p) not in seen:
            seen.add(id(p))
            rest.append((n, p))
    out = split("default", rest, lr, None) if rest else []
    for group, mine in zip(groups, members):
        out += split("|".join(group.params), mine, lr if group.lr is None else group.lr, group.weight_decay)
    return out


def optimizer_cls_and_kwargs(model: nn.Module, section: OptimizerSection, args) -> tuple | None:
    """``Trainer(optimizer_cls_and_kwargs=...)`` for the recipe's groups: the optimizer
    ``training_args.optim`` names, over :func:`param_groups` (None when there are no groups)."""
    from transformers import Trainer

    if not section.param_groups:
        return None
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    decayed = set(Trainer.get_decay_parameter_names(None, model))  # a method that does not use its trainer
    groups = param_groups(model, section.param_groups, args.learning_rate, args.weight_decay, decayed)
    return cls, {**kwargs, "params": groups}
