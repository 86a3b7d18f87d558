"""Print a completion from a trained model: the global one or a client's personal one.

    python -m fedslm.simulations.generate --run outputs/runs/<date>/<time> --prompt "The river"
    python -m fedslm.simulations.generate --run <MLflow run id> --client 3 --prompt "..." --temperature 0.8 --top-p 0.9
    python -m fedslm.simulations.generate --personal /var/lib/fedslm --prompt "..."   # a device's model

Tokens are streamed as they are generated; a classification run's model prints the
predicted label and its probability (softmax over the task head) instead. Bad input:
one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from fedslm.generate_cli import Loaded, add_sampling_args, quiet, run_generate


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags every tool of this family shares (``--run``, ``--client``, ``--personal``)."""
    parser.add_argument("--run", default="", help="a run's output dir or MLflow run id")
    parser.add_argument("--client", type=int, default=None,
                        help="use simulated client N's personal model (needs --run)")
    parser.add_argument("--personal", default="",
                        help="use the personal model in this client state dir (a device's --state-dir)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow store of --run <run id> (default: sqlite:///$PWD/outputs/mlflow.db)")


def main(argv: list[str] | None = None) -> int:
    quiet()
    parser = argparse.ArgumentParser(prog="fedslm generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_sampling_args(parser)
    args = parser.parse_args(argv)

    def build():
        from fedslm.simulations.model_source import resolve

        spec = resolve(run=args.run, client=args.client, personal=args.personal,
                       tracking_uri=args.tracking_uri)
        model, tokenizer = spec.build(args.device)
        return Loaded(model, tokenizer, f"{spec.label} model ({spec.method})", task=spec.task,
                      labels=spec.labels, seq_len=spec.seq_len)

    return run_generate(args, build)


if __name__ == "__main__":
    sys.exit(main())
