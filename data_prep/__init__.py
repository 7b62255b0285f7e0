"""Data preparation: text, datasets and synthetic reasoning tasks into MDS shards.

Commands (each also takes ``--config FILE.yaml`` with the same keys; see configs/data/)::

    python -m data_prep train-tokenizer --input corpus/*.jsonl --vocab-size 8192 --out runs/tok
    python -m data_prep text --input corpus/*.jsonl --tokenizer runs/tok --seq-len 1024 --out runs/text
    python -m data_prep text --dataset some/saved_dataset --split train --tokenizer runs/tok ...
    python -m data_prep train-tokenizer ... --chat-template chatml        # + <|im_start|>/<|im_end|> and template
    python -m data_prep chat --input chats/*.jsonl --tokenizer runs/tok --seq-len 1024 --out runs/chat
    python -m data_prep synthetic-chat --out runs/s3_chat.jsonl --eval-out runs/s3_chat_eval.jsonl
    python -m data_prep synthetic --out runs/s3            # the S3 word problem (docs/data.md#6-synthetic-reasoning-tasks)
    python -m data_prep inspect runs/s3
    python -m data_prep bench --out bench.json

A dataset directory holds ``index.json`` (merged MDS index), ``part-NNNNN/`` shard folders and
``manifest.json``, written last (its presence means complete). Synthetic output is
``DIR/train``, ``DIR/eval`` (two such datasets) and ``DIR/tokenizer``. Read it for training
with ``pipeline.data.build_train_loader``.

Columns: ``input_ids`` (uint16 when the vocabulary fits, else uint32; seq_len each);
``loss_mask`` (uint8) for ``--pack pad`` and chat (1 on assistant tokens, with their end of
turn); chat adds ``segment_ids`` (uint16: conversation number in the row, 0 on padding);
synthetic adds ``labels`` (int16/int32, HF convention: position i-1 predicts labels[i], -100
ignored), ``difficulty`` and ``prompt_length`` (int32).
"""
