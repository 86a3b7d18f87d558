"""What every benchmark shares: configs, a timed engine run, process-tree sampling, output.

Times are only ever reported as ratios against a baseline measured in the same process,
because the machines these run on are shared and noisy; absolute seconds are kept in
the JSON for reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedslm.config import ExperimentConfig
from fedslm.runconfig import PROJECT_ROOT, nest

BENCH_DIR = PROJECT_ROOT / "outputs" / "bench"


def experiment(overrides: dict[str, Any], *, run_name: str) -> ExperimentConfig:
    """A checked config with MLflow off (the baselines do not track either) and its own
    absolute output dir under outputs/bench/runs/."""
    out = BENCH_DIR / "runs" / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return ExperimentConfig.from_dict(
        nest({"tracking.enabled": False, "output_dir": str(out), **overrides}))


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(name: str, result: dict[str, Any], out: str | None) -> Path:
    path = Path(out) if out else BENCH_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table; floats get 4 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# --- process tree ---------------------------------------------------------------------

COMPONENTS = (  # first match on the command line wins
    ("superlink", ("flower-superlink",)),
    ("superexec", ("flower-superexec",)),
    ("serverapp", ("flwr-serverapp",)),
    ("simulation", ("flwr-simulation",)),
    ("ray workers", ("default_worker.py", "ray::")),
    ("ray core", ("raylet", "gcs_server", "ray/dashboard", "log_monitor", "ray/_private",
                  "runtime_env/agent", "monitor.py")),
    ("flwr cli", ("bin/flwr ",)),
)


def component(cmdline: str) -> str:
    for name, needles in COMPONENTS:
        if any(n in cmdline for n in needles):
            return name
    return "other"


@dataclass
class TreeSample:
    """Peak resident memory of this process and all its descendants, and their CPU time."""

    peak_rss: int = 0
    peak_by_component: dict[str, int] = field(default_factory=dict)
    cpu_seconds: dict[int, float] = field(default_factory=dict)  # last seen, per pid
    # (seconds since start, CPU seconds so far per component), one entry per sample
    cpu_series: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    unclassified: set[str] = field(default_factory=set)  # command lines counted as "other"
    samples: int = 0

    @property
    def total_cpu_seconds(self) -> float:
        return sum(self.cpu_seconds.values())

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per component spent between two moments (nearest samples)."""
        if not self.cpu_series:
            return {}
        def at(t: float) -> dict[str, float]:
            return min(self.cpu_series, key=lambda s: abs(s[0] - t))[1]
        a, b = at(t0), at(t1)
        return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in sorted(set(a) | set(b))}


class ProcessTreeSampler:
    """Samples RSS (sum over the tree) in a thread every ``interval`` seconds.

    Ray daemons are started by processes of this tree, so they are counted; a process
    that exits between samples loses at most one interval of CPU time.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.start = time.monotonic()
        self.result = TreeSample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._names: dict[int, str] = {}
        # CPU already spent by processes alive now (this one included) is not counted
        self._initial: dict[int, float] = {}
        root = psutil.Process()
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                cpu = proc.cpu_times()
                self._initial[proc.pid] = cpu.user + cpu.system

    def __enter__(self) -> "ProcessTreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        root = psutil.Process()
        total, by_component = 0, {}
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    # read every time: a fresh child shows its parent's command line
                    # until it execs
                    cmdline = " ".join(proc.cmdline())
                self._names[proc.pid] = "bench" if proc.pid == root.pid else component(cmdline)
                if self._names[proc.pid] == "other":
                    self.result.unclassified.add(cmdline[:160])
                total += rss
                name = self._names[proc.pid]
                by_component[name] = by_component.get(name, 0) + rss
                self.result.cpu_seconds[proc.pid] = cpu.user + cpu.system - self._initial.get(proc.pid, 0.0)
        r = self.result
        r.samples += 1
        per_component: dict[str, float] = {}
        for pid, cpu in r.cpu_seconds.items():
            name = self._names.get(pid, "other")
            per_component[name] = per_component.get(name, 0.0) + cpu
        r.cpu_series.append((time.monotonic() - self.start, per_component))
        if total > r.peak_rss:
            r.peak_rss = total
        for name, rss in by_component.items():
            r.peak_by_component[name] = max(r.peak_by_component.get(name, 0), rss)


# --- a timed run on the simulation engine ------------------------------------------------

ROUND_LINE = re.compile(r"\[round (\d+)/\d+\] \|")


class _Timestamped(io.TextIOBase):
    """Stands in for sys.stdout: keeps (seconds since start, line), echoes if asked."""

    def __init__(self, start: float, echo: bool) -> None:
        self.start, self.echo, self.lines, self._buf = start, echo, [], ""

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.lines.append((time.monotonic() - self.start, line))
            if self.echo:
                sys.__stdout__.write(line + "\n")
        return len(text)


@dataclass
class EngineRun:
    """A finished simulation run: its summary and when each phase ended (seconds)."""

    summary: dict[str, Any]
    wall: float
    engine_ready: float  # SuperLink answering health checks
    rounds_start: float  # ServerApp starts round 0 (model, strategy, central set ready)
    round_end: dict[int, float]  # round -> when its summary line was streamed
    finished: float  # flwr run returned
    tree: TreeSample

    def steady_window(self) -> tuple[float, float, int]:
        """(start, end, rounds) of the steady rounds on this run's clock: after round 1
        (or round 0 when there is only one round) up to the last round.

        The bounds are when the round lines were streamed, which includes each round's
        bookkeeping (metrics, checkpoint, tables). Streamed lines arrive in chunks
        (Flower forwards logs about twice a second), so two round lines can share a
        timestamp: the window is never shorter than the ServerApp's own timing of those
        rounds (train + evaluate). No window when a round's timing is missing.
        """
        ends = sorted(self.round_end)
        first = 1 if len(ends) > 2 else 0
        if len(ends) < 2 or first not in self.round_end:
            return 0.0, 0.0, 0
        last = ends[-1]
        seconds = self.round_seconds()
        if any(r not in seconds for r in range(first + 1, last + 1)):
            return 0.0, 0.0, 0
        span = sum(seconds[r] for r in range(first + 1, last + 1))
        end = self.round_end[last]
        start = min(self.round_end[first], end - span)
        return start, end, last - first

    def steady_cpu_per_round(self) -> dict[str, float]:
        """CPU seconds per steady round, by component of the process tree."""
        t0, t1, n = self.steady_window()
        return {k: v / n for k, v in self.tree.cpu_between(t0, t1).items()} if n else {}

    def round_seconds(self) -> dict[int, float]:
        return {int(r["round"]): float(r["round_seconds"]) for r in self.summary["rounds"]
                if r.get("round_seconds") not in (None, "")}

    def steady_round_seconds(self) -> float:
        """Median server-measured round time (train + evaluate), round 1 excluded when
        there are later rounds: it pays the first backward pass in every worker."""
        per_round = self.round_seconds()
        later = [s for r, s in per_round.items() if r >= 2]
        return median(later or list(per_round.values()))

    def phases(self) -> dict[str, float]:
        first = min(self.round_end) if self.round_end else self.finished
        return {
            "engine_start": self.engine_ready,
            "serverapp_ready": self.rounds_start - self.engine_ready,
            "round0_incl_ray_start": self.round_end.get(0, first) - self.rounds_start,
            "rounds_1_to_R": max(self.round_end.values(), default=first) - self.round_end.get(0, first),
            "finish_and_teardown": self.wall - max(self.round_end.values(), default=first),
        }


def run_engine(cfg: ExperimentConfig, *, echo: bool = False, sample_interval: float = 0.25,
               ray_cpus: int = 0, warm: Any = None) -> EngineRun:
    """``fedslm.simulations.launch``'s simulation run, with a timeline and process-tree sampling.

    ``ray_cpus`` > 0 caps the CPUs Ray may hand out (Flower's ``init-args-num-cpus``),
    hence the number of parallel workers: ``ray_cpus // client_num_cpus``. ``warm``: a
    started ``WarmEngine`` (SuperLink and Ray already up, as for a sweep's later jobs; its
    own ``ray_cpus`` then caps the workers).
    """
    from fedslm.simulations.launch import (
        flwr_run,
        read_outcome,
        simulation_federation_config,
        simulation_superlink,
        write_connection,
    )

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    # every streamed line, timestamped (Flower's configure_* lines mark the rounds' start);
    # the engine's processes still start with the quiet environment
    cfg = dataclasses.replace(cfg, verbose=True)
    sampler = ProcessTreeSampler(sample_interval)
    start = sampler.start
    stream = _Timestamped(start, echo)
    with sampler, contextlib.redirect_stdout(stream):
        with tempfile.TemporaryDirectory(prefix="fedslm-bench-") as tmp:
            home = Path(tmp)
            engine = contextlib.nullcontext(warm.address(verbose=True)) if warm else simulation_superlink(home)
            with engine as address:
                ready = time.monotonic() - start
                write_connection(home, address)
                if ray_cpus > 0:
                    cfg = dataclasses.replace(
                        cfg, federation=dataclasses.replace(cfg.federation, ray_cpus=ray_cpus))
                federation = simulation_federation_config(cfg, warm=bool(warm))
                flwr_run(cfg, home, federation_config=federation)
                finished = time.monotonic() - start
    wall = time.monotonic() - start
    summary = read_outcome(Path(cfg.output_dir), None)
    rounds_start = next((t for t, line in stream.lines if "configure_evaluate" in line), ready)
    round_end = {}
    for t, line in stream.lines:
        match = ROUND_LINE.search(line)
        if match:
            round_end.setdefault(int(match.group(1)), t)
    return EngineRun(summary, wall, ready, rounds_start, round_end, finished, sampler.result)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
