"""Memory of a device agent while it trains: RSS of the SuperNode and its ClientApp.

    python -m fedslm.simulations.bench.agent_memory                      # tiny model, 2 devices
    python -m fedslm.simulations.bench.agent_memory --rounds 3 --local-steps 20 --out mem.json

Runs a real local deployment (TLS SuperLink with node authentication, two agents on
their own data) and samples /proc of device 1's process tree every 50 ms: the agent
wrapper, ``flower-supernode``, its ``flower-superexec``, and each ``flwr-clientapp``
process Flower starts per message. RSS counts shared pages (e.g. Python and flwr,
loaded by every process) once per process; PSS splits them, so the PSS sum is what the
device actually pays. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedslm.simulations.local_deployment import Deployment, descendants

ROLES = (("flwr-clientapp", "clientapp"), ("flower-superexec", "superexec"),
         ("flower-supernode", "supernode"), ("fedslm.client.agent", "agent"))


def role_of(cmdline: str) -> str | None:
    for needle, role in ROLES:
        if needle in cmdline:
            return role
    return None


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it is gone."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        pss = next((int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                    if line.startswith("Pss:")), 0)
        return rss, pss
    except (OSError, StopIteration):
        return 0, 0


def sample(root_pid: int) -> dict[str, tuple[int, int]]:
    """Per role: summed (RSS, PSS) over the agent's live process tree."""
    out: dict[str, tuple[int, int]] = {}
    for pid in [root_pid, *descendants(root_pid)]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        role = role_of(cmd)
        if role:
            rss, pss = memory_kib(pid)
            prev = out.get(role, (0, 0))
            out[role] = (prev[0] + rss, prev[1] + pss)
    return out


def measure(args: argparse.Namespace, root: Path) -> dict:
    dep = Deployment(root)
    peaks: dict[str, list[int]] = {}
    try:
        dep.start_federation(2)
        idle = sample(dep.agents[1].pid)
        start = time.monotonic()
        run = dep.submit("federation.num_clients=2", f"federation.num_rounds={args.rounds}",
                         f"training.local_steps={args.local_steps}", "training.central_eval=false",
                         f"tracking.uri=sqlite:///{root / 'mlflow.db'}", name="bench")
        while run.poll() is None:
            now = sample(dep.agents[1].pid)
            both = (now.get("supernode", (0, 0))[0] + now.get("clientapp", (0, 0))[0],
                    now.get("supernode", (0, 0))[1] + now.get("clientapp", (0, 0))[1])
            total = (sum(v[0] for v in now.values()), sum(v[1] for v in now.values()))
            for key, (rss, pss) in {**now, "supernode+clientapp": both, "agent tree": total}.items():
                peak = peaks.setdefault(key, [0, 0])
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.05)
        if run.returncode != 0:
            raise SystemExit(f"the benchmark run failed\n{dep.tail()}")
        seconds = time.monotonic() - start
    finally:
        dep.stop_all()
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return {"model": "builtin:tiny-llama", "rounds": args.rounds, "local_steps": args.local_steps,
            "run_seconds": round(seconds, 1),
            "idle_mib": {k: {"rss": mib(v[0]), "pss": mib(v[1])} for k, v in idle.items()},
            "peak_mib": {k: {"rss": mib(v[0]), "pss": mib(v[1])} for k, v in peaks.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedslm-agent-mem-") as tmp:
        result = measure(args, Path(tmp))
    print(f"Device agent memory, tiny model, {args.rounds} rounds x {args.local_steps} local steps "
          f"(run took {result['run_seconds']} s)")
    print(f"{'process':22} {'idle RSS':>9} {'peak RSS':>9} {'peak PSS':>9}  (MiB)")
    for key, peak in result["peak_mib"].items():
        idle = result["idle_mib"].get(key, {}).get("rss", "-")
        print(f"{key:22} {idle:>9} {peak['rss']:>9} {peak['pss']:>9}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
