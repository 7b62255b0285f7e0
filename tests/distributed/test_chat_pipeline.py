"""Reasoning post-training in miniature: the synthetic task as conversations (data_prep synthetic-chat),
a tokenizer with a ChatML template trained in-process, `data_prep chat` (loss on assistant tokens
only), the three training phases on it (LoopLM pretrain, MELT transition, distillation) and the
GSM8K-style evaluation through the chat template. No downloads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.data_prep.support import run_cli, write_jsonl

from .launch import REPO, ok, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = ["schedule.total_steps=4", "schedule.warmup_steps=1", "checkpointing.every=4"]


def test_chat_traces_through_every_phase_and_the_math_evaluation(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.data import build_train_loader

    chats, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert (
        run_cli(
            "synthetic-chat",
            "--out",
            chats,
            "--eval-out",
            held_out,
            "--train-samples",
            400,
            "--eval-per-difficulty",
            1,
            "--max-difficulty",
            4,
        )
        == 0
    )
    rows = [json.loads(line) for line in chats.read_text().splitlines()]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [m["content"] for r in rows for m in r["messages"]])
    tok_dir = tmp_path / "tokenizer"
    assert (
        run_cli(
            "train-tokenizer", "--input", corpus, "--vocab-size", 320, "--out", tok_dir, "--chat-template", "chatml"
        )
        == 0
    )
    data = tmp_path / "data"
    assert run_cli("chat", "--input", chats, "--tokenizer", tok_dir, "--seq-len", 48, "--out", data) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert 0 < manifest["assistant_tokens"] < manifest["tokens"]

    # CE only where the template put assistant tokens: the loader's labels are the loss mask's
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    batch = next(iter(build_train_loader(str(data), 4, 4, seed=0)))
    labelled = batch["labels"] != -100
    assert labelled.any() and (~labelled).any()
    assert "<|im_start|>user" not in tok.decode(batch["input_ids"][labelled])
    assert "####" in tok.decode(batch["input_ids"][labelled])

    # one process per phase (2-rank runs of these configs are tested elsewhere): the chat data is the point
    vocab = [f"model.config.vocab_size={len(tok)}"]
    pretrain, transition, distill = (tmp_path / name for name in ("pretrain", "transition", "distill"))
    one = {"launcher": False, "env": {"OMP_NUM_THREADS": "2"}}
    ok(train("configs/smoke/pretrain.yaml", pretrain, f"data.path={data}", *vocab, *STEPS, **one))
    ok(
        train(
            "configs/smoke/transition.yaml",
            transition,
            f"data.path={data}",
            f"model.init_from={pretrain / 'export'}",
            *STEPS,
            **one,
        )
    )
    ok(
        train(
            "configs/smoke/distill.yaml",
            distill,
            f"data.path={data}",
            f"model.init_from={transition / 'export'}",
            f"teacher.init_from={pretrain / 'export'}",
            *STEPS,
            **one,
        )
    )

    out = tmp_path / "math.json"
    looplm, melt = pretrain / "export", distill / "export"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "--model",
            f"looplm={looplm}",
            "--model",
            f"looplm_lastkv={looplm}",
            "--model",
            f"melt={melt}",
            "--math",
            f"gsm8k={held_out}",
            "--math-instruction",
            "",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())["results"]
    problems = len(held_out.read_text().splitlines())
    for contender in ("looplm", "looplm_lastkv", "melt"):
        row = results[contender]["math"]["gsm8k"]
        assert row["problems"] == problems and row["prompt"]["format"] == "chat", row
        assert set(row["pass@1"]) == {"strict", "flexible"}
        assert all(0.0 <= v <= 1.0 for v in row["pass@1"].values()), row
    assert "gsm8k" in out.with_suffix(".md").read_text()
