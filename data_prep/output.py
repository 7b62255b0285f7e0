"""Where a dataset is written, and the rules around it: a rerun with the same fingerprint is a
no-op, a different dataset is refused without --overwrite, and an interrupted run never leaves
something that looks complete.

Local output is built in a hidden sibling (``.NAME.partial``) and renamed into place at the
end. Remote output (s3://) is staged in a local temporary directory; MDSWriter uploads the
shards as it goes and the manifests, the completion markers, are uploaded last. One run per
output at a time: a new run removes a leftover ``.partial`` of an interrupted one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import DataPrepError
from .manifest import differences, load_json


@dataclass(frozen=True)
class Location:
    """A directory being written: local files, mirrored to ``remote`` when set."""

    local: Path
    remote: str | None = None

    def sub(self, name: str) -> Location:
        return Location(self.local / name, f"{self.remote}/{name}" if self.remote else None)

    @property
    def mds_out(self) -> str | tuple[str, str]:
        """The ``out`` argument of MDSWriter / merge_index."""
        return str(self.local) if self.remote is None else (str(self.local), self.remote)

    def upload(self, relpath: str) -> None:
        """Mirror one local file (not written by MDSWriter) to the remote."""
        if self.remote is not None:
            from streaming.base.storage.upload import CloudUploader

            CloudUploader.get(self.mds_out, keep_local=True, exist_ok=True).upload_file(relpath)


def is_remote(out: str) -> bool:
    return urllib.parse.urlparse(out).scheme not in ("", "file")


class LocalTarget:
    def __init__(self, out: str):
        self.out = Path(out).absolute()
        self.partial = self.out.with_name(f".{self.out.name}.partial")
        self.old = self.out.with_name(f".{self.out.name}.old")

    def read(self, relpath: str) -> dict[str, Any] | None:
        return load_json(self.out / relpath)

    def is_empty(self) -> bool:
        return not self.out.exists() or not any(self.out.iterdir())

    def stage(self, overwrite: bool) -> Location:
        for leftover in (self.partial, self.old):
            shutil.rmtree(leftover, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return Location(self.partial)

    def publish(self, manifests: list[str]) -> None:
        if self.out.exists():
            os.rename(self.out, self.old)
        os.rename(self.partial, self.out)
        shutil.rmtree(self.old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def __str__(self) -> str:
        return str(self.out)


class RemoteTarget:
    def __init__(self, out: str):
        from streaming.base.storage.upload import CloudUploader

        self.out = out.rstrip("/")
        self.staging = Path(tempfile.mkdtemp(prefix="data_prep-"))
        try:
            self.uploader = CloudUploader.get((str(self.staging), self.out), keep_local=True, exist_ok=True)
        except Exception as err:  # bad scheme, missing bucket, no credentials
            shutil.rmtree(self.staging, ignore_errors=True)
            raise DataPrepError(f"cannot write to {out}: {err}") from None

    def read(self, relpath: str) -> dict[str, Any] | None:
        from streaming.base.storage.download import CloudDownloader

        local = Path(tempfile.mkdtemp(prefix="data_prep-")) / "file.json"
        try:
            CloudDownloader.direct_download(f"{self.out}/{relpath}", str(local))
            return load_json(local)
        except Exception:  # missing object: the error type depends on the provider
            return None
        finally:
            shutil.rmtree(local.parent, ignore_errors=True)

    def _keys(self) -> list[str]:
        """Keys of the objects under ``out`` (not those of a sibling like ``out2/``)."""
        prefix = urllib.parse.urlparse(self.out).path.strip("/")
        prefix = prefix + "/" if prefix else ""
        return [k for k in self.uploader.list_objects() or [] if k.startswith(prefix)]

    def is_empty(self) -> bool:
        return not self._keys()

    def stage(self, overwrite: bool) -> Location:
        if overwrite and not self.is_empty():
            self._clear()
        return Location(self.staging, self.out)

    def _clear(self) -> None:
        """Delete the old dataset, manifests first so that it stops looking complete at once."""
        if not self.out.startswith("s3://"):
            raise DataPrepError(
                f"--overwrite of {self.out}: only s3:// outputs can be cleared here; delete the prefix yourself"
            )
        bucket = urllib.parse.urlparse(self.out).netloc
        keys = sorted(self._keys(), key=lambda k: not k.endswith("manifest.json"))
        for start in range(0, len(keys), 1000):
            self.uploader.s3.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]}
            )

    def publish(self, manifests: list[str]) -> None:
        for relpath in manifests:
            self.uploader.upload_file(relpath)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __str__(self) -> str:
        return self.out


def target_for(out: str) -> LocalTarget | RemoteTarget:
    return RemoteTarget(out) if is_remote(out) else LocalTarget(out)


def build_once(
    out: str,
    manifests: list[str],
    expected: dict[str, Any],
    semantic: list[str],
    overwrite: bool,
    build: Callable[[Location], None],
) -> bool:
    """Run ``build`` into a staging location and publish it, unless ``out`` already holds the
    dataset whose manifests carry ``expected['fingerprint']``. Returns whether it built."""
    target = target_for(out)
    try:
        existing = [target.read(m) for m in manifests]
        if all(m is not None and m.get("fingerprint") == expected["fingerprint"] for m in existing):
            return False
        if not target.is_empty() and not overwrite:
            old = next((m for m in existing if m is not None), None)
            why = (
                "it holds no complete dataset (an interrupted run?)"
                if old is None
                else "it holds a different dataset: " + "; ".join(differences(old, expected, semantic))
            )
            raise DataPrepError(f"{target} is not empty and {why}. Pass --overwrite to replace it.")
        location = target.stage(overwrite)
        build(location)
        target.publish(manifests)
        return True
    finally:
        target.discard()
