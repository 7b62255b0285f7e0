"""Padding of fixed-length rows: synthetic tasks pad prompts on the left, `text --pack pad` and chat
pad rows on the right."""

import torch


def leading_pad_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Attention mask: 1 for real tokens, 0 for the left padding (only leading pads are padding,
    so a pad id inside the text stays a token)."""
    return (~(ids == pad_id).int().cumprod(-1).bool()).long()


def left_pad_id(manifest: dict):
    """The pad id of a dataset whose rows are left-padded (synthetic tasks), else None."""
    return manifest.get("pad_token_id") if manifest.get("kind") == "synthetic" else None


def segments_from_loss_mask(manifest: dict) -> bool:
    """A dataset of one document per right-padded row (`text --pack pad`): its loss_mask, 1 on the
    document and 0 on the padding, is the row's segment ids (chat datasets have their own column)."""
    return manifest.get("kind") == "text" and "loss_mask" in manifest["columns"]
