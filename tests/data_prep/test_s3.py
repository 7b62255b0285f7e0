"""Remote output through a real (local) S3 endpoint: moto's threaded server on 127.0.0.1."""

import hashlib
import json
import os

import pytest
import torch

from data_prep.errors import DataPrepError
from pipeline.data import build_train_loader
from tests.data_prep.support import make_docs, manifest, read_samples, run_cli, take, text_args, write_jsonl

BUCKET = "melt-data"


@pytest.fixture(scope="module")
def s3():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def _keys(client, prefix):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def _object(client, key):
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_text_upload_read_back_rerun_and_overwrite(s3, tmp_path, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_docs(80))
    remote = f"s3://{BUCKET}/text"
    assert run_cli(*text_args(data, tokenizer_dir, remote, 16, "--workers", 2, "--shard-size", 4096)) == 0
    keys = _keys(s3, "text/")
    assert {"text/index.json", "text/manifest.json", "text/part-00000/shard.00000.mds"} <= set(keys)
    assert not any(".scratch" in k for k in keys)

    local = tmp_path / "local"
    assert run_cli(*text_args(data, tokenizer_dir, local, 16, "--shard-size", 4096)) == 0
    assert _object(s3, "text/index.json") == (local / "index.json").read_bytes()

    remote_loader = build_train_loader(remote, 4, 4, seed=1, cache_dir=str(tmp_path / "cache"))
    local_loader = build_train_loader(local, 4, 4, seed=1)
    for a, b in zip(take(remote_loader, 3), take(local_loader, 3)):
        assert torch.equal(a["input_ids"], b["input_ids"])

    capsys.readouterr()
    assert run_cli(*text_args(data, tokenizer_dir, remote, 16, "--shard-size", 4096)) == 0
    assert "up to date" in capsys.readouterr().out
    assert run_cli(*text_args(data, tokenizer_dir, remote, 8, "--shard-size", 4096)) == 1
    assert "seq_len: 16 -> 8" in capsys.readouterr().err
    assert run_cli(*text_args(data, tokenizer_dir, remote, 8, "--overwrite")) == 0
    assert json.loads(_object(s3, "text/manifest.json"))["seq_len"] == 8
    assert "text/part-00001/shard.00000.mds" not in _keys(s3, "text/")  # the old run's extra parts are gone


def test_interrupted_overwrite_leaves_no_complete_looking_dataset(s3, tmp_path, tokenizer_dir, capsys):
    good = write_jsonl(tmp_path / "a.jsonl", make_docs(40))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"title": "no text field"}\n')
    remote = f"s3://{BUCKET}/interrupted"
    assert run_cli(*text_args(good, tokenizer_dir, remote, 16)) == 0
    assert run_cli(*text_args([good, bad], tokenizer_dir, remote, 16, "--overwrite")) == 1
    assert "interrupted/manifest.json" not in _keys(s3, "interrupted/")
    with pytest.raises(DataPrepError, match="not a complete prepared dataset"):
        build_train_loader(remote, 4, 4, seed=0, cache_dir=str(tmp_path / "cache"))
    # What a run killed while uploading leaves: shards without a manifest. Not taken as done.
    s3.put_object(Bucket=BUCKET, Key="interrupted/part-00000/shard.00000.mds", Body=b"partial")
    capsys.readouterr()
    assert run_cli(*text_args(good, tokenizer_dir, remote, 16)) == 1
    assert "no complete dataset" in capsys.readouterr().err
    assert run_cli(*text_args(good, tokenizer_dir, remote, 16, "--overwrite")) == 0
    assert len(take(build_train_loader(remote, 4, 4, seed=0, cache_dir=str(tmp_path / "c2")), 2)) == 2


def test_synthetic_upload_has_splits_and_tokenizer(s3, tmp_path):
    remote = f"s3://{BUCKET}/s3task"
    assert run_cli("synthetic", "--out", remote, "--train-samples", 300, "--eval-per-difficulty", 5) == 0
    keys = set(_keys(s3, "s3task/"))
    assert {"s3task/train/manifest.json", "s3task/eval/manifest.json", "s3task/tokenizer/tokenizer.json"} <= keys
    local = tmp_path / "local"
    assert run_cli("synthetic", "--out", local, "--train-samples", 300, "--eval-per-difficulty", 5) == 0
    remote_index = _object(s3, "s3task/train/index.json")
    assert manifest(local / "train")["index_sha256"] == hashlib.sha256(remote_index).hexdigest()
    assert len(read_samples(local / "eval")) == 40
