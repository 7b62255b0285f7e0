"""Shared builders of the data_prep tests: a small corpus, a tokenizer trained in-process, the
CLI run in-process, and MDS read-back with the real StreamingDataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from data_prep.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

WORDS = (
    "the cat sat on a mat while seven quiet dogs watched the river flow past old stone "
    "bridges; naïve café owners counted 12 apples, über-fast trains and ✓ marks"
).split()


def make_docs(count: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(min_words, max_words + 1))) for _ in range(count)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def trained_tokenizer(tmp_path_factory, name: str, *extra) -> Path:
    """A byte-level BPE trained by the train-tokenizer command on the test words, with the
    ``extra`` arguments (once per session: test modules asking for ``name`` share the folder)."""
    root = tmp_path_factory.getbasetemp() / name
    out = root / "tokenizer"
    if not out.exists():
        root.mkdir(exist_ok=True)
        corpus = write_jsonl(root / "train.jsonl", make_docs(300, seed=99))
        assert run_cli("train-tokenizer", "--input", corpus, "--vocab-size", 400, "--out", out, *extra) == 0
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return trained_tokenizer(tmp_path_factory, "data_prep_tokenizer")


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """The same with the ChatML special tokens and template (train-tokenizer --chat-template chatml)."""
    return trained_tokenizer(tmp_path_factory, "data_prep_chat_tokenizer", "--chat-template", "chatml")


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


def _open_writer(fifo: Path, proc: subprocess.Popen, log: Path, timeout: float = 60):
    """Open the FIFO for writing once the run has opened it for reading (without hanging if
    the run died first)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "w")
    raise AssertionError(f"the run never opened its input: {log.read_text()[-2000:]}")


def kill_while_reading(args: list, fifo: Path, head: str, started: str) -> None:
    """Run ``python -m data_prep ARGS`` (in a process) reading ``fifo`` (a FIFO made here), feed
    it ``head`` while holding it open, and SIGKILL the run once a file matching the glob
    ``started`` (relative to the FIFO's folder) shows that it has written work."""
    os.mkfifo(fifo)
    log = fifo.with_suffix(".log")
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_prep", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        with _open_writer(fifo, proc, log) as writer:
            writer.write(head)
            writer.flush()
            deadline = time.time() + 60
            while not list(fifo.parent.glob(started)) and time.time() < deadline:
                time.sleep(0.05)
            assert list(fifo.parent.glob(started)), f"the run did not start: {log.read_text()[-2000:]}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    finally:
        proc.kill()
    fifo.unlink()
