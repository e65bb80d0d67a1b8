"""Checkpoints in and out: loading any checkpoint form, Hugging Face conversion, generation."""
