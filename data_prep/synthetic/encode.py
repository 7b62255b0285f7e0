"""Problems -> fixed-length rows, and the word-level tokenizer of a task.

Row layout (seq_len = prompt_length + answer_length; no BOS/EOS in the rows):
``<pad>... prompt | answer``. Labels follow the Hugging Face convention (position i-1 is
trained to predict labels[i], -100 = ignored): the answer tokens, plus, when asked, the
task's intermediate targets (prompt word j's target goes to labels[position of j + 1]).
The vocabulary is ``<pad> <bos> <eos> <unk>`` (ids 0-3; the tokenizer needs them, the rows use
only <pad>) followed by the task's words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .tasks import Problem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID = 0
IGNORE = -100


def vocabulary(words: list[str]) -> dict[str, int]:
    return {word: i for i, word in enumerate(SPECIALS + words)}


def build_tokenizer(words: list[str], seq_len: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one token per whitespace-separated word) for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocabulary(words), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=seq_len,
        padding_side="left",
    )


@dataclass(frozen=True)
class RowLayout:
    prompt_length: int
    answer_length: int
    vocab: dict[str, int]

    @property
    def seq_len(self) -> int:
        return self.prompt_length + self.answer_length

    @property
    def labels_dtype(self) -> str:
        return "int16" if len(self.vocab) < 1 << 15 else "int32"

    def encode(self, problem: Problem, intermediate: bool) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` (uint16) and ``labels`` of one problem."""
        ids = np.full(self.seq_len, PAD_ID, dtype=np.uint16)
        start = self.prompt_length - len(problem.prompt)
        if start < 0 or len(problem.answer) != self.answer_length:
            raise ValueError(f"problem does not fit the layout: {problem}")
        ids[start:] = [self.vocab[w] for w in problem.prompt + problem.answer]
        labels = np.full(self.seq_len, IGNORE, dtype=self.labels_dtype)
        labels[self.prompt_length :] = ids[self.prompt_length :]
        if intermediate and problem.intermediate:
            for j, target in enumerate(problem.intermediate):
                if target is not None:
                    labels[start + j + 1] = self.vocab[target]
        return ids, labels
