"""Synthetic tasks: answers (and s3's running products) checked by independent solvers that
read the decoded words, plus the layout contract the trainer and evaluator rely on."""

import pytest
from transformers import AutoTokenizer

from tests.data_prep.support import manifest, read_samples, run_cli

IGNORE = -100


def _perm(word):  # "p120" = the map 0->1, 1->2, 2->0
    assert word[0] == "p" and sorted(word[1:]) == ["0", "1", "2"]
    return [int(c) for c in word[1:]]


def _words(tok, ids):
    return [tok.convert_ids_to_tokens(int(i)) for i in ids]


def _solve_s3(prompt_words):
    """Apply g1 first, then g2, ...; returns the images of 0, 1, 2 after each prefix."""
    perms = [_perm(w) for w in prompt_words]
    prefixes = []
    for i in range(1, len(perms) + 1):
        images = []
        for x in range(3):
            for g in perms[:i]:
                x = g[x]
            images.append(x)
        prefixes.append(images)
    return prefixes


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "s3"
    assert (
        run_cli(
            "synthetic",
            "--out",
            out,
            "--train-samples",
            3000,
            "--samples-per-part",
            1000,
            "--eval-per-difficulty",
            60,
            "--seed",
            7,
        )
        == 0
    )
    return out


def test_s3_layout_tokenizer_and_manifests(s3_data):
    tok = AutoTokenizer.from_pretrained(str(s3_data / "tokenizer"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    for split in ("train", "eval"):
        m = manifest(s3_data / split)
        assert (m["kind"], m["task"], m["split"]) == ("synthetic", "s3", split)
        assert (m["seq_len"], m["prompt_length"], m["answer_length"]) == (12, 9, 3)
        assert m["vocab_size"] == len(tok) == 14 and m["chance"] == pytest.approx(1 / 6)
        assert m["tokenizer"]["name_or_path"] == "../tokenizer"
        assert set(m["columns"]) == {"input_ids", "labels", "difficulty", "prompt_length"}
    assert manifest(s3_data / "eval")["difficulties"] == {str(k): 60 for k in range(1, 9)}
    assert set(manifest(s3_data / "train")["difficulties"]) == {str(k) for k in range(1, 9)}
    # The words in the rows are the tokenizer's words: encoding the decoded text gives the ids back.
    sample = read_samples(s3_data / "train")[0]
    text = " ".join(w for w in _words(tok, sample["input_ids"]) if w != "<pad>")
    assert tok(text, add_special_tokens=False)["input_ids"] == [i for i in sample["input_ids"].tolist() if i != 0]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_s3_answers_and_running_products_are_correct(s3_data, split):
    tok = AutoTokenizer.from_pretrained(str(s3_data / "tokenizer"))
    samples = read_samples(s3_data / split)
    for s in samples:
        ids, labels, cut = s["input_ids"].tolist(), s["labels"].tolist(), int(s["prompt_length"])
        words = _words(tok, ids)
        prompt = [w for w in words[:cut] if w != "<pad>"]
        assert words[: cut - len(prompt)] == ["<pad>"] * (cut - len(prompt))  # left padding only
        assert prompt[-1] == "=" and len(prompt) - 1 == int(s["difficulty"])
        prefixes = _solve_s3(prompt[:-1])
        assert [int(w) for w in words[cut:]] == prefixes[-1]
        expected = [IGNORE] * len(ids)
        expected[cut:] = ids[cut:]  # the answer, predicted from "=" onwards
        if split == "train":  # position of g_i predicts the running product g1..gi, i < k
            first = cut - len(prompt)
            for i, images in enumerate(prefixes[:-1]):
                expected[first + i + 1] = tok.convert_tokens_to_ids("p" + "".join(map(str, images)))
        assert labels == expected
    assert len(samples) == (3000 if split == "train" else 480)


def test_s3_eval_is_held_out_where_possible(s3_data):
    def prompts(split):
        return [(int(s["difficulty"]), tuple(s["input_ids"][:9].tolist())) for s in read_samples(s3_data / split)]

    train, evaluation = set(prompts("train")), prompts("eval")
    report = manifest(s3_data / "eval")["eval_prompts"]
    for k in range(4, 9):  # 6**k prompts: enough to hold 60 out of ~375 train samples per k
        held = [p for p in evaluation if p[0] == k]
        assert len(set(held)) == 60 and not train.intersection(held), k
        assert report[str(k)] == {"distinct_prompts": 60, "in_train": 0}
    assert report["1"] == {"distinct_prompts": 6, "in_train": 60}  # only 6 one-step prompts exist


def test_s3_output_does_not_depend_on_workers_and_reruns_are_no_ops(tmp_path, s3_data, capsys):
    args = [
        "synthetic",
        "--out",
        tmp_path / "w2",
        "--train-samples",
        3000,
        "--samples-per-part",
        1000,
        "--eval-per-difficulty",
        60,
        "--seed",
        7,
    ]
    assert run_cli(*args, "--workers", 2) == 0
    for split in ("train", "eval"):
        assert manifest(tmp_path / "w2" / split)["index_sha256"] == manifest(s3_data / split)["index_sha256"]
    capsys.readouterr()
    assert run_cli(*args) == 0
    assert "up to date" in capsys.readouterr().out
    assert run_cli(*args, "--seed", 8) == 1
    assert "seed: 7 -> 8" in capsys.readouterr().err


def _solve_pointer(words):
    pairs, query = words[:-3], words[-2]
    bindings = dict(zip(pairs[0::2], pairs[1::2]))
    assert len(bindings) == len(pairs) // 2  # each variable assigned once
    hops = 0
    while not query.isdigit():
        query = bindings[query]
        hops += 1
    return query, hops


def _solve_arith(words, modulus):
    value = int(words[0])
    for op, operand in zip(words[1:-1:2], words[2:-1:2]):
        value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op] % modulus
    return str(value), (len(words) - 2) // 2


@pytest.mark.parametrize(
    "task, params", [("pointer", ["--params", "distractors=3"]), ("arith", ["--params", "modulus=7"])]
)
def test_other_tasks_answers_by_independent_solver(tmp_path, task, params):
    out = tmp_path / task
    assert (
        run_cli(
            "synthetic",
            "--task",
            task,
            "--out",
            out,
            "--train-samples",
            400,
            "--eval-per-difficulty",
            20,
            "--min-difficulty",
            2,
            "--max-difficulty",
            5,
            *params,
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for split in ("train", "eval"):
        m = manifest(out / split)
        assert m["answer_length"] == 1 and m["difficulty_range"] == [2, 5]
        for s in read_samples(out / split):
            words = [w for w in _words(tok, s["input_ids"]) if w != "<pad>"]
            answer = words[-1]
            if task == "pointer":
                solved, k = _solve_pointer(words[:-1])
            else:
                solved, k = _solve_arith(words[:-1], 7)
            assert (solved, k) == (answer, int(s["difficulty"]))
            labels = s["labels"].tolist()
            assert labels[:-1] == [IGNORE] * (len(labels) - 1) and labels[-1] == s["input_ids"][-1]


def test_bad_task_parameters_are_named(tmp_path, capsys):
    assert run_cli("synthetic", "--task", "arith", "--out", tmp_path / "x", "--params", "modulos=7") == 1
    assert "params.modulos" in capsys.readouterr().err
    assert run_cli("synthetic", "--out", tmp_path / "x", "--max-difficulty", 100) == 1
    assert "difficulty range" in capsys.readouterr().err
    assert run_cli("synthetic", "--task", "pointer", "--out", tmp_path / "x", "--max-difficulty", 25) == 1
    assert "need more than the 26 variables" in capsys.readouterr().err
