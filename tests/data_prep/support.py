"""Shared builders of the data_prep tests: a small corpus, a tokenizer trained in-process, the
CLI run in-process, and MDS read-back with the real StreamingDataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from data_prep.cli import main  # noqa: E402

WORDS = ("the cat sat on a mat while seven quiet dogs watched the river flow past old stone "
         "bridges; naïve café owners counted 12 apples, über-fast trains and ✓ marks").split()


def make_docs(count: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(min_words, max_words + 1))) for _ in range(count)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained by the train-tokenizer command on the test words (once per
    session: test modules importing this fixture share the folder)."""
    root = tmp_path_factory.getbasetemp() / "data_prep_tokenizer"
    out = root / "tokenizer"
    if not out.exists():
        root.mkdir(exist_ok=True)
        corpus = write_jsonl(root / "train.jsonl", make_docs(300, seed=99))
        assert run_cli("train-tokenizer", "--input", corpus, "--vocab-size", 400, "--out", out) == 0
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def text_args(inputs, tokenizer_dir, out, seq_len=32, *extra) -> list:
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return ["text", "--input", *inputs, "--tokenizer", tokenizer_dir, "--seq-len", seq_len, "--out", out, *extra]


def independent_stream(tok, docs: list[str]) -> list[int]:
    """The expected token stream, one document at a time (not the stage's batch call)."""
    stream: list[int] = []
    for doc in docs:
        stream += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    return stream


def read_samples(directory: Path) -> list[dict]:
    """Every sample in order, through the real StreamingDataset (local, no shuffle)."""
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(directory), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(dataset.num_samples)]


def take(loader, n: int) -> list:
    """The first n batches of a loader (its iterator then dropped mid-epoch, as a trainer would)."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / "manifest.json").read_text())
