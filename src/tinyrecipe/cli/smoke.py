"""`tinyrecipe smoke`: a one-minute check that an install trains (the shared training step on a
byte-level model, no prepared data needed).

Trains the `tiny` decoder shape with a byte vocabulary (256) on the running Python's own
documentation text (`pydoc_data.topics`, present wherever Python is), prints the loss falling,
tokens/s, and a greedy continuation.
"""

from __future__ import annotations

import argparse
import time

import torch

from tinyrecipe.generation import generate
from tinyrecipe.model import Llama, ModelConfig
from tinyrecipe.train.optim import build_adamw
from tinyrecipe.train.step import finish_step, micro_batch_loss


def stdlib_text_bytes() -> torch.Tensor:
    """The stdlib documentation topics as one uint8 tensor, in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="tinyrecipe smoke", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data = stdlib_text_bytes().long()
    config = ModelConfig.from_name("tiny", vocab_size=256, block_size=args.block)
    model = Llama(config)
    params = list(model.parameters())
    optimizer = build_adamw(model, args.lr)
    print(f"tiny decoder: {config.num_params():,} parameters, {len(data):,} bytes of stdlib docs")
    start, first = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(data) - args.block - 1, (args.batch,))
        window = torch.stack([data[o : o + args.block + 1] for o in offsets])
        loss = micro_batch_loss(model, {"input_ids": window[:, :-1], "labels": window[:, 1:]})
        loss.backward()
        finish_step(params, loss.detach(), 1, max_norm=1.0, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    elapsed = time.perf_counter() - start
    print(
        f"{args.steps * args.batch * args.block / elapsed:,.0f} tokens/s; loss {first:.3f} -> {loss.item():.3f}"
    )

    sample = generate(model.eval(), torch.tensor([list(b"The ")]), 60, temperature=0)
    print("sample:", bytes(sample[0].tolist()).decode("utf-8", errors="replace"))
    if not loss.item() < first:
        print("tinyrecipe smoke: the loss did not fall; the install is broken")
        return 1
    return 0
