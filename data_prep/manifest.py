"""manifest.json: what a prepared dataset holds and how it was made; written last, so its
presence marks a complete dataset. Also read by the training-side loader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import DataPrepError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"


def fingerprint(kind: str, arguments: dict[str, Any], tokenizer_sha256: str, inputs: Any) -> str:
    """Identity of a dataset: same fingerprint = same shards (rerun is a no-op)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "arguments": arguments,
        "tokenizer_sha256": tokenizer_sha256,
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any], semantic: list[str]) -> list[str]:
    """What makes manifest ``new`` a different dataset from ``old`` (for the refusal message)."""
    found = [
        f"{key}: {old.get('arguments', {}).get(key)!r} -> {new['arguments'].get(key)!r}"
        for key in semantic
        if old.get("arguments", {}).get(key) != new["arguments"].get(key)
    ]
    if old.get("tokenizer", {}).get("sha256") != new["tokenizer"]["sha256"]:
        found.append("tokenizer (content hash)")
    if old.get("inputs") != new.get("inputs"):
        found.append("inputs (files, sizes or modification times)")
    if old.get("format_version") != FORMAT_VERSION:
        found.append(f"format_version: {old.get('format_version')} -> {FORMAT_VERSION}")
    return found or ["kind or other settings"]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename): the manifest is the completion marker."""
    target = Path(directory) / MANIFEST
    tmp = target.with_suffix(".json.tmp")
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def load_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or unreadable (an interrupted write)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete dataset, checked against its index; a clear error otherwise."""
    directory = Path(directory)
    manifest = load_json(directory / MANIFEST)
    if manifest is None:
        raise DataPrepError(
            f"{directory}: no readable {MANIFEST}; not a complete prepared dataset "
            "(an interrupted run, or not made by data_prep)"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataPrepError(
            f"{directory / MANIFEST}: format_version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    index = directory / INDEX
    if not index.exists() or file_sha256(index) != manifest.get("index_sha256"):
        raise DataPrepError(
            f"{index}: missing or changed since {MANIFEST} was written "
            "(index_sha256 differs); prepare the dataset again"
        )
    return manifest


def tokenizer_location(directory: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """The tokenizer to load for a dataset: a path relative to the dataset directory
    (synthetic data: "../tokenizer"), an absolute path, or a hub name."""
    name = manifest["tokenizer"]["name_or_path"]
    relative = Path(directory) / name
    return str(relative.resolve()) if not Path(name).is_absolute() and relative.exists() else name
