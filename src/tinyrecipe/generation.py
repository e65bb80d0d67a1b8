"""Generation with the KV cache: greedy, temperature, top-k and top-p sampling, from any
checkpoint tinyrecipe reads (`tinyrecipe generate` is its command line)."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

from tinyrecipe.checkpoint import load_tinyrecipe_checkpoint
from tinyrecipe.model import Llama


def load_checkpoint_model(path: str | Path) -> Llama:
    """The decoder of a tinyrecipe checkpoint, in eval mode (weights_only loading)."""
    config, state = load_tinyrecipe_checkpoint(path)
    model = Llama(config)
    model.load_state_dict(state)
    return model.eval()


def _next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator
) -> torch.Tensor:
    """Pick from logits (B, vocab): argmax at temperature 0, else top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


def compile_options(device: torch.device) -> dict:
    """How `generate(compile=True)` compiles a decoding step: one graph (a break would split
    it), fixed shapes, and on a GPU CUDA graphs (one launch per token instead of hundreds)."""
    options = {"fullgraph": True, "dynamic": False}
    if device.type == "cuda":
        options["mode"] = "reduce-overhead"
    return options


_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_cache(model: Llama, batch: int) -> list:
    """A static cache for `batch` rows, reused by every compiled generation of `model` (emptied,
    not reallocated): CUDA graphs replay fixed addresses, so the buffers are marked static and
    keep their addresses from one call to the next."""
    caches = _STATIC_CACHES.setdefault(model, {})
    weight = model.embed.weight
    cache = caches.get(batch)
    if cache is None or cache[0].k.dtype != weight.dtype or cache[0].k.device != weight.device:
        cache = caches[batch] = model.new_kv_cache(batch, static=True)
        for block_cache in cache:
            for tensor in (block_cache.k, block_cache.v, block_cache.length):
                torch._dynamo.mark_static_address(tensor, guard=False)
    for block_cache in cache:
        block_cache.length.zero_()  # what lies beyond the position is masked
    return cache


EOS_CHECK_EVERY = 16  # new tokens between looks for EOS: the host reads the device that seldom


@torch.no_grad()
def generate(
    model: Llama,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> torch.Tensor:
    """Append up to `max_new_tokens` to idx (B, T), stopping at the context length or after the
    first position where every row drew `eos_id` (looked for every `EOS_CHECK_EVERY` tokens, the
    tokens drawn past it dropped: no host sync per token); temperature 0 is greedy. With `use_cache` each new token costs one position's
    work (KV cache); without it the whole sequence is recomputed (the reference). `compile`:
    each new token runs one `torch.compile`d graph over a static cache of the whole context
    (compiled once per batch size; the prompt runs eagerly), instead of some 15 kernels per
    layer launched from Python."""
    if compile and not use_cache:
        raise ValueError("compile=True decodes with the KV cache; drop use_cache=False")
    if idx.size(1) > model.config.block_size:
        raise ValueError(
            f"the prompt has {idx.size(1)} tokens, more than the model's context "
            f"(block_size {model.config.block_size})"
        )
    total = min(model.config.block_size, idx.size(1) + max_new_tokens)
    cache, step = None, model
    if compile:  # a static cache spans the whole context: one graph for every prompt length
        cache = _static_cache(model, idx.size(0))
        step = torch.compile(model, **compile_options(model.embed.weight.device))
    elif use_cache:
        cache = model.new_kv_cache(idx.size(0), total)
    logits = model(idx, cache=cache).logits[:, -1]
    checked = idx.size(1)  # columns before it hold no column of EOS in every row
    while idx.size(1) < total:
        nxt = _next_token(logits.float(), temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt], dim=1)
        if idx.size(1) >= total:
            break
        if eos_id is not None and idx.size(1) - checked >= EOS_CHECK_EVERY:
            if (stop := _eos_column(idx, checked, eos_id)) is not None:
                return idx[:, : stop + 1]
            checked = idx.size(1)
        logits = (step(nxt, cache=cache) if use_cache else model(idx)).logits[:, -1]
    if eos_id is not None and (stop := _eos_column(idx, checked, eos_id)) is not None:
        return idx[:, : stop + 1]
    return idx


def _eos_column(idx: torch.Tensor, start: int, eos_id: int) -> int | None:
    """The first column from `start` on where every row is `eos_id` (one host read), or None."""
    hits = (idx[:, start:] == eos_id).all(0).nonzero()
    return start + int(hits[0]) if hits.numel() else None


def continuation(tok, prompt: str, prompt_ids: list[int], new_ids: list[int]) -> str:
    """`prompt` verbatim plus the text the new tokens add. Decoding the new tokens alone would
    drop the space a Llama-style decoder strips from the start of a text ("def" + "write")."""
    before = tok.decode(prompt_ids)
    return prompt + tok.decode(prompt_ids + new_ids)[len(before) :]
