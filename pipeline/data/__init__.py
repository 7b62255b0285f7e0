"""Training-side reader of datasets prepared by data_prep (MDS shards + manifest.json)."""

from pipeline.data.env import prepare_streaming_env
from pipeline.data.loader import Collate, DataResumeError, FingerprintedLoader, LoaderFingerprint, build_train_loader

__all__ = [
    "Collate",
    "DataResumeError",
    "FingerprintedLoader",
    "LoaderFingerprint",
    "build_train_loader",
    "prepare_streaming_env",
]
