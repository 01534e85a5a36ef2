"""Shared fixtures: a saved random tiny HF checkpoint and the toy data path, all offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from iris_ref.tiny import TOY_HELDOUT_PATH, TOY_TRAIN_PATH, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a saved, randomly initialised (seed 0) tiny Qwen2 model + tokenizer folder.

    Shared by the whole session: tests must not write into it (save elsewhere)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), seed=0)


@pytest.fixture(scope="session")
def toy_train_path():
    return TOY_TRAIN_PATH


@pytest.fixture(scope="session")
def toy_heldout_path():
    return TOY_HELDOUT_PATH


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests, restored afterwards. The tiny model's ops are
    too small to gain from a second thread, and on a loaded 2-core machine the threads'
    spin-waits make them many times slower (measured: 67 s -> 20 s for the data/model tests).
    Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
