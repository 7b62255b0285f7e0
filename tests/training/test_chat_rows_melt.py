"""What `data_prep chat`'s row layouts mean for MELT (README, "Post-training on your reasoning
traces"): every row has the dataset's row length, so chunk boundaries sit at the same positions in
every row, and a conversation's outputs do not depend on what follows it in its row (padding, or
other conversations: `--pack pad` trains each conversation alone); in a packed row a later
conversation attends to the earlier ones, their final slots included, as packed documents do (no
document mask)."""

from __future__ import annotations

import torch

from pipeline.models import MeltForCausalLM
from tests.model_helpers import random_gates, tiny_looplm

CHUNK = 4


def melt_logits(melt: MeltForCausalLM, row: list[int]) -> torch.Tensor:
    return melt(torch.tensor([row])).logits[0]


def test_padding_after_a_conversation_never_changes_it_and_packing_lets_the_next_read_it():
    torch.manual_seed(0)
    melt = random_gates(MeltForCausalLM.from_looplm(tiny_looplm(), chunk_size=CHUNK, alpha=1.0).eval())
    vocab = melt.config.vocab_size
    first, second = torch.randint(1, vocab, (7,)).tolist(), torch.randint(1, vocab, (6,)).tolist()
    pad = 0
    with torch.no_grad():
        alone = melt_logits(melt, second + [pad] * 10)  # rows of 16 tokens = 4 chunks
        followed = melt_logits(melt, second + first + [pad] * 3)
        packed = melt_logits(melt, first + second + [pad] * 3)  # the second starts mid-chunk
    torch.testing.assert_close(alone[:6], followed[:6], rtol=0, atol=0)
    assert not torch.allclose(packed[7:13], alone[:6], atol=1e-3)  # it attends to the first conversation
