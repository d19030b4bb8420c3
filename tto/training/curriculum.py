"""A context-length curriculum in one run: consecutive stages of training blocks of growing length.

Recipe::

    curriculum:
      - {max_seq_length: 256, max_steps: 1000}
      - {max_seq_length: 1024, max_steps: 500}

Stage s trains ``max_steps`` optimizer steps on the documents packed into ``max_seq_length``-token
blocks (each stage packs the same documents, as ``dataset`` describes them); the run's
``max_steps`` is the stages' sum (``training_args.max_steps``, if set, must equal it), and one
Trainer, optimizer and lr schedule span all stages. Evaluation blocks keep
``dataset.max_seq_length``.

Which stage a step belongs to depends on the step count only: the batch sampler
(:class:`StageBatchSampler`) draws step ``t``'s batches from the stage that contains ``t``, in an
order fixed by the data seed. Resuming from a checkpoint (the Trainer skips the batches of the steps
already trained) therefore continues the stage the checkpoint was in, with its block length and the
very batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from .checkpoints import CheckpointingTrainer


@dataclass(kw_only=True)
class Stage:
    """One entry of ``curriculum:``."""

    max_seq_length: int  # tokens per training block in this stage
    max_steps: int  # optimizer steps of this stage

    def __post_init__(self):
        for name in ("max_seq_length", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"curriculum[].{name}={value!r}: a positive integer")


def check_steps(stages: list[Stage], training_args: dict) -> int:
    """The run's max_steps: the stages' sum; ValueError when training_args sets another."""
    total = sum(s.max_steps for s in stages)
    given = training_args.get("max_steps")
    if given is not None and given > 0 and given != total:
        raise ValueError(f"training_args.max_steps={given} but the curriculum's stages add up to {total} steps; "
                         "drop training_args.max_steps (the curriculum sets it) or make them agree")
    return total


class StageBatchSampler(Sampler):
    """Batches of indices into the concatenation of the stages' datasets, ``world_size`` batches per
    micro-step (one per process, in rank order, as accelerate shards them), ``accumulation``
    micro-steps per optimizer step; step ``t`` draws from the stage containing ``t``. Each stage
    walks through random permutations of its blocks (a new one, from ``seed``, when one runs out)."""

    def __init__(self, sizes: list[int], steps: list[int], batch_size: int, accumulation: int, world_size: int,
                 seed: int):
        self.sizes, self.steps = sizes, steps
        self.batch_size, self.accumulation, self.world_size, self.seed = batch_size, accumulation, world_size, seed

    def __len__(self) -> int:
        return sum(self.steps) * self.accumulation * self.world_size

    def __iter__(self):
        offset = 0
        for stage, (size, steps) in enumerate(zip(self.sizes, self.steps)):
            needed = steps * self.accumulation * self.world_size * self.batch_size
            order, generator = [], torch.Generator().manual_seed(self.seed + stage)
            while len(order) < needed:
                order += torch.randperm(size, generator=generator).tolist()
            for lo in range(0, needed, self.batch_size):
                yield [offset + i for i in order[lo:lo + self.batch_size]]
            offset += size


class CurriculumTrainer(CheckpointingTrainer):
    """A Trainer whose training batches follow a curriculum: ``stages`` and their packed datasets."""

    def __init__(self, *args, stages: list[Stage], stage_sets: list, **kwargs):
        super().__init__(*args, train_dataset=ConcatDataset(stage_sets), **kwargs)
        self.stages, self.stage_sets = stages, stage_sets

    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        sampler = StageBatchSampler([len(s) for s in self.stage_sets], [s.max_steps for s in self.stages],
                                    self._train_batch_size, args.gradient_accumulation_steps, args.world_size,
                                    args.data_seed if args.data_seed is not None else args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)
