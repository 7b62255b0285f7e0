"""Shared test settings: offline, CPU, deterministic."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is as fast as two, and much faster when the cores are busy
    (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def token_dataset():
    """The writer below, as a fixture: `token_dataset(out_dir, **options)`."""
    return write_token_dataset


def write_token_dataset(out_dir, num_samples=256, seq_len=32, vocab_size=64, seed=0):
    """A small MDS dataset in the pipeline's contract (index.json, shards, manifest.json): sequences
    counting up from a random start (mod vocab), which a model learns fast."""
    import hashlib
    import json
    from pathlib import Path

    import numpy as np
    from streaming import MDSWriter

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(out_dir), columns={"input_ids": "ndarray:uint16"}, size_limit=1 << 16) as writer:
        for _ in range(num_samples):
            ids = (rng.integers(0, vocab_size) + np.arange(seq_len)) % vocab_size
            writer.write({"input_ids": ids.astype(np.uint16)})
    index_sha = hashlib.sha256((out_dir / "index.json").read_bytes()).hexdigest()
    manifest = {
        "format_version": 1,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "index_sha256": index_sha,
        "columns": {"input_ids": "ndarray:uint16"},
        "num_samples": num_samples,
        "tokenizer": None,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir
