"""sweep: what each job of a ``-m`` sweep costs beyond its rounds, and where it goes.

Runs N small jobs one after another in this process exactly as a Hydra sweep does
(``fedslm.simulations.run.run(cfg, warm_engine=True)``: preflight, MLflow tracking into a
sqlite store, one ``flwr run`` per job on the sweep's warm engine) and reports per job:

* ``fixed``: the job's wall time minus its rounds' own seconds (as the ServerApp times
  them): everything a job costs that is not training or evaluation;
* a timeline from the process tree (sampled every 0.1 s) and the streamed log: the
  launcher calling ``flwr run`` (submit), the ``flwr-simulation`` process starting, Ray's
  daemons starting (only when the run starts its own Ray), the first ClientApp actor's
  worker starting, the first ClientApp reply, the last round's line, the simulation
  process gone, the job returned;
* CPU seconds of the whole process tree during the job.

``--ray-per-run`` measures the previous behaviour (one SuperLink per sweep, a Ray per run);
``--superlink-per-job`` the one before (every job its own SuperLink and Ray). The JSON keeps
every timestamp and the load average at start and end (the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from fedslm.simulations.bench.common import _Timestamped, component, experiment, machine, median, table, write_json

FIRST_REPLY = re.compile(r"\[round 1/\d+\] train: 1/\d+ clients done")
ROUND_LINE = re.compile(r"\[round (\d+)/\d+\] \|")


class ProcessTimeline:
    """First and last time each process of this tree was seen, by component, and the
    tree's CPU seconds over time (sampled every ``interval`` seconds)."""

    def __init__(self, start: float, interval: float = 0.1) -> None:
        self.start, self.interval = start, interval
        self.first: dict[int, tuple[float, str]] = {}
        self.last: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._offset = time.time() - time.monotonic()

    def __enter__(self) -> ProcessTimeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        root = psutil.Process()
        while not self._stop.wait(self.interval):
            now = time.monotonic() - self.start
            for proc in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    with proc.oneshot():
                        name = component(" ".join(proc.cmdline()))
                        created = proc.create_time() - self._offset - self.start
                        cpu = proc.cpu_times()
                    if proc.pid not in self.first or self.first[proc.pid][1] != name:
                        self.first[proc.pid] = (created, name)
                    self.last[proc.pid] = now
                    self.cpu[proc.pid] = cpu.user + cpu.system

    def first_start(self, name: str, after: float) -> float | None:
        times = [t for t, n in self.first.values() if n == name and t >= after - 0.05]
        return min(times) if times else None

    def last_seen(self, name: str, after: float) -> float | None:
        times = [self.last[p] for p, (t, n) in self.first.items() if n == name and t >= after - 0.05]
        return max(times) if times else None

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def cpu_by_component(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.cpu.items():
            name = self.first[pid][1]
            out[name] = out.get(name, 0.0) + cpu
        return out


def job_config(j: int, out: Path, rounds: int, clients: int, steps: int):
    cfg = experiment(
        {
            "federation.num_clients": clients,
            "federation.num_rounds": rounds,
            "training.local_steps": steps,
            "federation.initial_evaluation": False,
            "data.docs_per_client": 16,
            "peft.r": 2 * (j + 1),
            "tracking.enabled": True,
            "tracking.uri": f"sqlite:///{out / 'mlflow.db'}",
            "tracking.experiment": "bench-sweep",
        },
        run_name=f"sweep-{j}",
    )
    return dataclasses.replace(cfg, output_dir=str(out / str(j)), verbose=True)


def timeline(
    stream: _Timestamped, procs: ProcessTimeline, submits: list[float], t0: float, t1: float
) -> dict[str, float | None]:
    """Moments of one job, seconds after the job started."""

    def line_at(pattern: re.Pattern[str]) -> float | None:
        return next((t - t0 for t, line in stream.lines if t >= t0 and pattern.search(line)), None)

    def rel(t: float | None) -> float | None:
        return None if t is None else t - t0

    rounds = [t - t0 for t, line in stream.lines if t >= t0 and ROUND_LINE.search(line)]
    return {
        "submit": rel(next((t for t in submits if t >= t0), None)),
        "simulation_start": rel(procs.first_start("simulation", t0)),
        "ray_daemons_start": rel(procs.first_start("ray core", t0)),
        "first_worker_start": rel(procs.first_start("ray workers", t0)),
        "first_reply": line_at(FIRST_REPLY),
        "last_round_line": max(rounds) if rounds else None,
        "simulation_gone": rel(procs.last_seen("simulation", t0)),
        "job_end": t1 - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedslm.simulations.bench sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ray-per-run", action="store_true", help="the shared SuperLink, but a Ray per run")
    parser.add_argument("--superlink-per-job", action="store_true", help="every job its own SuperLink and Ray")
    parser.add_argument("--tiny", action="store_true", help="2 jobs (smoke test)")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/sweep.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.jobs = 2
    from fedslm.simulations import launch, warm_engine
    from fedslm.simulations import run as run_module

    submits: list[float] = []  # when each job calls `flwr run`
    flwr_run = launch.flwr_run

    def timed_flwr_run(*a: Any, **kw: Any) -> None:
        submits.append(time.monotonic() - start)
        flwr_run(*a, **kw)

    launch.flwr_run = timed_flwr_run  # type: ignore[assignment]

    mode = "superlink per job" if args.superlink_per_job else "ray per run" if args.ray_per_run else "shared ray"
    warm_engine.ENGINE.shared_ray = not (args.ray_per_run or args.superlink_per_job)
    print(
        f"[sweep] {args.jobs} jobs of {args.clients} clients x {args.rounds} rounds x {args.steps} steps, "
        f"{mode}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    load_start = [round(x, 2) for x in os.getloadavg()]
    start = time.monotonic()
    stream = _Timestamped(start, args.echo)
    jobs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedslm-bench-sweep-") as tmp, ProcessTimeline(start) as procs:
        with contextlib.redirect_stdout(stream):
            for j in range(args.jobs):
                cfg = job_config(j, Path(tmp), args.rounds, args.clients, args.steps)
                t0, cpu0 = time.monotonic(), procs.cpu_seconds() + time.process_time()
                by0 = procs.cpu_by_component()
                summary = run_module.run(cfg, warm_engine=not args.superlink_per_job)
                t1 = time.monotonic()
                rounds = sum(float(r["round_seconds"]) for r in summary["rounds"] if r.get("round_seconds"))
                jobs.append(
                    {
                        "job": j,
                        "wall": t1 - t0,
                        "rounds_seconds": rounds,
                        "fixed": t1 - t0 - rounds,
                        "cpu_seconds": procs.cpu_seconds() + time.process_time() - cpu0,
                        "cpu_by_component": {
                            k: round(v - by0.get(k, 0.0), 2) for k, v in procs.cpu_by_component().items()
                        },
                        "timeline": timeline(stream, procs, submits, t0 - start, t1 - start),
                    }
                )
            warm_engine.ENGINE.stop()
        total = time.monotonic() - start
    load_end = [round(x, 2) for x in os.getloadavg()]
    later = [j["fixed"] for j in jobs[1:]] or [jobs[0]["fixed"]]
    print(table(jobs, ["job", "wall", "rounds_seconds", "fixed", "cpu_seconds"]))
    for j in jobs:
        print(
            f"job {j['job']} CPU s by process: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(j["cpu_by_component"].items()) if abs(v) >= 0.05)
        )
    moments = list(jobs[0]["timeline"])
    print("\nTimeline per job (s after the job started):")
    print(table([{"job": j["job"], **j["timeline"]} for j in jobs], ["job", *moments]))
    print(
        f"\nTotal wall {total:.1f} s; fixed cost per job: job 1 {jobs[0]['fixed']:.1f} s, "
        f"median of the rest {median(later):.1f} s; load average {load_start[0]} at start, {load_end[0]} at end"
    )
    result = {
        "benchmark": "sweep",
        "setting": {
            "jobs": args.jobs,
            "clients": args.clients,
            "rounds": args.rounds,
            "steps": args.steps,
            "mode": mode,
        },
        "total_wall": total,
        "fixed_first": jobs[0]["fixed"],
        "fixed_median_rest": median(later),
        "jobs": jobs,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "machine": machine(),
    }
    print(f"\nwrote {write_json('sweep', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
