"""scale: seconds per round and peak memory as the registered population grows, 10 sampled.

One simulation per population size (default 100, 1,000, 10,000 virtual clients), each
sampling ``--sampled`` clients per round for training and for evaluation. Per size:

* seconds per round: the ServerApp's median round time (train + evaluate), round 1
  excluded; the start-up until round 0 has been evaluated; the preflight check;
* peak RSS of the whole process tree (this process, SuperLink, simulation process,
  ServerApp, Ray daemons and workers), sampled in a thread with psutil, split by
  component so that what grows can be named.

Both should be flat in the population: what a round costs depends on the clients
sampled, not on the clients registered. Each size runs twice: with one SuperNode per
client (``federation.supernodes=0``, Flower's own mapping) and with ``--sampled``
SuperNodes serving the whole population (``fedslm.server.population``). Ratios are against the
smallest population on the same kind of nodes; "flat" means within ``FLAT`` of it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from fedslm.simulations.bench.common import experiment, machine, run_engine, table, write_json

FLAT = 1.2
MIB = 2**20


def preflight_seconds(cfg) -> float:
    """The launcher's preflight on a cold cache (what ``fedslm.simulations.run`` pays first)."""
    from fedslm.data import synthetic
    from fedslm.simulations.preflight import preflight

    synthetic._client.cache_clear()
    start = time.perf_counter()
    preflight(cfg)
    return time.perf_counter() - start


def run_one(population: int, supernodes: int, sampled: int, rounds: int, steps: int,
            echo: bool, ray_cpus: int = 0) -> dict[str, Any]:
    fraction = min(1.0, sampled / population)
    cfg = experiment({"federation.num_clients": population, "federation.num_rounds": rounds,
                      "federation.supernodes": supernodes,
                      "training.local_steps": steps, "strategy.fraction_train": fraction,
                      "strategy.fraction_evaluate": fraction, "federation.ray_cpus": ray_cpus},
                     run_name=f"scale-{population}-{supernodes}")
    pre = preflight_seconds(cfg)
    nodes = supernodes or population
    print(f"[scale] {population} clients on {nodes} SuperNodes, {sampled} sampled per round, "
          f"{rounds} rounds", flush=True)
    run = run_engine(cfg, echo=echo)
    first_trained = next(r for r in run.summary["rounds"] if r["round"] >= 1)
    return {
        "clients": population,
        "supernodes": nodes,
        "sampled": int(first_trained["clients_sampled"]),
        "s_per_round": run.steady_round_seconds(),
        "startup_s": run.round_end.get(0, run.finished),
        "preflight_s": pre,
        "wall_s": run.wall,
        "peak_rss_mib": run.tree.peak_rss / MIB,
        "peak_rss_by_component_mib": {k: v / MIB for k, v in sorted(run.tree.peak_by_component.items())},
        "round_seconds": run.round_seconds(),
        "phases": run.phases(),
        "steady_cpu_per_round_by_process": run.steady_cpu_per_round(),
        "unclassified_processes": sorted(run.tree.unclassified),
        "output_dir": cfg.output_dir,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", default="100,1000,10000")
    parser.add_argument("--sampled", type=int, default=10, help="clients per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="local steps per round")
    parser.add_argument("--supernodes", default="0,10",
                        help="federation.supernodes values to compare: 0 = one SuperNode per "
                             "client (Flower's mapping), k = k SuperNodes serve all clients")
    parser.add_argument("--tiny", action="store_true",
                        help="100 clients on 10 SuperNodes x 1 round x 2 steps on one Ray worker (smoke test)")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/scale.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.populations, args.supernodes, args.rounds, args.steps = "100", "10", 1, 2
    populations = [int(p) for p in args.populations.split(",") if p]
    modes = [int(k) for k in args.supernodes.split(",") if k]
    if not populations or min(populations) < args.sampled:
        parser.error(f"--populations: each must be >= --sampled ({args.sampled})")
    if not modes or min(modes) < 0:
        parser.error("--supernodes: comma-separated integers >= 0")
    rows = []
    for k in modes:
        mode = [run_one(n, k, args.sampled, args.rounds, args.steps, args.echo, ray_cpus=1 if args.tiny else 0)
                for n in populations]
        for row in mode:  # against the smallest population on the same kind of nodes
            row["time_ratio"] = row["s_per_round"] / mode[0]["s_per_round"]
            row["rss_ratio"] = row["peak_rss_mib"] / mode[0]["peak_rss_mib"]
            row["flat"] = "yes" if row["time_ratio"] <= FLAT and row["rss_ratio"] <= FLAT else "no"
        rows += mode
    print(table(rows, ["clients", "supernodes", "sampled", "s_per_round", "time_ratio", "peak_rss_mib",
                       "rss_ratio", "flat", "startup_s", "preflight_s", "wall_s"]))
    components = sorted({k for r in rows for k in r["peak_rss_by_component_mib"]})
    print("\nPeak RSS by component (MiB):")
    print(table([{"clients": r["clients"], "supernodes": r["supernodes"],
                  **r["peak_rss_by_component_mib"]} for r in rows],
                ["clients", "supernodes", *components]))
    print("\nCPU seconds per steady round by process:")
    cpu_parts = sorted({k for r in rows for k in r["steady_cpu_per_round_by_process"]})
    print(table([{"clients": r["clients"], "supernodes": r["supernodes"],
                  **r["steady_cpu_per_round_by_process"]} for r in rows],
                ["clients", "supernodes", *cpu_parts]))
    result = {"benchmark": "scale", "setting": {"sampled": args.sampled, "rounds": args.rounds,
                                                "local_steps": args.steps},
              "flat_within": FLAT, "rows": rows, "machine": machine()}
    print(f"\nwrote {write_json('scale', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
