"""Bad input: a clear error naming the file, line or key (or a counted skip, when asked)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data_prep.support import make_docs, manifest, run_cli, text_args, write_jsonl


def _error(capsys) -> str:
    err = capsys.readouterr().err  # progress bars come first
    assert "\nerror: " in "\n" + err, err
    return err[err.index("error: ") :]


def test_empty_inputs(tmp_path, tokenizer_dir, capsys):
    assert run_cli(*text_args(str(tmp_path / "nothing-*.jsonl"), tokenizer_dir, tmp_path / "o")) == 1
    assert "nothing-*.jsonl" in _error(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run_cli(*text_args(empty, tokenizer_dir, tmp_path / "o")) == 1
    assert "no documents" in _error(capsys)
    write_jsonl(empty, ["", ""])
    assert run_cli(*text_args(empty, tokenizer_dir, tmp_path / "o")) == 1
    assert "no documents in the input (2 skipped)" in _error(capsys)
    write_jsonl(empty, ["too short"])
    assert run_cli(*text_args(empty, tokenizer_dir, tmp_path / "o", 4096)) == 1
    assert "fewer than one window" in _error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, where, what",
    [
        (b'{"text": "ok"}\n{"body": "no text"}\n', ":2", "missing field 'text'"),
        (b'{"text": "ok"}\n\n{"text": "bad \xff"}\n', ":3", "not valid UTF-8: byte 0xff"),
        (b'{"text": "ok"}\n{"text": "unterminated\n', ":2", "invalid JSON"),
        (b'{"text": 17}\n', ":1", "is int, not a string"),
    ],
)
def test_bad_jsonl_documents_are_named_and_can_be_skipped(tmp_path, tokenizer_dir, capsys, content, where, what):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(write_jsonl(tmp_path / "good.jsonl", make_docs(5)).read_bytes() + content)
    line = int(where[1:]) + 5
    assert run_cli(*text_args(bad, tokenizer_dir, tmp_path / "o", 8)) == 1
    err = _error(capsys)
    assert f"{bad}:{line}" in err and what in err and "--on-bad-doc skip" in err

    assert run_cli(*text_args(bad, tokenizer_dir, tmp_path / "o", 8, "--on-bad-doc", "skip")) == 0
    skipped = manifest(tmp_path / "o")["skipped_documents"]
    assert skipped["total"] == 1 and skipped["examples"][0].startswith(f"{bad}:{line}: ")
    assert manifest(tmp_path / "o")["documents"] == 5 + content.count(b'"text": "ok"')


def test_non_utf8_txt_names_the_line(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "a.txt").write_bytes(b"line one\nline two\nline \xc3\x28 three\n")
    assert run_cli(*text_args(tmp_path / "a.txt", tokenizer_dir, tmp_path / "o", 8)) == 1
    assert f"{tmp_path / 'a.txt'}:3: not valid UTF-8" in _error(capsys)


def test_parquet_without_the_column_or_with_nulls(tmp_path, tokenizer_dir, capsys):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "a.parquet")
    assert run_cli(*text_args(tmp_path / "a.parquet", tokenizer_dir, tmp_path / "o", 8)) == 1
    assert "no column 'text' (columns: body)" in _error(capsys)
    pq.write_table(pa.table({"text": ["fine words here", None]}), tmp_path / "a.parquet")
    assert run_cli(*text_args(tmp_path / "a.parquet", tokenizer_dir, tmp_path / "o", 2)) == 1
    assert f"{tmp_path / 'a.parquet'}:row 2: field 'text' is null" in _error(capsys)


def test_unsupported_file_and_missing_dataset(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    assert run_cli(*text_args(tmp_path / "a.csv", tokenizer_dir, tmp_path / "o")) == 1
    assert "a.csv: unsupported file type" in _error(capsys)
    assert (
        run_cli(
            "text",
            "--dataset",
            tmp_path / "no-such-dataset",
            "--tokenizer",
            tokenizer_dir,
            "--seq-len",
            8,
            "--out",
            tmp_path / "o",
        )
        == 1
    )
    assert "cannot open dataset" in _error(capsys)


def _word_tokenizer(path, size, eos=True, max_length=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"eos_token": f"w{size - 1}"} if eos else {}
    if max_length:
        extra["model_max_length"] = max_length
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", **extra).save_pretrained(str(path))
    return path


def test_tokenizer_problems(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [" ".join(f"w{i}" for i in range(70000, 70050))])
    no_eos = _word_tokenizer(tmp_path / "no_eos", 10, eos=False)
    assert run_cli(*text_args(data, no_eos, tmp_path / "o", 8)) == 1
    assert "has no EOS token" in _error(capsys)

    short = _word_tokenizer(tmp_path / "short", 10, max_length=16)
    assert run_cli(*text_args(data, short, tmp_path / "o", 32)) == 1
    assert "--seq-len 32 exceeds the maximum length" in _error(capsys)

    big = _word_tokenizer(tmp_path / "big", 70100)
    assert run_cli(*text_args(data, big, tmp_path / "o", 8, "--dtype", "uint16")) == 1
    assert "70100 tokens, more than uint16 holds" in _error(capsys)
    assert run_cli(*text_args(data, big, tmp_path / "o", 8)) == 0
    assert manifest(tmp_path / "o")["columns"]["input_ids"] == "ndarray:uint32:8"

    assert run_cli(*text_args(data, tmp_path / "missing-tokenizer", tmp_path / "o2", 8)) == 1
    assert "cannot load tokenizer" in _error(capsys)


def test_config_errors_name_the_file_and_key(tmp_path, tokenizer_dir, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"input: [{tmp_path}/d.jsonl]\ntokenizer: {tokenizer_dir}\nseq_len: 8\nout: o\nseqlen: 9\n")
    assert run_cli("text", "--config", config) == 1
    err = _error(capsys)
    assert f"{config}: seqlen (--seqlen): Extra inputs are not permitted" in err
    config.write_text("seq_len: [1\n")
    assert run_cli("text", "--config", config) == 1
    assert f"{config}:2: invalid YAML" in _error(capsys)
    config.write_text(json.dumps({"tokenizer": str(tokenizer_dir), "out": "o", "input": ["x"]}))
    assert run_cli("text", "--config", config, "--seq-len", 1) == 1
    assert "command line: seq_len (--seq-len): Input should be greater than or equal to 2" in _error(capsys)
    assert run_cli("text", "--seq-len", 8, "--out", "o", "--input", "x") == 1
    assert "tokenizer (--tokenizer): missing" in _error(capsys)
