"""Output rules of a run: rerun no-op, refusal without --overwrite, interrupted runs."""

from pathlib import Path

import pytest

from data_prep.errors import DataPrepError
from data_prep.manifest import read_manifest
from tests.data_prep.support import kill_while_reading, make_docs, manifest, run_cli, text_args, write_jsonl


def _snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_rerun_is_a_no_op_and_workers_do_not_count(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_docs(50))
    out = tmp_path / "out"
    assert run_cli(*text_args(data, tokenizer_dir, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli(*text_args(data, tokenizer_dir, out, 32, "--workers", 2)) == 0
    assert "up to date" in capsys.readouterr().out
    assert _snapshot(out) == before


def test_different_arguments_are_refused_unless_overwrite(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_docs(50))
    out = tmp_path / "out"
    assert run_cli(*text_args(data, tokenizer_dir, out, 32)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli(*text_args(data, tokenizer_dir, out, 16)) == 1
    err = capsys.readouterr().err
    assert "seq_len: 32 -> 16" in err and "--overwrite" in err
    assert _snapshot(out) == before

    write_jsonl(data, make_docs(51))  # changed input, same arguments
    assert run_cli(*text_args(data, tokenizer_dir, out, 32)) == 1
    assert "inputs" in capsys.readouterr().err

    assert run_cli(*text_args(data, tokenizer_dir, out, 16, "--overwrite")) == 0
    assert manifest(out)["seq_len"] == 16 and manifest(out)["documents"] == 51
    assert not list(tmp_path.glob(".out.*"))  # no staging left behind


def test_a_non_dataset_directory_is_not_overwritten(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(*text_args(write_jsonl(tmp_path / "d.jsonl", make_docs(5)), tokenizer_dir, out)) == 1
    assert "holds no complete dataset" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_failure_mid_run_leaves_nothing_that_looks_complete(tmp_path, tokenizer_dir):
    good = write_jsonl(tmp_path / "a.jsonl", make_docs(200))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "broken \xff byte"}\n')
    out = tmp_path / "out"
    # Many small tasks: several are tokenized and saved before the bad line is read.
    assert run_cli(*text_args([good, bad], tokenizer_dir, out, 16, "--part-chars", 500, "--workers", 2)) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    # The same with an existing dataset being replaced: the old one stays whole.
    assert run_cli(*text_args(good, tokenizer_dir, out, 16)) == 0
    old = manifest(out)
    assert run_cli(*text_args([good, bad], tokenizer_dir, out, 16, "--overwrite")) == 1
    assert read_manifest(out) == old


def test_killed_run_is_not_taken_as_complete_and_rerun_works(tmp_path, tokenizer_dir):
    """SIGKILL while the run is reading its input (a FIFO we hold open), then rerun."""
    docs = make_docs(60)
    fifo, out = tmp_path / "stream.jsonl", tmp_path / "out"
    kill_while_reading(
        text_args(fifo, tokenizer_dir, out, 16, "--part-chars", 200),
        fifo,
        write_jsonl(tmp_path / "half.jsonl", docs[:30]).read_text(),
        ".out.partial/.scratch/*.npy",
    )
    assert not out.exists()
    with pytest.raises(DataPrepError, match="not a complete prepared dataset"):
        read_manifest(out)

    write_jsonl(fifo, docs)  # the same path, now a regular file with the whole input
    assert run_cli(*text_args(fifo, tokenizer_dir, out, 16)) == 0
    assert read_manifest(out)["documents"] == len(docs)
    assert not list(tmp_path.glob(".out.*"))
