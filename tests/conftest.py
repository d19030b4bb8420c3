"""Test session set-up: no network, quiet wandb, deterministic thread count, and the memory the
full-size tests need (waiting for it, or for the machine to themselves)."""

import gc
import os
import sys
import tempfile
import time
from pathlib import Path

# Read at import time by huggingface_hub / datasets: no test may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread unless asked (OMP_NUM_THREADS=N): for this process (torch reads it at import) and every
# script a test starts. Measured on the shared 2-core CPU: the ttt-linear conformance tests take
# 15.9-25.4 s with two threads and 8.6-9.3 s with one; a busy second thread beside another process
# runs tiny matmuls 50-100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tto.cli import return_freed_memory  # noqa: E402

# As train.py does: freed tensors go back to the system. Without it a worker's heap keeps what the
# full-size tests freed (12 GB resident after a few of them), and the next test's free-memory check
# (require_memory) sees the worker's own leftovers.
return_freed_memory()


#: how long a test that needs more memory than is free waits for it before skipping: the other
#: pytest-xdist worker's test may hold several GB for a few minutes (a CI run skipped two recipes whose
#: training needed 9.4 and 15.5 GiB while 9.1 and 15.5 were free)
MEMORY_WAIT_SECONDS = 300
#: the xdist group of the tests that need the machine to themselves (training gated_deltanet_1.3b with
#: AdamW holds 16 bytes per parameter, 19.7 GiB of a 23.5 GiB machine): collected last, so pytest-xdist
#: hands it out after every other test, and its test waits for the other workers to finish theirs
#: (:func:`wait_for_other_workers`). One group: two such tests on two workers would wait for each other.
WHOLE_MACHINE = "whole_machine"
#: the longest a whole-machine test waits for the other workers: the whole suite's time on 2 cores
OTHER_WORKERS_WAIT_SECONDS = 45 * 60


def pytest_collection_modifyitems(items):
    """The whole-machine tests last (the rest keep their order). pytest-xdist's load-group scheduling
    hands out the largest groups first and the others in this order, so a one-test group collected
    last is the last work handed out."""
    items.sort(key=lambda item: any(mark.args == (WHOLE_MACHINE,) for mark in item.iter_markers("xdist_group")))


def _finished_workers() -> Path | None:
    """Where the pytest-xdist workers of this run mark that they have finished (None without xdist)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    return None if run is None else Path(tempfile.gettempdir()) / f"tto-pytest-{run}"


def pytest_sessionfinish(session):
    """A pytest-xdist worker past its last test says it has finished."""
    finished, worker = _finished_workers(), os.environ.get("PYTEST_XDIST_WORKER")
    if finished is not None and worker is not None:
        finished.mkdir(exist_ok=True)
        (finished / worker).touch()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A pytest-xdist worker exits as soon as its session is over, so that the memory it holds goes back to
    the system. pytest-xdist would keep it alive, idle, until the whole run ends: a CI run's finished worker
    still held about 2 GiB when the whole-machine test asked for its 21.2 GiB, and that test skipped. By
    now the worker has sent its results (pytest-xdist's `workerfinished` event, at the end of
    pytest_sessionfinish), and from that event on the controller takes the end of its connection as a
    normal end, not a crash."""
    if os.environ.get("PYTEST_XDIST_WORKER") is not None and hasattr(config, "workeroutput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def wait_for_other_workers() -> None:
    """Under pytest-xdist, wait until every other worker has finished its tests (at most
    :data:`OTHER_WORKERS_WAIT_SECONDS`): a whole-machine test is the last handed out, so by then
    nothing else runs beside it (and the other workers exit, :func:`pytest_unconfigure`)."""
    finished, worker = _finished_workers(), os.environ.get("PYTEST_XDIST_WORKER")
    if finished is None or worker is None:
        return
    others = int(os.environ["PYTEST_XDIST_WORKER_COUNT"]) - 1
    deadline = time.monotonic() + OTHER_WORKERS_WAIT_SECONDS
    while len({p.name for p in finished.glob("gw*")} - {worker}) < others and time.monotonic() < deadline:
        time.sleep(5)


def _release_memory() -> None:
    """Collect this process's garbage and hand its heap's free pages back to the system."""
    import ctypes

    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def require_memory(need: int, what: str) -> None:
    """Skip the test, naming `what`, when less than `need` bytes of memory are available (a
    full-size model on a machine whose free memory cannot hold it); `need` is what the test allocates
    beyond what this process holds at its start. Counted after this process has collected its garbage
    and handed its heap's free pages back (a previous test's model, held in a reference cycle or in
    freed heap pages, is not memory the machine lacks), and, if the machine could hold it, after
    waiting up to :data:`MEMORY_WAIT_SECONDS` for other processes to free theirs."""
    import psutil  # a dependency of accelerate, which the Trainer needs

    _release_memory()
    deadline = time.monotonic() + (MEMORY_WAIT_SECONDS if need < psutil.virtual_memory().total else 0)
    while (available := psutil.virtual_memory().available) < need and time.monotonic() < deadline:
        time.sleep(5)
    if available < need:
        pytest.skip(f"{what} needs {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB are available")



def damaged_copy(model_dir, dst, how: str):
    """A copy of `model_dir` whose model.safetensors is cut in half (how="truncated") or replaced by
    random bytes (how="corrupt")."""
    import shutil

    shutil.copytree(model_dir, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))
    return dst


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """put(name, model_dir): `model_dir` as hub model `name` in a fresh local Hugging Face cache, laid out
    as huggingface_hub writes it (blobs, a snapshot of symlinks, refs/main); the cache is the process's."""
    import shutil

    from huggingface_hub import constants

    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    commit = "0123456789abcdef0123456789abcdef01234567"

    def put(name, model_dir):
        repo = root / f"models--{name.replace('/', '--')}"
        (repo / "blobs").mkdir(parents=True)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        for i, file in enumerate(sorted(model_dir.iterdir())):
            blob = repo / "blobs" / f"blob{i}"
            shutil.copy(file, blob)
            (repo / "snapshots" / commit / file.name).symlink_to(blob)
        return repo / "snapshots" / commit

    return put


@pytest.fixture
def step_factors(monkeypatch):
    """The factors tto's step bound (tto.engine.memory) applies to the chunks' commits, recorded (from
    its screen or its exact bound alike)."""
    from tto.engine.memory import Memory

    seen = []
    step_bound = Memory._step_bound

    def recorded(self, *args):
        kappa = step_bound(self, *args)
        seen.append(kappa)
        return kappa

    monkeypatch.setattr(Memory, "_step_bound", recorded)
    return seen
