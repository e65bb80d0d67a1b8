"""tinyrecipe: LLM pretraining recipes on PyTorch Lightning."""

__version__ = "0.1.0"
