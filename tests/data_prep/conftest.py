"""Fixtures shared by data_prep's tests: its trained tokenizers (module- and session-scoped)."""

from tests.data_prep.support import chat_tokenizer_dir, tokenizer, tokenizer_dir  # noqa: F401
