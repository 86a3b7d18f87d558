"""``python -m fedslm.simulations.bench <name> [options]``: run one benchmark, print its table,
write its JSON (default outputs/bench/<name>.json). ``--help`` after a name for its options.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, what it measures); modules are imported only when chosen
BENCHMARKS = {
    "overhead": ("fedslm.simulations.bench.overhead", "Flower simulation vs the same loop in one process"),
    "dp": ("fedslm.simulations.bench.dp_cost", "DP-SGD step time and peak memory vs non-DP"),
    "comm": ("fedslm.simulations.bench.comm", "bytes per client per round; compression quality cost"),
    "scale": ("fedslm.simulations.bench.scale", "seconds per round and peak RSS at 100..10,000 clients"),
    "throughput": ("fedslm.simulations.bench.throughput", "tokens/s of train_local vs a hand-written loop"),
    "tasks": ("fedslm.simulations.bench.tasks", "federated vs centralized per task; each task's step cost"),
    "audit": ("fedslm.simulations.bench.audit", "canary exposure, MIA AUC, empirical epsilon: no DP vs DP-SGD"),
    "aggregation": ("fedslm.simulations.bench.aggregation", "LoRA aggregation rules: server cost, quality, bytes"),
    "secagg": ("fedslm.simulations.bench.secagg", "SecAgg+ CPU, memory, bytes vs plain aggregation; quality"),
    "fuzz": ("fedslm.simulations.bench.fuzz", "random and mutated replies through screening: unexpected errors"),
    "robustness": ("fedslm.simulations.bench.robustness", "final perplexity under each attack x defence"),
    "geometry": ("fedslm.simulations.bench.geometry", "honest vs hostile updates per round, "
                 "as a robust rule sees them"),
    "realsize": ("fedslm.simulations.bench.realsize", "a 135M-shape SLM per client: step time, RSS, DP, "
                 "checkpointing, uplink (--device cuda: 135M/0.5B fp32/bf16/4bit)"),
    "sweep": ("fedslm.simulations.bench.sweep", "per-job fixed cost and timeline of a -m sweep on the warm engine"),
    "export": ("fedslm.simulations.bench.export", "a run's exports (hf/int8/gguf/onnx): size, quality, "
               "latency; best client's personal vs global"),
}


def usage() -> str:
    lines = ["usage: python -m fedslm.simulations.bench <name> [options]", "", "benchmarks:"]
    lines += [f"  {name:<11} {what}" for name, (_, what) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = BENCHMARKS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"error: benchmark {name!r} is not available on this checkout "
              f"({module_name.replace('.', '/')}.py is missing)", file=sys.stderr)
        return 2
    quiet()
    return int(module.main(rest) or 0)


def quiet() -> None:
    """Tables, not library chatter: no weight-loading bars, no deprecation warnings."""
    from fedslm.quiet import quiet_process

    quiet_process(verbose=False)


if __name__ == "__main__":
    sys.exit(main())
