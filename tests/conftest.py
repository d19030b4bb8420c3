"""Test session set-up: no network, quiet wandb, deterministic thread count."""

import os

# Read at import time by huggingface_hub / datasets: no test may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): they gain nothing from a second
    thread and lose 50-100x when the cores are shared (measured: 10 tiny steps 0.6 s on 1 thread,
    55 s on 2 beside another busy process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
