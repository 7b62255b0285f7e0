"""Memory planning: counting the bytes a training step holds, with real or fake tensors."""
