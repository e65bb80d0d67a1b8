"""Hugging Face interop: conversion of checkpoints and LoRA adapters (to-hf, from-hf, to-peft)."""
