"""The text stage: counts, windows, read-back, determinism, sources and the pad mode."""

import gzip
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.data_prep.support import (
    independent_stream,
    make_docs,
    manifest,
    read_samples,
    run_cli,
    take,
    text_args,
    write_jsonl,
)


def test_concat_counts_windows_and_round_trip(tmp_path, tokenizer_dir, tokenizer):
    docs = make_docs(120, seed=1)
    out = tmp_path / "out"
    assert run_cli(*text_args(write_jsonl(tmp_path / "docs.jsonl", docs), tokenizer_dir, out, 32)) == 0

    stream = independent_stream(tokenizer, docs)
    m = manifest(out)
    assert (m["documents"], m["tokens"]) == (len(docs), len(stream))
    assert m["windows"] == len(stream) // 32 and m["dropped_tokens"] == len(stream) % 32
    assert m["columns"] == {"input_ids": "ndarray:uint16:32"} and m["kind"] == "text"

    samples = read_samples(out)
    assert len(samples) == m["windows"]
    assert all(s["input_ids"].shape == (32,) and s["input_ids"].dtype == np.uint16 for s in samples)
    read_back = np.concatenate([s["input_ids"] for s in samples]).tolist()
    assert read_back == stream[: len(read_back)]
    # The text survives: every complete document decodes back to itself.
    decoded = tokenizer.decode(read_back).split(tokenizer.eos_token)[:-1]
    assert decoded == docs[: len(decoded)] and len(decoded) > 100


def test_same_samples_and_index_whatever_the_workers_and_task_size(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "docs.jsonl", make_docs(400, seed=2))
    runs = {
        "w1": ["--workers", 1],
        "w2": ["--workers", 2, "--part-chars", 700],
        "w2b": ["--workers", 2, "--part-chars", 5000],
    }
    for name, extra in runs.items():  # a small shard size makes several output parts
        assert run_cli(*text_args(data, tokenizer_dir, tmp_path / name, 16, "--shard-size", 4096, *extra)) == 0
    reference = manifest(tmp_path / "w1")
    assert reference["parts"] > 2
    samples = [s["input_ids"].tolist() for s in read_samples(tmp_path / "w1")]
    for name in ("w2", "w2b"):
        assert manifest(tmp_path / name)["index_sha256"] == reference["index_sha256"]
        assert [s["input_ids"].tolist() for s in read_samples(tmp_path / name)] == samples
        assert (tmp_path / name / "part-00001" / "shard.00000.mds").read_bytes() == (
            tmp_path / "w1" / "part-00001" / "shard.00000.mds"
        ).read_bytes()


def test_txt_jsonl_gz_parquet_and_datasets_give_the_same_windows(tmp_path, tokenizer_dir):
    import datasets

    docs = make_docs(30, seed=3)
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, doc in enumerate(docs):  # a .txt file is one document; files are read in sorted order
        (txt / f"{i:03d}.txt").write_text(doc)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as handle:
        handle.write(write_jsonl(tmp_path / "plain.jsonl", docs).read_text())
    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "data_dir").mkdir()  # a plain data folder, loaded by datasets.load_dataset
    shutil.copy(tmp_path / "docs.parquet", tmp_path / "data_dir" / "train.parquet")

    sources = {
        "txt": ["--input", txt],
        "gz": ["--input", tmp_path / "docs.jsonl.gz"],
        "parquet": ["--input", tmp_path / "docs.parquet"],
        "saved": ["--dataset", tmp_path / "saved"],
        "hf_dir": ["--dataset", tmp_path / "data_dir"],
    }
    hashes = {}
    for name, source in sources.items():
        out = tmp_path / f"out_{name}"
        assert run_cli("text", *source, "--tokenizer", tokenizer_dir, "--seq-len", 16, "--out", out) == 0, name
        hashes[name] = manifest(out)["index_sha256"]
        assert manifest(out)["documents"] == len(docs)
    assert len(set(hashes.values())) == 1, hashes


def test_max_docs_and_glob(tmp_path, tokenizer_dir, tokenizer):
    docs = make_docs(40, seed=4)
    write_jsonl(tmp_path / "a.jsonl", docs[:20])
    write_jsonl(tmp_path / "b.jsonl", docs[20:])
    out = tmp_path / "out"
    assert run_cli(*text_args(str(tmp_path / "*.jsonl"), tokenizer_dir, out, 8, "--max-docs", 25)) == 0
    assert manifest(out)["documents"] == 25
    assert manifest(out)["tokens"] == len(independent_stream(tokenizer, docs[:25]))


def test_pad_mode_one_window_per_document_with_loss_mask(tmp_path, tokenizer_dir, tokenizer):
    docs = make_docs(25, seed=5, min_words=1, max_words=30)
    out = tmp_path / "pad"
    assert run_cli(*text_args(write_jsonl(tmp_path / "d.jsonl", docs), tokenizer_dir, out, 24, "--pack", "pad")) == 0
    m = manifest(out)
    lengths = [len(independent_stream(tokenizer, [d])) for d in docs]
    assert m["windows"] == len(docs) and m["columns"]["loss_mask"] == "ndarray:uint8:24"
    assert m["dropped_tokens"] == sum(max(0, n - 24) for n in lengths) > 0
    assert m["truncated_documents"] == sum(n > 24 for n in lengths)
    for doc, n, sample in zip(docs, lengths, read_samples(out)):
        kept = min(n, 24)
        assert sample["loss_mask"].tolist() == [1] * kept + [0] * (24 - kept)
        assert sample["input_ids"][:kept].tolist() == independent_stream(tokenizer, [doc])[:kept]
        assert set(sample["input_ids"][kept:].tolist()) <= {m["pad_token_id"]}
    # the loader's batches say which tokens are real (the document; segment 1) for the losses' counts
    from pipeline.data import build_train_loader
    from pipeline.training.losses import TokenCounts

    batch = take(build_train_loader(out, 4, 4, seed=0, shuffle=False), 1)[0]
    assert set(batch) == {"input_ids", "labels", "segment_ids"}
    kept = [min(n, 24) for n in lengths[:4]]
    assert batch["segment_ids"].tolist() == [[1] * k + [0] * (24 - k) for k in kept]
    assert TokenCounts.of(batch).real == sum(kept)
