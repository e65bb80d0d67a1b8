"""`tinyrecipe generate`: text from any checkpoint tinyrecipe reads (`tinyrecipe.generation`).

    tinyrecipe generate --ckpt out/quickstart/checkpoints/last.ckpt \
        --tokenizer data/quickstart/tokenizer --prompt "def" --prompt "The" --max-new-tokens 60
    tinyrecipe generate --ckpt out/quickstart-sft/checkpoints/last.ckpt \
        --tokenizer data/quickstart/tokenizer --chat --prompt "What does len() return?"
"""

from __future__ import annotations

import argparse

import torch

from tinyrecipe.data.sft import format_prompt
from tinyrecipe.data.tokenizer import load_tokenizer
from tinyrecipe.generation import continuation, generate, load_checkpoint_model
from tinyrecipe.model import Llama


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--ckpt, --tokenizer, --device and --dtype, as every command that runs a trained model
    takes them (`load_model` reads them)."""
    parser.add_argument(
        "--ckpt", required=True, help="checkpoint file or directory, or a Hugging Face directory"
    )
    parser.add_argument(
        "--tokenizer", required=True, help="directory with tokenizer.json or tokenizer.model"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="auto: bfloat16 on a GPU that has it, else float32",
    )


def load_model(args: argparse.Namespace) -> Llama:
    """The checkpoint's decoder on --device in --dtype, in eval mode."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(auto if args.device == "auto" else args.device)
    except RuntimeError:
        raise ValueError(
            f"{args.device!r} is not a device for --device (auto, cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"no CUDA device on this machine for --device {args.device}; use cpu")
    dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    return load_checkpoint_model(args.ckpt).to(device=device, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="tinyrecipe generate",
        description="Sample a continuation of --prompt (top-k sampling at temperature 0.8 by "
        "default; --temperature 0 is greedy).",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        help="text to continue; repeat for several prompts, each sampled as if alone (default: "
        "one empty prompt)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="a fine-tuned model: each prompt is a user turn in the SFT template "
        "(tinyrecipe.data.sft), and the reply alone is printed, up to </s>",
    )
    parser.add_argument("--system", help="with --chat: a system message before each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode with one compiled graph per token (CUDA graphs on a GPU); compiling "
        "takes a while once, so it pays off for long or many generations",
    )
    args = parser.parse_args(argv)
    model = load_model(args)
    device = model.embed.weight.device
    tok = load_tokenizer(args.tokenizer)
    if args.system is not None and not args.chat:
        raise ValueError("a --system message needs --chat (it goes into the SFT template)")
    for i, prompt in enumerate(args.prompt or [""]):
        prompt_ids = tok.encode(format_prompt(prompt, args.system) if args.chat else prompt)
        idx = torch.tensor([[tok.bos_id] + prompt_ids], device=device)
        gen = torch.Generator(device).manual_seed(args.seed)  # each prompt as if run alone
        out = generate(
            model,
            idx,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            gen,
            tok.eos_id,
            compile=args.compile,
        )
        new_ids = out[0, idx.size(1) :].tolist()
        if args.chat:  # the reply alone, without its </s>
            text = tok.decode(
                new_ids[: new_ids.index(tok.eos_id)] if tok.eos_id in new_ids else new_ids
            )
        else:
            text = continuation(tok, prompt, prompt_ids, new_ids)
        print(("\n" if i else "") + text)
    return 0
