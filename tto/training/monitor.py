"""The inner-loop monitor: every N optimizer steps, statistics of each memory layer's inner loop,
logged to the run's reporters; a NaN/Inf among them stops the run naming the layer and the step.

Recipe: ``monitor: {every: 50}``. At a monitored step a forward pre-hook on every memory engine
keeps the inputs of the step's first training forward (detached); after the step each engine
replays them without gradients (:meth:`tto.engine.ChunkwiseMemory.inner_stats`) and the monitor
logs, per layer ``i``, ``inner/layer<i>/<stat>``: ``loss_before`` and ``loss_after`` (the inner
loss of each chunk's tokens before and after its update), ``weight_norm``, ``momentum_norm``
(momentum optimizers) and the gate means under the engine's names (``lr_gate``: theta,
``momentum_gate``: eta, ``forget_gate``: alpha, ...). They go through ``trainer.log``: every
``report_to`` reporter (wandb, tensorboard) and ``trainer.state.log_history`` (saved as JSON in
each checkpoint's ``trainer_state.json``). Other steps cost nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map
from transformers import TrainerCallback

from ..engine import ChunkwiseMemory
from .callbacks import Diverged


@dataclass(kw_only=True)
class MonitorSection:
    """The recipe's ``monitor:`` section."""

    every: int  # optimizer steps between two measurements

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every <= 0:
            raise ValueError(f"monitor.every={self.every!r}: a positive number of steps")


def memory_layers(model) -> dict[str, ChunkwiseMemory]:
    """``{label: engine}`` for every memory engine of `model`; the label is ``layer<i>`` (its
    block's index), with the rest of its path when a block holds several."""
    engines = [(name, m) for name, m in model.named_modules() if isinstance(m, ChunkwiseMemory)]
    labels = {}
    for name, engine in engines:
        found = re.search(r"layers\.(\d+)\.", name)
        label = f"layer{found.group(1)}" if found else name
        if any(label == other for other in labels):
            label = f"{label}.{name}"
        labels[label] = engine
    return labels


class InnerLoopMonitor(TrainerCallback):
    """Logs inner-loop statistics every ``every`` steps through ``trainer.log`` and raises
    :class:`~tto.training.callbacks.Diverged` (the step and the layer) when one is NaN/Inf."""

    def __init__(self, trainer, every: int):
        self.trainer, self.every = trainer, every
        self.layers = memory_layers(trainer.model)
        if not self.layers:
            raise ValueError("monitor: this model has no memory layer to monitor (drop the monitor section)")
        self._inputs: dict[str, tuple] = {}
        self._hooks = []

    def _remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._remove()
        self._inputs = {}
        if (state.global_step + 1) % self.every:
            return
        for label, engine in self.layers.items():
            def keep(module, args_, kwargs_, label=label):
                if module.training and label not in self._inputs:  # the step's first micro-batch
                    self._inputs[label] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                                   (args_, kwargs_))
            self._hooks.append(engine.register_forward_pre_hook(keep, with_kwargs=True))

    def on_step_end(self, args, state, control, **kwargs):
        self._remove()
        if not self._inputs:
            return
        logs, bad = {}, None
        for label, (args_, kwargs_) in self._inputs.items():
            for stat, value in self.layers[label].inner_stats(args_, kwargs_).items():
                logs[f"inner/{label}/{stat}"] = value
                if bad is None and not math.isfinite(value):
                    bad = f"{label} inner {stat} is {value}"
        self._inputs = {}
        self.trainer.log(logs)
        if bad is not None:
            raise Diverged(state.global_step, bad)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()
