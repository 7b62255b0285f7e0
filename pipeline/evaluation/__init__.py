"""Evaluation of exported models: perplexity, per-loop perplexity, exit distribution,
exact-match accuracy by generation per difficulty, KV-cache bytes and decode speed."""
