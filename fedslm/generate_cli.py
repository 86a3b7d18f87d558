"""Command-line pieces every generating tool shares (``fedslm.simulations.generate``,
``fedslm-agent generate``): sampling flags, quiet libraries, one-line errors with exit 2."""

from __future__ import annotations

import argparse
import sys

from fedslm.inference import InferenceError, Sampling, describe_output, generate
from fedslm.model import ModelError

EXIT_BAD_INPUT = 2


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--task", default="causal_lm", help="prompt template: causal_lm | instruct")
    parser.add_argument("--no-stream", action="store_true", help="print the completion at the end only")


def sampling_of(args: argparse.Namespace) -> Sampling:
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    sampling.check()
    return sampling


def run_generate(args: argparse.Namespace, build) -> int:
    """Build the model with ``build()`` -> (model, tokenizer, label) and print one completion."""
    try:
        sampling = sampling_of(args)
        model, tokenizer, label = build()
        print(f"[fedslm] {label}: {args.prompt}", file=sys.stderr, flush=True)
        text = generate(model, tokenizer, args.prompt, sampling, task=args.task,
                        stream=not args.no_stream)
        if args.no_stream:
            print(describe_output(text, task=args.task)["text"], flush=True)
    except (InferenceError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


def quiet() -> None:
    """Only the completion on stdout: no weight-loading bars or library warnings."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
