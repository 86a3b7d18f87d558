"""Command-line pieces every generating tool shares (``fedslm.simulations.generate``,
``fedslm-agent generate``): sampling flags, the device, quiet libraries, one-line errors
with exit 2, and what is printed: a streamed completion, or for a ``classify`` model the
predicted label and its probability."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedslm.inference import (GENERATIVE_TASKS, InferenceError, Sampling, check_device,
                              classify_text, describe_output, generate)
from fedslm.model import ModelError

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Loaded:
    """A model ready to use, and what it is for."""

    model: Any
    tokenizer: Any
    label: str  # says which model, e.g. "global model (none)"
    task: str = "causal_lm"  # the task it was trained for
    labels: Sequence[str] = ()  # classify: class names in head order
    seq_len: int = 128  # classify: the run's training.seq_len (texts are cut as in evaluation)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) | cuda")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True,
                        help="text to continue (a classify model: the text to classify)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--task", default="",
                        help="prompt template of a generative model: causal_lm | instruct "
                             "(default: the task the model was trained for)")
    parser.add_argument("--no-stream", action="store_true", help="print the completion at the end only")
    add_device_arg(parser)


def sampling_of(args: argparse.Namespace) -> Sampling:
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    sampling.check()
    return sampling


def task_of(requested: str, trained: str) -> str:
    """The prompt template: ``--task`` if given and usable with this model, else its own."""
    if not requested:
        return trained
    if (requested == "classify") != (trained == "classify"):
        raise InferenceError(f"--task: {requested} does not fit this model, trained for "
                             f"task {trained}")
    if requested not in GENERATIVE_TASKS and requested != "classify":
        raise InferenceError(f"--task: unknown value {requested!r}; expected causal_lm or instruct")
    return requested


def run_generate(args: argparse.Namespace, build: Callable[[], Loaded]) -> int:
    """Build the model with ``build()`` and print one completion (or one label)."""
    try:
        sampling = sampling_of(args)
        check_device(args.device)
        loaded = build()
        task = task_of(args.task, loaded.task)
        print(f"[fedslm] {loaded.label}: {args.prompt}", file=sys.stderr, flush=True)
        if task == "classify":
            out = classify_text(loaded.model, loaded.tokenizer, args.prompt, loaded.labels,
                                seq_len=loaded.seq_len)
            print(f"{out['label']}\t{out['probability']:.4f}", flush=True)
            return 0
        text = generate(loaded.model, loaded.tokenizer, args.prompt, sampling, task=task,
                        stream=not args.no_stream)
        if args.no_stream:
            print(describe_output(text, task=task)["text"], flush=True)
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
