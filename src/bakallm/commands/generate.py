"""`bakallm generate`: continue a text with a trained model, streaming the new text to stdout."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bakallm.commands import options
from bakallm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="RUN",
        help="a run directory of `bakallm train`, one checkpoint folder, or a folder of `bakallm export`",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", help="a UTF-8 text file to continue, of any length (e.g. a whole book)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to write at most (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default 0.8)")
    parser.add_argument(
        "--top-k", type=int, default=0, help="draw among the k most likely tokens only; 0 keeps all (default 0)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=0.95,
        help="draw among the most likely tokens that make up p of the probability (default 0.95)",
    )
    parser.add_argument("--seed", type=int, help="the same seed gives the same text (default: a fresh draw each time)")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (may be given several times)"
    )
    options.add_tokenizer(parser, "the model's own")
    options.add_device(parser)
    options.add_threads(parser)


def run(args: argparse.Namespace) -> int:
    from bakallm.acceleration import resolve_device, use_threads
    from bakallm.data.tokenizers import load_tokenizer
    from bakallm.generation import Sampling, generate_text
    from bakallm.model.io import load_model, model_files

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}.")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}.")
    if any(text == "" for text in args.stop):
        raise UserError(
            "--stop was given an empty text, which would stop before the first token; give the text to stop at, e.g. --stop $'\\n\\n'."
        )
    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as error:
        raise UserError(f"{str(error).rstrip('.')} (see --temperature, --top-k and --top-p).") from None
    use_threads(args.threads)
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(
                f"Cannot read --prompt-file {args.prompt_file} ({error}); pass a UTF-8 text file."
            ) from None
    else:
        text = args.prompt
    files = model_files(args.model)
    spec = args.tokenizer or files.tokenizer
    if spec is None:
        raise UserError(f"{args.model} names no tokenizer; pass the one the model was trained with as --tokenizer.")
    tokenizer = load_tokenizer(spec)
    device = resolve_device(args.device)
    model = load_model(args.model, device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"The tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; pass the tokenizer it was trained with."
        )
    if not tokenizer.encode(text):
        raise UserError("The prompt gives no tokens; give some text to continue.")

    def show(index: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    started = time.perf_counter()
    written = generate_text(model, tokenizer, [text], args.max_new_tokens, sampling, stop=args.stop, on_text=show)[0]
    seconds = time.perf_counter() - started
    sys.stdout.write("\n")
    print(
        f"bakallm generate: read {len(tokenizer.encode(text)):,} prompt tokens and wrote {len(written):,} characters in {seconds:.1f} s",
        file=sys.stderr,
    )
    return 0
