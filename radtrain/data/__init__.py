"""Data: sources, label space, tokenization cache, batching, synthetic demo captions."""
