"""Evaluation: corpora and held-out windows, perplexity, zero-shot accuracy, speed and size."""
