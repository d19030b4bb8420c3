"""Checkpoints: a kill at any point of a save loses nothing, Ctrl-C saves and says how to resume.

Training runs here are forked processes of this test process (train.py's main on configs/tiny/ttt.yml,
no fresh interpreter start per run), killed with real signals."""

from __future__ import annotations

import gc
import importlib.util
import io
import json
import os
import shlex
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerState

import tto.training
from tto.training import newest_complete_checkpoint
from tto.training.checkpoints import CheckpointingTrainer, is_complete

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
#: 12 steps with a checkpoint every 2 (at most 2 kept: rotation deletes), every loss logged, no eval, on
#: 300 short documents (tokenized in each process: pydoc's take seconds)
RUN = ["dataset.name=builtin:recall", "dataset.options.num_documents=300", "training_args.max_steps=12",
       "training_args.save_strategy=steps", "training_args.save_steps=2", "training_args.save_total_limit=2",
       "training_args.logging_steps=1", "dataset.eval_fraction=0"]
RESUME = "training_args.resume_from_checkpoint=true"



def _train_main():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class SavePoints:
    """In a training process: each file-writing call of a save (``checkpoint``: the Trainer's
    ``_save_checkpoint``; ``final``: ``save_atomically``) is a kill point, named and recorded in
    ``points``. ``kill=(scope, n)`` SIGKILLs the process at the n-th point of the first such save:
    before the call, or, for a file writer, with half of its bytes written."""

    def __init__(self, kill=None):
        self.kill, self.scope, self.points, self.saves = kill, None, [], Counter()

    def point(self, what: str) -> bool:
        """Record a point; True if the process is to die there."""
        if self.scope is None:
            return False
        self.points.append((self.scope, self.saves[self.scope], what))
        here = [p for p in self.points if p[:2] == (self.scope, 1)]
        return self.kill is not None and self.saves[self.scope] == 1 and (self.scope, len(here) - 1) == self.kill

    def die(self):
        print(f"killed at: {self.points[-1][2]}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self, monkeypatch):
        """Wrap the save functions and the file writers they call (in this process only)."""
        import dataclasses

        import transformers.modeling_utils as modeling_utils

        def scoped(scope, fn):
            def run(*args, **kwargs):
                self.scope = scope
                self.saves[scope] += 1
                try:
                    result = fn(*args, **kwargs)
                    if self.point("after the save"):
                        self.die()
                finally:
                    self.scope = None
                return result
            return run

        def before(name, fn):
            def run(*args, **kwargs):
                if self.point(f"before {name} {Path(str(args[0])).name}"):
                    self.die()
                return fn(*args, **kwargs)
            return run

        def half(name, fn, path_of, to_bytes):
            """A writer of the file path_of(*args): its points are before the call and half its bytes."""
            def run(*args, **kwargs):
                path = Path(str(path_of(*args, **kwargs)))
                if self.point(f"before {name} {path.name}"):
                    self.die()
                if self.point(f"half of {path.name}"):
                    data = to_bytes(*args, **kwargs)
                    path.write_bytes(data[: len(data) // 2])
                    self.die()
                return fn(*args, **kwargs)
            return run

        def torch_bytes(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            torch_save(obj, buf)
            return buf.getvalue()

        def safetensors_bytes(tensors, filename, metadata=None):
            from safetensors.torch import save

            return save(tensors, metadata)

        torch_save, write_text = torch.save, Path.write_text
        monkeypatch.setattr(CheckpointingTrainer, "_save_checkpoint",
                            scoped("checkpoint", CheckpointingTrainer._save_checkpoint))
        monkeypatch.setattr(tto.training.trainer, "save_atomically", scoped("final", tto.training.trainer.save_atomically))
        monkeypatch.setattr(torch, "save", half("torch.save", torch_save, lambda obj, f, *a, **k: f, torch_bytes))
        monkeypatch.setattr(modeling_utils, "safe_save_file", half(
            "save_file", modeling_utils.safe_save_file, lambda t, filename, **k: filename, safetensors_bytes))
        monkeypatch.setattr(TrainerState, "save_to_json", half(
            "save_to_json", TrainerState.save_to_json, lambda state, path: path,
            lambda state, path: (json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n").encode()))
        monkeypatch.setattr(Path, "write_text", half("write_text", write_text, lambda path, *a, **k: path,
                                                     lambda path, text, *a, **k: text.encode()))
        monkeypatch.setattr(os, "replace", before("rename", os.replace))
        monkeypatch.setattr(shutil, "rmtree", before("rmtree", shutil.rmtree))


def fork_train(log: Path, argv: list[str], points=None, callbacks=()) -> int:
    """Run train.py's main(argv) in a forked process (stdout and stderr to ``log``); its exit status,
    negative for the signal that ended it. ``points``: a SavePoints to install; its record goes to
    ``log.with_suffix('.points')``."""
    main = _train_main()
    pid = os.fork()
    if pid == 0:  # the training process: never returns into pytest
        code = 1
        gc.freeze()  # the Trainer's gc.collect() passes over this test process's objects
        # the signal handling of a fresh python process, whatever this test process had installed
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)
            with pytest.MonkeyPatch.context() as mp:
                build = tto.training.build_trainer
                mp.setattr(tto.training, "build_trainer", lambda recipe, cb=(): build(recipe, [*cb, *callbacks]))
                if points is not None:
                    points.install(mp)
                try:
                    main(argv)
                    code = 0
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else 1
                finally:
                    if points is not None:
                        log.with_suffix(".points").write_text(json.dumps(points.points))
        except BaseException:  # noqa: BLE001 - reported through the log and the exit status
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, with the kill points of its saves."""
    tmp = tmp_path_factory.mktemp("reference")
    argv = [str(TINY / "ttt.yml"), f"training_args.output_dir={tmp / 'out'}", *RUN]
    points = SavePoints()
    assert fork_train(tmp / "log", argv, points) == 0, (tmp / "log").read_text()[-3000:]
    recorded = [tuple(p) for p in json.loads((tmp / "log.points").read_text())]
    return tmp / "out", recorded


def assert_same_run(out: Path, ref: Path):
    """Same per-step losses (exactly), train_loss and final weights as the reference run."""
    assert losses(out / "checkpoint-12") == losses(ref / "checkpoint-12")
    assert sorted(losses(out / "checkpoint-12")) == list(range(1, 13))
    got, want = (json.loads((d / "train_metrics.json").read_text())["train_loss"] for d in (out, ref))
    assert got == pytest.approx(want, rel=1e-12)  # float64 sums of the same float32 losses, in another order
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kills_at_every_point_of_every_kind_of_save_lose_nothing(reference, tmp_path):
    """SIGKILL at each kill point of a checkpoint save and of the final save, one after another in
    the same run (each kill, then a resume): every checkpoint-N left is complete, each resume takes
    the newest and says so, and the run ends as the uninterrupted one (losses, train_loss, weights)."""
    ref, recorded = reference
    per_save = {scope: [what for s, n, what in recorded if (s, n) == (scope, 1)] for scope in ("checkpoint", "final")}
    assert len(per_save["checkpoint"]) >= 10 and len(per_save["final"]) >= 5, per_save
    out = tmp_path / "out"
    kills = [("checkpoint", i) for i in range(len(per_save["checkpoint"]))]
    kills += [("final", i) for i in range(len(per_save["final"]))]
    for i, kill in enumerate([*kills, None]):
        newest, _ = newest_complete_checkpoint(out) if out.exists() else (None, [])
        argv = [str(TINY / "ttt.yml"), f"training_args.output_dir={out}", *RUN, *([RESUME] if newest else [])]
        log = tmp_path / f"log{i}"
        status = fork_train(log, argv, SavePoints(kill))
        text = log.read_text()
        assert status == (-signal.SIGKILL if kill else 0), (kill, text[-3000:])
        if newest is not None:
            assert f"resuming from {newest}\n" in text, (kill, text[-3000:])
        for checkpoint in out.glob("checkpoint-*"):
            assert is_complete(checkpoint), (kill, sorted(p.name for p in checkpoint.iterdir()))
    assert_same_run(out, ref)


class SignalAt(TrainerCallback):
    """Sends the training process a signal at the end of a step. `signal.raise_signal` delivers it to
    this (the main) thread and runs its Python handler before returning: with `os.kill` the kernel may
    deliver it to another thread, and two signals sent back to back can then reach the handler once."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(self.signum)


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    argv = [str(TINY / "ttt.yml"), f"training_args.output_dir={out}", *RUN]
    status = fork_train(tmp_path / "log", argv, callbacks=[SignalAt(5, signal.SIGINT)])
    text = (tmp_path / "log").read_text()
    assert status == 130, text[-3000:]
    assert "Traceback" not in text
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "checkpoint-5"]  # no final model
    command = text.rsplit("resume with:\n", 1)[1].strip()
    words = shlex.split(command)
    assert words[2:] == [*argv, RESUME]
    assert Path(words[1]).resolve() == ROOT / "train.py"
    assert fork_train(tmp_path / "log2", words[2:]) == 0
    assert f"resuming from {out / 'checkpoint-5'}\n" in (tmp_path / "log2").read_text()
    assert_same_run(out, ref)


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "out"
    argv = [str(TINY / "ttt.yml"), f"training_args.output_dir={out}", *RUN]
    assert fork_train(tmp_path / "log", argv, callbacks=[SignalAt(3, signal.SIGTERM)]) == 128 + signal.SIGTERM
    assert "SIGTERM" in (tmp_path / "log").read_text() and "Traceback" not in (tmp_path / "log").read_text()
    newest, _ = newest_complete_checkpoint(out)
    assert newest == out / "checkpoint-3"


def test_what_an_interrupted_save_leaves_neither_blocks_a_rerun_nor_suggests_an_impossible_resume(tmp_path):
    from tto.training import check_output_dir

    out = tmp_path / "out"
    (out / ".saving").mkdir(parents=True)  # a kill during the final save of a run without checkpoints
    (out / ".staging" / "checkpoint-4").mkdir(parents=True)  # ... or during a checkpoint's
    check_output_dir(out, None, overwrite=False)  # the rerun may start
    (out / "tokenizer.json").write_text("{}")  # the kill came after the first file was moved into place
    with pytest.raises(FileExistsError, match="it has no complete checkpoint to resume from; allow overwriting"):
        check_output_dir(out, None, overwrite=False)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint-"):
        check_output_dir(out, True, overwrite=False)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    with pytest.raises(FileExistsError, match="resume from checkpoint-4 with training_args.resume_from_checkpoint=true"):
        check_output_dir(out, None, overwrite=False)
    check_output_dir(out, True, overwrite=False)
    with pytest.raises(FileNotFoundError, match="is incomplete"):
        check_output_dir(out, str(out / ".staging" / "checkpoint-4"), overwrite=False)


class SignalTwiceAt(SignalAt):
    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        super().on_step_end(args, state, control, **kwargs)


def test_a_second_ctrl_c_stops_at_once_and_points_at_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    argv = [str(TINY / "ttt.yml"), f"training_args.output_dir={out}", *RUN]
    assert fork_train(tmp_path / "log", argv, callbacks=[SignalTwiceAt(5, signal.SIGINT)]) == 130
    text = (tmp_path / "log").read_text()
    assert f"train.py: interrupted; resume from {out / 'checkpoint-4'} with:\n" in text and "Traceback" not in text
