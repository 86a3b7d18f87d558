"""overhead: the same federated training on Flower's simulation engine vs one plain process.

Both sides run the same steps with the same code: every round each of K clients loads the
global adapter, trains S local steps (``fedslm.client.task.fit``), the server averages by example
count, every client evaluates on its test split (``fedslm.client.task.evaluate``) and the server
evaluates on the central set. The baseline does this in a loop in one fresh Python
process with ``federation.client_num_cpus`` torch threads; the engine run adds everything
Flower brings: SuperLink, simulation process (ServerApp thread, message routing), Ray
and its workers, messages and their serialization. By default the engine gets one Ray
worker (``--workers 1``), so both sides run the clients one after another on the same
resources and the ratios measure overhead, not parallelism; ``--workers 0`` lets Flower
start one worker per ``client_num_cpus`` cores, as ``fedslm.simulations.run`` does.

Ratios (engine / baseline):

* ``total``: wall time of the whole command, from process start to exit, including the
  engine's start-up (SuperLink, simulation process imports, Ray and its workers
  importing torch) and teardown, against the baseline's imports and model load;
* ``steady``: the median time of one round (train + evaluate) once everything is warm,
  round 1 excluded (the first backward pass in each worker), as the ServerApp measures it;
* CPU seconds of the whole process tree, per run and per steady round, the latter split
  into client work (Ray workers vs the baseline's fit + evaluate) and the rest (server
  work plus everything the engine does besides running clients). CPU time is less
  disturbed than wall time by other work on a shared machine.

The training loop itself is measured against hand-written PyTorch by ``throughput``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedslm.config import TrainingConfig
from fedslm.simulations.bench.common import (
    ProcessTreeSampler,
    experiment,
    machine,
    median,
    run_engine,
    table,
    write_json,
)

TARGET_STEADY = 1.15


def baseline(cfg) -> dict[str, Any]:
    """The federated loop in this process: no Flower, same task functions."""
    import numpy as np
    import torch

    from fedslm.client.task import evaluate, fit
    from fedslm.adapters import to_array_record
    from fedslm.data import central_test_texts
    from fedslm.server.experiment import initial_adapter, make_central_eval

    torch.set_num_threads(cfg.federation.client_num_cpus)
    start = time.perf_counter()
    arrays = initial_adapter(cfg)
    central = make_central_eval(cfg, central_test_texts(cfg.data, num_clients=cfg.federation.num_clients))
    n = cfg.federation.num_clients
    setup = time.perf_counter() - start
    rounds, rounds_cpu, clients_cpu, last = {}, {}, {}, {}
    for rnd in range(cfg.federation.num_rounds + 1):
        t, cpu = time.perf_counter(), time.process_time()
        client_cpu = 0.0
        if rnd > 0:
            c = time.process_time()
            updates = [fit(cfg, arrays, partition_id=p, server_round=rnd) for p in range(n)]
            client_cpu += time.process_time() - c
            weights = np.array([m["num-examples"] for _, m in updates], dtype=np.float64)
            arrays = {k: (sum(w * u[k] for (u, _), w in zip(updates, weights)) / weights.sum())
                      .astype(np.float32) for k in arrays}
        c = time.process_time()
        evals = [evaluate(cfg, arrays, partition_id=p) for p in range(n)]
        client_cpu += time.process_time() - c
        if central is not None:
            last = central(rnd, to_array_record(arrays))
        rounds[rnd] = time.perf_counter() - t
        rounds_cpu[rnd] = time.process_time() - cpu
        clients_cpu[rnd] = client_cpu
        last["eval_loss"] = sum(e["loss"] * e["num-examples"] for e in evals) / sum(
            e["num-examples"] for e in evals)
    return {"setup_seconds": setup, "round_seconds": rounds, "round_cpu_seconds": rounds_cpu,
            "round_client_cpu_seconds": clients_cpu, "final": last}


def run_baseline_process(cfg) -> dict[str, Any]:
    """``baseline`` in a fresh interpreter, timed from spawn to exit (imports included)."""
    cmd = [sys.executable, "-m", "fedslm.simulations.bench.overhead", "--baseline-child",
           json.dumps(cfg.to_dict())]
    start = time.monotonic()
    with ProcessTreeSampler() as sampler:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             cwd=str(Path(__file__).resolve().parents[2]))
    wall = time.monotonic() - start
    if out.returncode != 0:
        raise RuntimeError(f"baseline process failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("round_seconds", "round_cpu_seconds", "round_client_cpu_seconds"):
        result[key] = {int(k): v for k, v in result[key].items()}
    result.update(wall=wall, cpu_seconds=sampler.result.total_cpu_seconds,
                  steady_round_seconds=steady(result["round_seconds"]),
                  steady_round_cpu_seconds=steady(result["round_cpu_seconds"]),
                  steady_client_cpu_seconds=steady(result["round_client_cpu_seconds"]))
    return result


def steady(per_round: dict[int, float]) -> float:
    """Median over rounds >= 2, or over rounds >= 1 when there are no later ones."""
    later = [s for r, s in per_round.items() if r >= 2]
    return median(later or [s for r, s in per_round.items() if r >= 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=TrainingConfig().local_steps,
                        help="local steps per round (default: the main job's training.local_steps)")
    parser.add_argument("--tiny", action="store_true",
                        help="2 clients x 2 rounds x 2 steps, one baseline run (smoke test)")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel Ray workers for the engine (1: serial, like the baseline; "
                             "0: Flower's default, one per client_num_cpus cores)")
    parser.add_argument("--warm", action="store_true",
                        help="the engine run is a sweep's later job: SuperLink and Ray started "
                             "before the clock starts (fedslm.simulations.warm_engine)")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/overhead.json)")
    parser.add_argument("--baseline-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_child:
        from fedslm.config import ExperimentConfig

        result = baseline(ExperimentConfig.from_dict(json.loads(args.baseline_child)))
        print(json.dumps(result))
        return 0
    if args.tiny:
        args.clients, args.rounds, args.steps = 2, 2, 2
    cfg = experiment({"federation.num_clients": args.clients, "federation.num_rounds": args.rounds,
                      "training.local_steps": args.steps}, run_name="overhead")
    order = "baseline, engine" + ("" if args.tiny else ", baseline")
    workers = args.workers or "default"
    print(f"[overhead] {args.clients} clients x {args.rounds} rounds x {args.steps} steps, "
          f"{workers} engine worker(s){', warm engine' if args.warm else ''}: {order}", flush=True)
    before = run_baseline_process(cfg)
    ray_cpus = args.workers * cfg.federation.client_num_cpus
    if args.warm:
        from fedslm.simulations.warm_engine import WarmEngine

        warm = WarmEngine(ray_cpus=ray_cpus)
        warm.address(verbose=True)  # what the sweep's first job starts
        try:
            engine = run_engine(cfg, echo=args.echo, warm=warm)
        finally:
            warm.stop()
    else:
        engine = run_engine(cfg, echo=args.echo, ray_cpus=ray_cpus)
    after = before if args.tiny else run_baseline_process(cfg)  # tiny: one baseline is enough
    base_wall = 0.5 * (before["wall"] + after["wall"])
    base_steady = 0.5 * (before["steady_round_seconds"] + after["steady_round_seconds"])
    base_cpu = 0.5 * (before["cpu_seconds"] + after["cpu_seconds"])
    base_steady_cpu = 0.5 * (before["steady_round_cpu_seconds"] + after["steady_round_cpu_seconds"])
    engine_steady_cpu = engine.steady_cpu_per_round()
    base_client_cpu = 0.5 * (before["steady_client_cpu_seconds"] + after["steady_client_cpu_seconds"])
    engine_client_cpu = engine_steady_cpu.get("ray workers", 0.0)
    engine_server_cpu = sum(v for k, v in engine_steady_cpu.items() if k not in ("ray workers", "bench"))
    engine_total_cpu = engine_client_cpu + engine_server_cpu  # "bench": this process, measuring
    last = engine.summary["rounds"][-1]
    ratios = {
        "total": engine.wall / base_wall,
        "steady": engine.steady_round_seconds() / base_steady,
        "cpu_total": engine.tree.total_cpu_seconds / base_cpu,
        "cpu_steady": engine_total_cpu / base_steady_cpu,
        "cpu_steady_clients": engine_client_cpu / base_client_cpu,
        "cpu_steady_server": engine_server_cpu / max(base_steady_cpu - base_client_cpu, 1e-9),
    }
    rows = [
        {"figure": "total wall (incl. engine start)", "ratio": ratios["total"], "target": None,
         "engine_s": engine.wall, "baseline_s": base_wall},
        {"figure": "steady round (train+eval)", "ratio": ratios["steady"], "target": TARGET_STEADY,
         "engine_s": engine.steady_round_seconds(), "baseline_s": base_steady},
        {"figure": "CPU s, whole run", "ratio": ratios["cpu_total"], "target": None,
         "engine_s": engine.tree.total_cpu_seconds, "baseline_s": base_cpu},
        {"figure": "CPU s per steady round", "ratio": ratios["cpu_steady"], "target": TARGET_STEADY,
         "engine_s": engine_total_cpu, "baseline_s": base_steady_cpu},
        {"figure": "  of which client work", "ratio": ratios["cpu_steady_clients"], "target": None,
         "engine_s": engine_client_cpu, "baseline_s": base_client_cpu},
        {"figure": "  of which server + engine", "ratio": ratios["cpu_steady_server"], "target": None,
         "engine_s": engine_server_cpu, "baseline_s": base_steady_cpu - base_client_cpu},
    ]
    for row in rows:
        row["met"] = None if row["target"] is None else ("yes" if row["ratio"] <= row["target"] else "no")
    print(table(rows, ["figure", "ratio", "target", "met", "engine_s", "baseline_s"]))
    phases = engine.phases()
    print("\nEngine run, where the time goes (s): " +
          ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print("CPU seconds per steady round by process: " +
          ", ".join(f"{k} {v:.2f}" for k, v in engine_steady_cpu.items() if abs(v) >= 0.005))
    print(f"Final eval loss: engine {last.get('eval_loss', float('nan')):.4f}, "
          f"baseline {after['final'].get('eval_loss', float('nan')):.4f}")
    result = {
        "benchmark": "overhead",
        "setting": {"clients": args.clients, "rounds": args.rounds, "local_steps": args.steps,
                    "client_num_cpus": cfg.federation.client_num_cpus,
                    "engine_workers": args.workers or "default", "warm_engine": args.warm},
        "ratios": ratios, "target_steady": TARGET_STEADY, "rows": rows, "engine_phases": phases,
        "engine": {"wall": engine.wall, "round_seconds": engine.round_seconds(),
                   "steady_cpu_per_round_by_process": engine_steady_cpu,
                   "cpu_seconds": engine.tree.total_cpu_seconds,
                   "peak_rss_mib": engine.tree.peak_rss / 2**20,
                   "final": {k: last.get(k) for k in ("eval_loss", "central_loss", "train_loss")}},
        "baseline_runs": [before] if after is before else [before, after], "machine": machine(),
    }
    print(f"\nwrote {write_json('overhead', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
