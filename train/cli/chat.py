"""`lora-core chat --model SOURCE "message"`: one chat turn with a model, printed to stdout.

The message is rendered with the checkpoint's own chat template (no template -> an error, unless
--chatml-fallback asks for ChatML explicitly) and answered with models.generate.
"""
from __future__ import annotations

import sys

import torch

from lora_core import load_adapter
from lora_core.models import generate, load_model
from lora_core.models.registry import DEFAULT_MODEL
from lora_core.train.cli._device import add_device_arguments, placement

HELP = "Answer one message with a model (HF directory, .gguf file or registry name) using its chat template."


def add_arguments(parser) -> None:
    parser.add_argument("message", help="the user message")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"HF-format directory, .gguf file or registry name (default: {DEFAULT_MODEL})")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit in tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    add_device_arguments(parser)
    parser.add_argument("--adapter", default=None, help="optional PEFT-format LoRA adapter directory to apply")
    parser.add_argument("--chatml-fallback", action="store_true",
                        help="use a ChatML template if the checkpoint has none (otherwise that is an error)")


def run(args) -> int:
    if not args.message.strip():
        raise ValueError("message is empty")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    torch.manual_seed(args.seed)

    device, dtype = placement(args)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    if args.adapter:
        load_adapter(model, args.adapter, base_model=str(args.model))  # warns when it names another model
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.message})
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           fallback="chatml" if args.chatml_fallback else None)
    answer = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, progress=False)[0]
    print(answer.strip())
    if not answer.strip():
        # A blank line alone looked like success; say what happened (a model that ends its turn at
        # once, or a --max-new-tokens spent on special tokens).
        print(f"lora-core chat: the model gave an empty answer (it stopped within {args.max_new_tokens} "
              f"new tokens without text)", file=sys.stderr)
    return 0
