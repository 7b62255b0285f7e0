"""Left padding of fixed-length rows (synthetic tasks pad prompts on the left)."""

import torch


def leading_pad_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Attention mask: 1 for real tokens, 0 for the left padding (only leading pads are padding,
    so a pad id inside the text stays a token)."""
    return (~(ids == pad_id).int().cumprod(-1).bool()).long()


def left_pad_id(manifest: dict):
    """The pad id of a dataset whose rows are left-padded (synthetic tasks), else None."""
    return manifest.get("pad_token_id") if manifest.get("kind") == "synthetic" else None
