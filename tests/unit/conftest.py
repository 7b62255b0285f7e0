"""Fixtures shared by the unit tests."""

import pytest
import torch

# data_prep's trained tokenizers, shared by its test files (module- and session-scoped fixtures)
from tests.data_prep.support import chat_tokenizer_dir, tokenizer, tokenizer_dir  # noqa: F401


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is as fast as two, and much faster when the cores are busy
    (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
