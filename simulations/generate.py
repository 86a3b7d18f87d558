"""Print a completion from a trained model: the global one or a client's personal one.

    python -m simulations.generate --run outputs/runs/<date>/<time> --prompt "The river"
    python -m simulations.generate --run <MLflow run id> --client 3 --prompt "..." --temperature 0.8 --top-p 0.9
    python -m simulations.generate --personal /var/lib/fedslm --prompt "..."   # a device's model

Tokens are streamed as they are generated. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from fedslm.inference import InferenceError, Sampling, describe_output, generate
from fedslm.model import ModelError

EXIT_BAD_INPUT = 2


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags every tool of this family shares (``--run``, ``--client``, ``--personal``)."""
    parser.add_argument("--run", default="", help="a run's output dir or MLflow run id")
    parser.add_argument("--client", type=int, default=None,
                        help="use simulated client N's personal model (needs --run)")
    parser.add_argument("--personal", default="",
                        help="use the personal model in this client state dir (a device's --state-dir)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow store of --run <run id> (default: sqlite:///$PWD/outputs/mlflow.db)")


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


def main(argv: list[str] | None = None) -> int:
    quiet()
    parser = argparse.ArgumentParser(prog="fedslm generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_sampling_args(parser)
    args = parser.parse_args(argv)

    def build():
        from simulations.model_source import resolve

        spec = resolve(run=args.run, client=args.client, personal=args.personal,
                       tracking_uri=args.tracking_uri)
        model, tokenizer = spec.build()
        return model, tokenizer, f"{spec.label} model ({spec.method})"

    return run_generate(args, build)


if __name__ == "__main__":
    sys.exit(main())
