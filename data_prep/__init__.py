"""Data preparation: text, datasets and synthetic reasoning tasks into MDS shards."""
