"""SV-NUP: Shapley-value-based non-uniform pruning of large language models."""

__version__ = "0.1.0"
