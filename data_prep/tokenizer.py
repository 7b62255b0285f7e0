"""Hugging Face tokenizers: loading with the checks the stage needs, hashing, batch encoding,
and training a byte-level BPE."""

from __future__ import annotations

import hashlib
import json
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .errors import DataPrepError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# transformers' "no limit" sentinel for model_max_length is ~1e30.
_NO_MAX_LENGTH = 1e29
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:  # OSError, ValueError, ... depending on what is missing
        raise DataPrepError(f"cannot load tokenizer {name_or_path!r}: {err}") from None
    if not tok.is_fast:
        raise DataPrepError(f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer; save it with tokenizer.json")
    if tok.eos_token_id is None:
        raise DataPrepError(
            f"tokenizer {name_or_path!r} has no EOS token (eos_token in "
            "special_tokens_map.json); documents could not be separated"
        )
    return tok


def pad_id(tok: PreTrainedTokenizerFast) -> int:
    """The id that pads rows: the tokenizer's pad token, else EOS."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def tokenizer_sha256(tok: PreTrainedTokenizerFast, chat_template: str | None = None) -> str:
    """Hash of what decides the ids: the Rust tokenizer and the special tokens (and, for chat,
    the template that renders the conversations)."""
    state = {
        "tokenizer": json.loads(tok.backend_tokenizer.to_str()),
        "special": tok.special_tokens_map,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
    }
    if chat_template is not None:
        state["chat_template"] = chat_template
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    fits16 = vocab_size <= 1 << 16
    if requested == "uint16" and not fits16:
        raise DataPrepError(
            f"--dtype uint16: the vocabulary has {vocab_size} tokens, more than "
            "uint16 holds (65536); use uint32 or auto"
        )
    return np.dtype(np.uint16 if (requested == "uint16" or (requested == "auto" and fits16)) else np.uint32)


def check_seq_len(tok: PreTrainedTokenizerFast, seq_len: int, name: str) -> None:
    limit = tok.model_max_length
    if limit < _NO_MAX_LENGTH and seq_len > limit:
        raise DataPrepError(
            f"--seq-len {seq_len} exceeds the maximum length of tokenizer {name!r} "
            f"({limit}, model_max_length in tokenizer_config.json)"
        )


def encode_batch(tok: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """The tokenizer's own batch encoding (one Rust call), without special tokens."""
    return tok(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )["input_ids"]


def encode_documents(tok: PreTrainedTokenizerFast, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids, each followed by EOS, as one flat array, plus each document's end."""
    ids = encode_batch(tok, texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    body = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    flat = np.insert(body, np.cumsum(lengths), tok.eos_token_id)
    return flat, np.cumsum(lengths + 1)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int,
    out: Path,
    chat_template: str | None = None,
    chat_specials: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) saved for AutoTokenizer, EOS = BOS = UNK = <|endoftext|>;
    with ``chat_template``, that template is stored and ``chat_specials`` (e.g. <|im_start|>,
    <|im_end|>) are special tokens, one id each, after EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD, *chat_specials],
        show_progress=True,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        **({"additional_special_tokens": list(chat_specials)} if chat_specials else {}),
    )
    tok.chat_template = chat_template
    tok.save_pretrained(str(out))
    return tok
