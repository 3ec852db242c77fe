"""lmforge: the whole LLM training pipeline from one config."""

__version__ = "0.1.0"
