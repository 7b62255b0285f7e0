"""The training-side reader (pipeline.data): batch contract, manifest check, resumption with
identical batches, and refusal of a mismatched fingerprint."""

import os

import pytest
import torch

from data_prep.errors import DataPrepError
from pipeline.data import DataResumeError, build_train_loader, prepare_streaming_env
from tests.data_prep.support import make_docs, run_cli, take, text_args, write_jsonl


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("reader")
    data = write_jsonl(root / "d.jsonl", make_docs(200, seed=11))
    for pack in ("concat", "pad"):
        assert run_cli(*text_args(data, tokenizer_dir, root / pack, 16, "--pack", pack, "--shard-size", 4096)) == 0
    assert run_cli("synthetic", "--out", root / "s3", "--train-samples", 500, "--eval-per-difficulty", 4) == 0
    return root


def test_batches_follow_the_contract(datasets):
    text = next(iter(build_train_loader(datasets / "concat", 4, 8, seed=0)))
    assert set(text) == {"input_ids", "labels"} and text["input_ids"].dtype == torch.long
    assert text["input_ids"].shape == (4, 16) and torch.equal(text["labels"], text["input_ids"])

    pad = next(iter(build_train_loader(datasets / "pad", 4, 4, seed=0, shuffle=False)))
    assert (pad["labels"] == -100).any() and not (pad["labels"][:, 0] == -100).any()
    kept = pad["labels"] != -100
    assert torch.equal(pad["labels"][kept], pad["input_ids"][kept])

    syn = next(iter(build_train_loader(datasets / "s3", 8, 8, seed=0, split="train")))
    assert set(syn) == {"input_ids", "labels", "difficulty", "prompt_length", "attention_mask"}
    assert syn["input_ids"].shape == syn["labels"].shape == (8, 12) and syn["labels"].dtype == torch.long
    assert syn["difficulty"].shape == (8,) and (syn["prompt_length"] == 9).all()
    # left padding is masked: a prompt of k permutations and "=" starts at 9 - (k + 1)
    starts = 9 - (syn["difficulty"] + 1)
    assert syn["attention_mask"].sum(-1).tolist() == (12 - starts).tolist()
    assert (syn["input_ids"][syn["attention_mask"] == 0] == 0).all()
    evaluation = next(iter(build_train_loader(datasets / "s3", 4, 4, seed=0, split="eval", shuffle=False)))
    assert evaluation["difficulty"].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("name, split", [("concat", None), ("s3", "train")])
def test_resumed_loader_yields_the_same_batches(datasets, name, split):
    def loader():
        return build_train_loader(datasets / name, 4, 8, seed=5, split=split)

    uninterrupted = take(loader(), 7)
    first = loader()
    take(first, 3)
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = take(resumed, 4)
    for expected, got in zip(uninterrupted[3:], rest, strict=True):
        assert torch.equal(expected["input_ids"], got["input_ids"])
        assert torch.equal(expected["labels"], got["labels"])
    assert state["fingerprint"]["seed"] == 5 and state["streaming"]["sample_in_epoch"] == 12


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seed": 6}, "seed"),
        ({"global_batch_size": 16}, "global_batch_size"),
        ({"num_canonical_nodes": 2}, "num_canonical_nodes"),
        ({"path": "pad"}, "index_sha256"),
    ],
)
def test_mismatched_fingerprint_is_refused(datasets, change, field):
    args = {"path": "concat", "micro_batch_size": 4, "global_batch_size": 8, "seed": 5, "num_canonical_nodes": 1}
    saved = build_train_loader(**{**args, "path": datasets / args["path"]})
    take(saved, 1)
    state = saved.state_dict()
    changed = {**args, **change}
    other = build_train_loader(**{**changed, "path": datasets / changed["path"]})
    with pytest.raises(DataResumeError, match=f"{field} \\(saved "):
        other.load_state_dict(state)
    with pytest.raises(DataResumeError, match="not a loader state"):
        other.load_state_dict(state["streaming"])


def test_incomplete_or_changed_dataset_is_refused(datasets, tmp_path):
    with pytest.raises(DataPrepError, match="not a complete prepared dataset"):
        build_train_loader(tmp_path, 4, 4, seed=0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("manifest.json", "index.json"):
        (copy / name).write_bytes((datasets / "concat" / name).read_bytes())
    (copy / "index.json").write_text((copy / "index.json").read_text().replace('"version"', '"version" ', 1))
    with pytest.raises(DataPrepError, match="index_sha256 differs"):
        build_train_loader(copy, 4, 4, seed=0)
    with pytest.raises(ValueError, match="not a multiple"):
        build_train_loader(datasets / "concat", 4, 6, seed=0)


def test_prepare_streaming_env_sets_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")  # so that monkeypatch restores the original state,
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # including the value the function under test sets
    monkeypatch.setenv("LOCAL_SIZE", "2")
    # Not cleaning here: on a shared machine that would unlink other live streaming datasets.
    assert prepare_streaming_env(clean_shared_memory=False) is False
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"
    monkeypatch.setenv("LOCAL_SIZE", "8")
    prepare_streaming_env(clean_shared_memory=False)
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"  # an explicit value is kept
