"""Typed configs of the subcommands, validated at load (YAML file and/or CLI flags).

Every field is both a YAML key and a CLI flag (``seq_len`` <-> ``--seq-len``); relative paths
are relative to the working directory in both cases.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from config_loader import read_yaml

from .errors import DataPrepError

INPUT_HELP = "files, directories or globs (.txt = one document, .jsonl, .jsonl.gz, .parquet)"
BAD_DOC_HELP = "a bad document (no text field, not UTF-8, bad JSON) stops the run, or is skipped and counted"


class PrepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields that do not change the output bytes: left out of the dataset fingerprint, so a
    # rerun with e.g. more workers is still a no-op.
    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset()

    def semantic_arguments(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.NON_SEMANTIC}


class WriteConfig(PrepConfig):
    """Options shared by every subcommand that writes MDS shards."""

    NON_SEMANTIC: ClassVar[frozenset[str]] = frozenset({"out", "workers", "overwrite"})

    out: str = Field(description="output directory: a local path or s3://bucket/prefix")
    workers: int = Field(1, ge=1, description="worker processes (the output does not depend on it)")
    compression: str | None = Field(None, description="MDS shard compression, e.g. zstd or zstd:7")
    hashes: list[str] = Field(["sha1"], description="hashes stored in the MDS index, sorted")
    shard_size: int = Field(1 << 26, ge=1 << 12, lt=1 << 32, description="bytes per MDS shard")
    overwrite: bool = Field(False, description="replace a different dataset already in --out")

    @field_validator("compression")
    @classmethod
    def _known_compression(cls, value: str | None) -> str | None:
        from streaming.base.compression import get_compressions, is_compression

        if value in (None, "", "none"):
            return None
        if not is_compression(value):
            raise ValueError(f"unknown compression {value!r}; one of {sorted(get_compressions())}")
        return value

    @field_validator("hashes")
    @classmethod
    def _known_hashes(cls, value: list[str]) -> list[str]:
        from streaming.base.hashing import get_hashes, is_hash

        bad = [h for h in value if not is_hash(h)]
        if bad:
            raise ValueError(f"unknown hash {bad}; known: {sorted(get_hashes())}")
        return sorted(set(value))


class RowsConfig(WriteConfig):
    """Options shared by the commands that tokenize a source into rows (text, chat)."""

    NON_SEMANTIC: ClassVar[frozenset[str]] = WriteConfig.NON_SEMANTIC | {"part_chars"}

    input: list[str] | None = Field(None, description=INPUT_HELP)
    dataset: str | None = Field(None, description="a `datasets` dataset: hub name, data folder or saved dataset")
    split: str = Field("train", description="dataset split (with --dataset)")
    subset: str | None = Field(None, description="dataset configuration name (with --dataset)")
    tokenizer: str = Field(description="AutoTokenizer directory or name (fast tokenizer with an EOS token)")
    seq_len: int = Field(ge=2, description="tokens per row")
    max_docs: int | None = Field(None, ge=1, description="stop after this many documents (rows of the input)")
    on_bad_doc: Literal["error", "skip"] = Field("error", description=BAD_DOC_HELP)
    dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto", description="input_ids dtype; auto = uint16 when the vocabulary fits"
    )
    part_chars: int = Field(1_000_000, ge=1, description="characters per tokenization task (load balancing only)")

    @model_validator(mode="after")
    def _one_source(self) -> RowsConfig:
        if (self.input is None) == (self.dataset is None):
            raise ValueError("give exactly one of input (files) or dataset")
        if self.input is not None and not self.input:
            raise ValueError("input is empty")
        return self


class TextConfig(RowsConfig):
    """``python -m data_prep text``: documents -> fixed windows of token ids."""

    text_field: str = Field("text", description="document field in .jsonl/.parquet/datasets rows")
    pack: Literal["concat", "pad"] = Field(
        "concat", description="concat: documents joined with EOS; pad: one padded window per document"
    )


class ChatConfig(RowsConfig):
    """``python -m data_prep chat``: conversations ({"messages": [{role, content}], "system"?}) ->
    rows of token ids with a loss mask on the assistant tokens (chat_layout.py)."""

    input: list[str] | None = Field(None, description="files, directories or globs (.jsonl, .jsonl.gz)")
    on_bad_doc: Literal["error", "skip"] = Field(
        "error", description="a malformed conversation stops the run, or is skipped and counted"
    )
    chat_template: str | None = Field(
        None, description="Jinja file replacing the tokenizer's chat template, or 'chatml'"
    )
    pack: Literal["packed", "pad"] = Field(
        "packed", description="packed: whole conversations greedily into rows; pad: one conversation per row"
    )
    long: Literal["drop", "truncate"] = Field(
        "drop",
        description="a conversation longer than --seq-len: dropped (default), or cut to its first "
        "seq_len tokens (dropped all the same when no assistant token is left)",
    )


class TaskConfig(PrepConfig):
    """Which problems of a synthetic task, shared by ``synthetic`` and ``synthetic-chat``."""

    task: Literal["s3", "pointer", "arith"] = Field("s3", description="s3 (default, calibrated), pointer or arith")
    seed: int = Field(0, ge=0, description="seed of the train split; the eval split uses a different stream")
    train_samples: int = Field(200_000, ge=1, description="samples in the train split")
    min_difficulty: int | None = Field(None, ge=1, description="smallest k (hops/steps); task default if unset")
    max_difficulty: int | None = Field(None, ge=1, description="largest k; task default if unset")
    eval_per_difficulty: int = Field(500, ge=1, description="eval samples per k")
    params: dict[str, int] = Field({}, description="task parameters KEY=VALUE (pointer: distractors; arith: modulus)")
    samples_per_part: int = Field(
        50_000, ge=1, description="train samples per generation task (one seed stream; synthetic: one MDS subfolder)"
    )


class SyntheticConfig(WriteConfig, TaskConfig):
    """``python -m data_prep synthetic``: a reasoning task -> DIR/train, DIR/eval, DIR/tokenizer."""

    running_product: bool = Field(
        True, description="s3: also supervise the running product at prompt positions (train split)"
    )


class SyntheticChatConfig(TaskConfig):
    """``python -m data_prep synthetic-chat``: a reasoning task as conversations in JSONL (the
    same problems as ``synthetic`` with the same seed), for ``chat`` and a GSM8K-style evaluation."""

    out: str = Field(description="JSONL file of the train conversations (.jsonl or .jsonl.gz)")
    eval_out: str | None = Field(None, description="JSONL file of the held-out eval conversations")
    system: str | None = Field(None, description="system prompt added to every conversation")
    trace: bool = Field(
        True,
        description="the assistant writes the task's intermediate steps (s3: running "
        "products) before '#### ' and the answer",
    )
    overwrite: bool = Field(False, description="replace existing output files")


class TrainTokenizerConfig(PrepConfig):
    """``python -m data_prep train-tokenizer``: byte-level BPE for AutoTokenizer."""

    input: list[str] = Field(description=INPUT_HELP)
    text_field: str = Field("text", description="document field in .jsonl/.parquet rows")
    vocab_size: int = Field(ge=300, le=1 << 20, description="vocabulary size, with the 256 byte tokens and specials")
    out: str = Field(description="output directory (local)")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge")
    max_docs: int | None = Field(None, ge=1, description="train on at most this many documents")
    on_bad_doc: Literal["error", "skip"] = Field("error", description=BAD_DOC_HELP)
    chat_template: str | None = Field(
        None, description="'chatml' (adds <|im_start|> and <|im_end|>) or a Jinja file: stored as the chat template"
    )
    overwrite: bool = Field(False, description="replace a non-empty --out")


class InspectConfig(PrepConfig):
    """``python -m data_prep inspect DIR``."""

    path: str = Field(description="a prepared dataset directory (or a synthetic root)")
    samples: int = Field(3, ge=0, description="decoded samples to show")


class BenchConfig(PrepConfig):
    """``python -m data_prep bench``."""

    out: str = Field(description="JSON file for the results")
    size_mb: float = Field(20.0, gt=0, description="size of the generated corpus (MB)")
    seq_len: int = Field(2048, ge=2, description="window length")
    vocab_size: int = Field(8192, ge=300, description="BPE vocabulary trained for the benchmark")
    workers: list[int] = Field([1, 2], description="worker counts to measure")
    repeats: int = Field(2, ge=1, description="runs of each measure; the best is reported (shared CPUs)")
    workdir: str | None = Field(None, description="scratch directory (default: a temporary one)")


def load_config(model: type[PrepConfig], config_file: str | None, flags: dict[str, Any]) -> Any:
    """Validate ``model`` from a YAML file (if any) overridden by the CLI flags actually given."""
    values: dict[str, Any] = {}
    if config_file is not None:
        document = read_yaml(config_file, error=DataPrepError)
        if document is not None and not isinstance(document, dict):
            raise DataPrepError(f"{config_file}: a config must be a mapping of keys to values")
        values = dict(document or {})
    values.update(flags)
    try:
        return model.model_validate(values)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(config)"
            where = "command line" if key.split(".")[0] in flags or config_file is None else config_file
            flag = "--" + key.split(".")[0].replace("_", "-")
            msg = "missing" if e["type"] == "missing" else e["msg"]
            lines.append(f"{where}: {key} ({flag}): {msg}")
        raise DataPrepError("invalid configuration:\n  " + "\n  ".join(lines)) from None
