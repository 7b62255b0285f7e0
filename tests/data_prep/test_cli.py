"""The CLI around the stages: train-tokenizer, inspect, YAML configs (and the examples)."""

from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from data_prep.cli import COMMANDS
from tests.data_prep.support import make_docs, manifest, run_cli, text_args, write_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"
COMMAND_OF = {
    "s3": "synthetic",
    "pointer": "synthetic",
    "arith": "synthetic",
    "text": "text",
    "text_dataset": "text",
    "tokenizer": "train-tokenizer",
    "chat": "chat",
}


def test_trained_tokenizer_loads_with_eos_and_refuses_a_used_folder(tokenizer_dir, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.is_fast and tok.eos_token == "<|endoftext|>" and len(tok) <= 400
    text = "naïve café ✓ bridges"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips
    data = write_jsonl(tmp_path / "d.jsonl", make_docs(20))
    assert run_cli("train-tokenizer", "--input", data, "--vocab-size", 300, "--out", tokenizer_dir) == 1
    assert "not empty" in capsys.readouterr().err


def test_inspect_shows_counts_samples_and_manifest(tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ["hello world, naïve café"] * 5)
    assert run_cli(*text_args(data, tokenizer_dir, tmp_path / "t", 8)) == 0
    assert run_cli("synthetic", "--out", tmp_path / "s", "--train-samples", 50, "--eval-per-difficulty", 2) == 0
    capsys.readouterr()
    assert run_cli("inspect", tmp_path / "t", "--samples", 2) == 0
    out = capsys.readouterr().out
    windows = manifest(tmp_path / "t")["windows"]
    assert f"samples {windows} in 1 shards" in out and "naïve café" in out and '"kind": "text"' in out
    assert run_cli("inspect", tmp_path / "s") == 0
    out = capsys.readouterr().out
    assert "(synthetic, eval)" in out and "(synthetic, train)" in out and " | '" in out and "targets" in out
    assert run_cli("inspect", tmp_path / "s" / "tokenizer") == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_config_file_with_flag_override(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", make_docs(30))
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": [str(data)],
                "tokenizer": str(tokenizer_dir),
                "seq_len": 8,
                "out": str(tmp_path / "o"),
                "pack": "pad",
            }
        )
    )
    assert run_cli("text", "--config", config, "--seq-len", 12) == 0
    m = manifest(tmp_path / "o")
    assert (m["seq_len"], m["pack"], m["arguments"]["pack"]) == (12, "pad", "pad")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_validate(path):
    model = COMMANDS[COMMAND_OF[path.stem]][0]
    model.model_validate(yaml.safe_load(path.read_text()))
