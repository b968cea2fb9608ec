"""Evaluation: corpora and their held-out windows, perplexity, zero-shot accuracy, speed and size."""
