"""Arithmetic about runs: FLOPs per token, memory per device, inference-aware scaling plans."""
