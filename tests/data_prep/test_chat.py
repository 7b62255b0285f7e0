"""The chat stage: assistant-only loss masks, packed and padded rows, long and malformed
conversations, templates, determinism, interrupted runs, S3, the loader, synthetic-chat."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_prep.chat_template import CHATML_TEMPLATE
from data_prep.errors import DataPrepError
from data_prep.manifest import read_manifest
from pipeline.data import build_train_loader
from tests.data_prep.support import kill_while_reading, make_docs, manifest, read_samples, run_cli, take
from tests.data_prep.test_s3 import BUCKET, s3  # noqa: F401  (fixture)

END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def chat_tok(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_conversations(count: int, seed: int = 0, max_turns: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    texts = iter(make_docs(count * (2 * max_turns + 1), seed=seed, min_words=1, max_words=12))
    rows = []
    for _ in range(count):
        messages = [
            {"role": role, "content": next(texts)}
            for _ in range(rng.integers(1, max_turns + 1))
            for role in ("user", "assistant")
        ]
        rows.append({"messages": messages, **({"system": next(texts)} if rng.random() < 0.5 else {})})
    return rows


def chat_args(data, tok_dir, out, seq_len=64, *extra) -> list:
    return ["chat", "--input", data, "--tokenizer", tok_dir, "--seq-len", seq_len, "--out", out, *extra]


def conversations_of(samples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Each conversation's (ids, mask) in row order, cut by segment_ids."""
    found = []
    for s in samples:
        for number in range(1, int(s["segment_ids"].max()) + 1):
            at = s["segment_ids"] == number
            found.append((s["input_ids"][at].tolist(), s["loss_mask"][at].tolist()))
    return found


def reference(tok, row: dict) -> tuple[list[int], list[int]]:
    """transformers' own rendering and its {% generation %} mask (chat_render.py uses neither)."""
    messages = ([{"role": "system", "content": row["system"]}] if "system" in row else []) + row["messages"]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "error: " in err, err
    return err[err.index("error: ") :]


def test_mask_is_exactly_the_assistant_turns_with_their_end_of_turn(tmp_path, chat_tokenizer_dir, chat_tok):
    row = {
        "system": "be brief",
        "messages": [
            {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat on a mat"},
            {"role": "user", "content": "and naïve dogs?"},
            {"role": "assistant", "content": "seven quiet dogs ✓"},
        ],
    }
    out = tmp_path / "out"
    data = write_rows(tmp_path / "c.jsonl", [row])
    assert run_cli(*chat_args(data, chat_tokenizer_dir, out, 80, "--pack", "pad")) == 0
    (sample,) = read_samples(out)
    ids, mask = sample["input_ids"].tolist(), sample["loss_mask"].tolist()
    length = int((sample["segment_ids"] == 1).sum())
    assert chat_tok.decode(ids[:length]) == (
        "<|im_start|>system\nbe brief"
        + END
        + "<|im_start|>user\nthe cat"
        + END
        + "<|im_start|>assistant\nsat on a mat"
        + END
        + "<|im_start|>user\nand naïve dogs?"
        + END
        + "<|im_start|>assistant\nseven quiet dogs ✓"
        + END
    )
    cuts = np.flatnonzero(np.diff(mask)) + 1
    runs = [
        (chat_tok.decode(run.tolist()), m[0]) for run, m in zip(np.split(np.array(ids), cuts), np.split(mask, cuts))
    ]
    assert [text for text, m in runs if m] == ["sat on a mat" + END, "seven quiet dogs ✓" + END]
    assert [text.endswith("<|im_start|>assistant\n") for text, m in runs if not m][:2] == [True, True]
    assert set(ids[length:]) == {chat_tok.pad_token_id} and not any(mask[length:])
    assert (ids[:length], mask[:length]) == reference(chat_tok, row)
    m = manifest(out)
    assert m["kind"] == "chat" and m["assistant_tokens"] == sum(mask) and m["chat_template"]["source"] == "tokenizer"
    assert m["columns"] == {
        "input_ids": "ndarray:uint16:80",
        "loss_mask": "ndarray:uint8:80",
        "segment_ids": "ndarray:uint16:80",
    }


def test_packed_rows_hold_whole_conversations_greedily_and_pad_one_per_row(tmp_path, chat_tokenizer_dir, chat_tok):
    rows = make_conversations(60, seed=1)
    data = write_rows(tmp_path / "c.jsonl", rows)
    expected = [reference(chat_tok, r) for r in rows]
    lengths = [len(ids) for ids, _ in expected]
    n = 2 * max(lengths)  # so every packed row but the last holds two conversations or more
    for pack in ("packed", "pad"):
        assert run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / pack, n, "--pack", pack)) == 0
    packed, pad = read_samples(tmp_path / "packed"), read_samples(tmp_path / "pad")
    assert conversations_of(packed) == conversations_of(pad) == expected
    assert len(pad) == len(rows) and len(packed) <= (len(rows) + 1) // 2

    used = [int((s["segment_ids"] > 0).sum()) for s in packed]
    firsts = np.cumsum([0] + [int(s["segment_ids"].max()) for s in packed])[1:-1]
    assert all(u + lengths[f] > n for u, f in zip(used, firsts))  # the next one did not fit: a new row
    for s, u in zip(packed, used):  # padding only at the end: pad id, mask 0, segment 0
        assert (s["segment_ids"][:u] > 0).all() and set(s["input_ids"][u:].tolist()) <= {chat_tok.pad_token_id}
        assert not s["loss_mask"][u:].any() and (np.diff(s["segment_ids"][:u].astype(int)) >= 0).all()
    m = manifest(tmp_path / "packed")
    assert (m["windows"], m["documents"], m["tokens"]) == (len(packed), len(rows), sum(lengths))
    assert m["padding_tokens"] == len(packed) * n - sum(lengths) and m["dropped_tokens"] == 0
    assert m["assistant_tokens"] == sum(sum(mask) for _, mask in expected)
    assert manifest(tmp_path / "pad")["assistant_tokens"] == m["assistant_tokens"]


def test_long_conversations_are_truncated_or_dropped_and_counted(tmp_path, chat_tokenizer_dir, chat_tok, capsys):
    short = make_conversations(5, seed=2, max_turns=1)
    long_answer = {
        "messages": [
            {"role": "user", "content": "why?"},
            {"role": "assistant", "content": " ".join(make_docs(8, seed=3))},
        ]
    }
    long_prompt = {
        "messages": [
            {"role": "user", "content": " ".join(make_docs(8, seed=4))},
            {"role": "assistant", "content": "no"},
        ]
    }
    rows = short[:2] + [long_answer] + short[2:4] + [long_prompt] + short[4:]
    data = write_rows(tmp_path / "c.jsonl", rows)
    n = 64
    assert max(len(reference(chat_tok, r)[0]) for r in short) <= n < len(reference(chat_tok, long_answer)[0])
    assert run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / "drop", n, "--long", "drop")) == 0
    assert (
        run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / "cut", n, "--long", "truncate", "--pack", "pad")) == 0
    )
    drop, cut = manifest(tmp_path / "drop"), manifest(tmp_path / "cut")
    assert drop["arguments"]["long"] == "drop" and drop["truncated_conversations"] == 0
    assert drop["dropped_conversations"] == {
        "total": 2,
        "by_reason": {"longer than seq_len": 2, "no assistant token within seq_len": 0},
    }
    assert conversations_of(read_samples(tmp_path / "drop")) == [reference(chat_tok, r) for r in short]
    # truncate: the long answer keeps its first n tokens alone in a row; the long prompt has no
    # assistant token left within n, so it is dropped all the same.
    assert cut["truncated_conversations"] == 1
    assert cut["dropped_conversations"] == {
        "total": 1,
        "by_reason": {"longer than seq_len": 0, "no assistant token within seq_len": 1},
    }
    ids, mask = reference(chat_tok, long_answer)
    assert conversations_of(read_samples(tmp_path / "cut"))[2] == (ids[:n], mask[:n])
    assert (
        run_cli(
            *chat_args(
                write_rows(tmp_path / "l.jsonl", [long_prompt]),
                chat_tokenizer_dir,
                tmp_path / "x",
                n,
                "--long",
                "truncate",
            )
        )
        == 1
    )
    err = _error(capsys)
    assert "all 1 conversations were dropped" in err and "1 with no assistant token within seq_len" in err
    assert cut["dropped_tokens"] == sum(len(reference(chat_tok, r)[0]) for r in (long_answer, long_prompt)) - n


@pytest.mark.parametrize(
    "bad, what",
    [
        ('["a", "list"]', "not a JSON object: list"),
        ({"text": "no messages"}, "missing field 'messages'"),
        ({"messages": "hello"}, "field 'messages' is str, not a list"),
        ({"messages": ["hello"]}, "messages[0] is str, not an object with role and content"),
        ({"messages": [{"content": "hi"}]}, "messages[0] has no 'role'"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages[1] has no 'content'"),
        ({"messages": [{"role": "assistant", "content": ["a", "b"]}]}, "messages[0]: content is list, not a string"),
        ({"messages": [{"role": "narrator", "content": "once"}]}, "messages[0]: unknown role 'narrator'"),
        ({"messages": [{"role": "user", "content": "anyone?"}]}, "no assistant message"),
        ({"messages": [{"role": "assistant", "content": "x"}], "system": 3}, "field 'system' is int, not a string"),
        (
            {"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}], "system": "c"},
            "both a 'system' field and a first system message",
        ),
        ('{"messages": [', "invalid JSON"),
    ],
)
def test_malformed_rows_are_named_with_file_and_line(tmp_path, chat_tokenizer_dir, capsys, bad, what):
    data = write_rows(tmp_path / "c.jsonl", make_conversations(2, seed=5) + [bad])
    out = tmp_path / "out"
    assert run_cli(*chat_args(data, chat_tokenizer_dir, out)) == 1
    err = _error(capsys)
    assert f"{data}:3: " in err and what in err and "--on-bad-doc skip" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_rows_can_be_skipped_and_datasets_rows_are_named(tmp_path, chat_tokenizer_dir, capsys):
    import datasets

    rows = make_conversations(4, seed=6) + [{"messages": [{"role": "user", "content": "alone"}]}]
    data = write_rows(tmp_path / "c.jsonl", rows)
    assert run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / "o", 128, "--on-bad-doc", "skip")) == 0
    assert manifest(tmp_path / "o")["skipped_documents"]["examples"] == [
        f"{data}:5: no assistant message: nothing to train on"
    ]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))  # missing keys become nulls
    assert (
        run_cli(
            "chat", "--dataset", saved, "--tokenizer", chat_tokenizer_dir, "--seq-len", 128, "--out", tmp_path / "d"
        )
        == 1
    )
    assert f"{saved}[train]:row 5: no assistant message" in _error(capsys)
    datasets.Dataset.from_list(rows[:4]).save_to_disk(str(tmp_path / "good"))
    assert (
        run_cli(
            "chat",
            "--dataset",
            tmp_path / "good",
            "--tokenizer",
            chat_tokenizer_dir,
            "--seq-len",
            128,
            "--out",
            tmp_path / "d",
        )
        == 0
    )
    assert manifest(tmp_path / "d")["index_sha256"] == manifest(tmp_path / "o")["index_sha256"]


def test_tool_messages_are_context_not_trained(tmp_path, chat_tokenizer_dir, chat_tok):
    row = {
        "messages": [
            {"role": "user", "content": "the river?"},
            {"role": "assistant", "content": "ask the tool"},
            {"role": "tool", "content": "flow past old stone", "tool_call_id": "7"},
            {"role": "assistant", "content": "it flows"},
        ]
    }
    assert run_cli(*chat_args(write_rows(tmp_path / "c.jsonl", [row]), chat_tokenizer_dir, tmp_path / "o", 64)) == 0
    ((ids, mask),) = conversations_of(read_samples(tmp_path / "o"))
    assert chat_tok.decode([i for i, m in zip(ids, mask) if m]) == "ask the tool" + END + "it flows" + END
    assert "<|im_start|>tool\nflow past old stone" + END in chat_tok.decode(ids)


def test_templates_missing_given_or_inconsistent(tmp_path, tokenizer_dir, chat_tokenizer_dir, capsys):
    data = write_rows(tmp_path / "c.jsonl", make_conversations(5, seed=7))
    assert run_cli(*chat_args(data, tokenizer_dir, tmp_path / "o")) == 1
    assert "has no usable chat template" in _error(capsys) and not (tmp_path / "o").exists()

    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML_TEMPLATE)
    assert run_cli(*chat_args(data, tokenizer_dir, tmp_path / "file", 128, "--chat-template", jinja)) == 0
    assert run_cli(*chat_args(data, tokenizer_dir, tmp_path / "named", 128, "--chat-template", "chatml")) == 0
    assert manifest(tmp_path / "file")["index_sha256"] == manifest(tmp_path / "named")["index_sha256"]
    assert manifest(tmp_path / "file")["chat_template"]["source"] == str(jinja)
    # A different template is a different dataset: refused without --overwrite.
    jinja.write_text(CHATML_TEMPLATE.replace("'\\n'", "'\\n\\n'"))
    assert run_cli(*chat_args(data, tokenizer_dir, tmp_path / "file", 128, "--chat-template", jinja)) == 1
    assert "tokenizer (content hash)" in _error(capsys)

    # A template that shortens earlier assistant turns: the prefixes do not match the whole.
    jinja.write_text(
        "{% for m in messages %}{{ m['role'] }}: "
        "{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    two_turns = make_conversations(20, seed=8, max_turns=2)
    data = write_rows(tmp_path / "two.jsonl", two_turns)
    line = 1 + next(i for i, r in enumerate(two_turns) if len(r["messages"]) > 2)
    assert run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / "o", 128, "--chat-template", jinja)) == 1
    err = _error(capsys)
    assert f"{data}:{line}: " in err and "does not tokenize as a prefix of the whole conversation" in err
    jinja.write_text("{{ raise_exception('only user turns please') }}")
    assert run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / "o", 128, "--chat-template", jinja)) == 1
    assert f"{data}:1: the chat template failed" in (err := _error(capsys)) and "only user turns please" in err


def test_same_bytes_whatever_the_workers_and_config_file(tmp_path, chat_tokenizer_dir):
    data = write_rows(tmp_path / "c.jsonl", make_conversations(200, seed=9))
    assert run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / "w1", 64, "--shard-size", 4096)) == 0
    config = tmp_path / "chat.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": [str(data)],
                "tokenizer": str(chat_tokenizer_dir),
                "seq_len": 32,
                "out": str(tmp_path / "w2"),
                "shard_size": 4096,
                "part_chars": 300,
            }
        )
    )
    assert run_cli("chat", "--config", config, "--seq-len", 64, "--workers", 2) == 0
    one, two = manifest(tmp_path / "w1"), manifest(tmp_path / "w2")
    assert one["parts"] > 2 and one["index_sha256"] == two["index_sha256"] and two["arguments"]["workers"] == 2
    for shard in sorted((tmp_path / "w1").glob("part-*/shard.*.mds")):
        assert shard.read_bytes() == (tmp_path / "w2" / shard.relative_to(tmp_path / "w1")).read_bytes()


def test_killed_run_is_not_taken_as_complete_and_rerun_works(tmp_path, chat_tokenizer_dir):
    """SIGKILL while the run reads its input (a FIFO we hold open), then rerun (as for text)."""
    rows = make_conversations(60, seed=10)
    fifo, out = tmp_path / "stream.jsonl", tmp_path / "out"
    kill_while_reading(
        chat_args(fifo, chat_tokenizer_dir, out, 64, "--part-chars", 200),
        fifo,
        write_rows(tmp_path / "half.jsonl", rows[:30]).read_text(),
        ".out.partial/.scratch/*.mask.npy",
    )
    assert not out.exists()
    with pytest.raises(DataPrepError, match="not a complete prepared dataset"):
        read_manifest(out)
    write_rows(fifo, rows)  # the same path, now a regular file with the whole input
    assert run_cli(*chat_args(fifo, chat_tokenizer_dir, out, 64)) == 0
    assert read_manifest(out)["documents"] == len(rows) and not list(tmp_path.glob(".out.*"))


def test_loader_labels_are_ignored_exactly_outside_assistant_tokens(tmp_path, chat_tokenizer_dir, chat_tok, capsys):
    data = write_rows(tmp_path / "c.jsonl", make_conversations(40, seed=11))
    out = tmp_path / "out"
    assert run_cli(*chat_args(data, chat_tokenizer_dir, out, 64)) == 0
    samples = read_samples(out)
    batches = take(build_train_loader(out, 4, 4, seed=0, shuffle=False), 3)
    for b, batch in enumerate(batches):
        # right padding: no attention mask; the segment ids say which tokens are real (the losses' counts)
        assert set(batch) == {"input_ids", "labels", "segment_ids"}
        for row in range(4):
            sample = samples[4 * b + row]
            trained = torch.from_numpy(sample["loss_mask"].astype(bool))
            assert torch.equal(batch["input_ids"][row], torch.from_numpy(sample["input_ids"].astype(np.int64)))
            assert torch.equal(batch["segment_ids"][row], torch.from_numpy(sample["segment_ids"].astype(np.int64)))
            assert not trained[batch["segment_ids"][row] == 0].any()  # padding is never trained
            assert (batch["labels"][row][~trained] == -100).all()
            assert torch.equal(batch["labels"][row][trained], batch["input_ids"][row][trained])
            text = chat_tok.decode(batch["labels"][row][trained].tolist())
            assert text.count(END) == text.count("<|im_end|>") and "<|im_start|>" not in text
    capsys.readouterr()
    assert run_cli("inspect", out, "--samples", 1) == 0
    shown = capsys.readouterr().out
    assert "(chat)" in shown and "assistant tokens" in shown
    assert "<|im_start|>assistant\\n«" in shown  # the text is shown repr'd


def test_upload_to_s3_reads_back_like_local(s3, tmp_path, chat_tokenizer_dir):  # noqa: F811
    data = write_rows(tmp_path / "c.jsonl", make_conversations(30, seed=12))
    remote = f"s3://{BUCKET}/chat"
    assert run_cli(*chat_args(data, chat_tokenizer_dir, remote, 64, "--workers", 2)) == 0
    assert run_cli(*chat_args(data, chat_tokenizer_dir, tmp_path / "local", 64)) == 0
    got = s3.get_object(Bucket=BUCKET, Key="chat/index.json")["Body"].read()
    assert got == (tmp_path / "local" / "index.json").read_bytes()
    remote_batch = take(build_train_loader(remote, 4, 4, seed=1, cache_dir=str(tmp_path / "cache")), 1)[0]
    local_batch = take(build_train_loader(tmp_path / "local", 4, 4, seed=1), 1)[0]
    assert torch.equal(remote_batch["labels"], local_batch["labels"])


def test_synthetic_chat_is_the_synthetic_task_as_conversations(tmp_path, chat_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    args = ["--train-samples", 60, "--eval-per-difficulty", 3, "--samples-per-part", 25]
    assert run_cli("synthetic-chat", "--out", train, "--eval-out", held_out, "--system", "Compose.", *args) == 0
    assert run_cli("synthetic", "--out", tmp_path / "mds", *args) == 0
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    evals = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert (len(rows), len(evals)) == (60, 24) and rows[0]["system"] == "Compose."
    # The same problems as `synthetic` with the same seed, in the same order.
    word_tok = AutoTokenizer.from_pretrained(str(tmp_path / "mds" / "tokenizer"))
    prompts = [
        word_tok.decode(s["input_ids"][s["input_ids"] != 0].tolist()[:-3])  # no padding, no answer
        for s in read_samples(tmp_path / "mds" / "train")
    ]
    assert [r["messages"][0]["content"] for r in rows] == prompts
    for r in rows + evals:
        user, assistant = r["messages"]
        steps, _, answer = assistant["content"].partition("#### ")
        assert answer == r["final"] and len(steps.split()) == r["difficulty"] - 1  # running products g1..g(k-1)
        assert (r["question"], r["answer"]) == (user["content"], assistant["content"])  # GSM8K's format too
        perm = (0, 1, 2)
        for g in user["content"].split()[:-1]:
            perm = tuple(int(g[1:][x]) for x in perm)
        assert r["final"] == "".join(map(str, perm))
    train_prompts = {r["messages"][0]["content"] for r in rows}
    assert not {r["messages"][0]["content"] for r in evals if r["difficulty"] >= 4} & train_prompts
    assert run_cli("synthetic-chat", "--out", train, "--train-samples", 5) == 1
    assert "exists; pass --overwrite" in _error(capsys)
    assert run_cli(*chat_args(train, chat_tokenizer_dir, tmp_path / "rows", 128)) == 0
    assert manifest(tmp_path / "rows")["documents"] == 60
