"""lm-evaluation-harness runs an exported model on the local synthetic task and agrees with
our own generation accuracy on the same problems."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.evaluation.contenders import load_contender
from pipeline.evaluation.data import load_eval_split
from pipeline.evaluation.harness import run_harness
from pipeline.evaluation.metrics import generation_accuracy
from tests.model_helpers import tiny_looplm, write_eval_split

from .test_evaluation import _split


@pytest.mark.slow
def test_lm_eval_harness_matches_our_exact_match(tmp_path):
    lm = tiny_looplm()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )
    split = _split(lm)
    data = write_eval_split(tmp_path / "eval", split)
    lm.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    result = run_harness(tmp_path / "model", data, tmp_path / "work", batch_size=8)
    ours = generation_accuracy(load_contender("looplm", tmp_path / "model"), load_eval_split(data), 8)
    assert result["samples"] == len(split) == 24
    assert result["exact_match"] == ours["accuracy"] == 0.5
