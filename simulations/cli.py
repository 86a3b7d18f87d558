"""``fedslm``: the tools that use a trained model, one CLI shape (``--run``, ``--client``,
``--personal``, ``--prompt``, ``--format``, ``--out``).

    fedslm generate --run <output dir | MLflow run id> [--client N | --personal DIR] --prompt "..."
    fedslm export   --run <...> [--client N | --personal DIR] --format hf|int8|gguf --out DIR
    fedslm engine   up [--ray-cpus N] | status | down    (a local engine runs reuse: federation.superlink)
"""

from __future__ import annotations

import sys

COMMANDS = {
    "generate": "fedslm.simulations.generate",
    "export": "fedslm.simulations.export",
    "engine": "fedslm.simulations.engine",
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = argv[0] if argv else "nothing"
        print(f"error: command: expected one of {', '.join(COMMANDS)}, got {given}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
