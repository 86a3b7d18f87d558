"""SecAgg+ cost and quality: ``python -m fedslm.simulations.bench secagg``.

1. Protocol cost per round, in one process (the real client stage functions of
   ``fedslm.client.secagg`` against the real server state machine of ``fedslm.server.secagg``; no
   engine, so the figures are the protocol's own): server and mean client CPU seconds
   (process time; Flower's Shamir helper uses threads), server memory (what it holds for the
   round plus the transient peak
   while unmasking, tracemalloc) and bytes up/down per client, for each number of
   clients and dropout fraction, against plain aggregation of the same float32 updates
   (the server holds n updates and sums them). Dropped clients leave after sharing keys,
   the costliest point for the server (their masks must be rebuilt).
2. Quality: real simulation-engine runs, plain FedAvg vs SecAgg+ (and with dropouts),
   final perplexity and seconds per round.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import random
import sys
import time
from typing import Any

import numpy as np

from fedslm.client import secagg as client
from fedslm.config import SecureAggregationConfig
from fedslm.secagg.protocol import threshold
from fedslm.server.secagg import Abandoned, SecAggRound, mean_update
from fedslm.simulations.bench.common import experiment, machine, run_engine, table, write_json

TINY_ADAPTER = 4096  # LoRA r=8 on q,v of the built-in tiny Llama (values per update)


def size_of(obj: Any) -> int:
    """Payload bytes as ``fedslm.server.secagg_round.record_bytes`` counts them (8 per number)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, str)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(size_of(k) + size_of(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(size_of(v) for v in obj)
    return 8


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def release_freed_memory() -> None:
    """glibc: serve every block of 4 KiB or more by mmap, so that memory freed by one
    stage is returned to the kernel instead of being reused silently by the next (which
    would hide the next stage's growth from the resident high-water mark)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 4096)  # M_MMAP_THRESHOLD


def peak_growth(fn, *args, **kwargs) -> tuple[Any, float, int]:
    """``fn``'s result, its process CPU seconds and how far the process's resident memory
    rose above where it stood (bytes): the kernel's high-water mark is reset before the
    call (``/proc/self/clear_refs``), so nothing traces allocations and the CPU time is
    the code's own (tracemalloc made Flower's pure-Python Shamir ~10x slower)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _memory_kib("VmRSS:")
    start = time.process_time()
    out = fn(*args, **kwargs)
    cpu = time.process_time() - start
    return out, cpu, max(0, _memory_kib("VmHWM:") - before) * 1024


def protocol_row(n: int, drop: float, *, size: int, neighbours: int, sa_kwargs: dict) -> dict[str, Any]:
    """One round among ``n`` clients, ``drop`` of them leaving after sharing their keys."""
    sa = SecureAggregationConfig(method="secaggplus", num_neighbours=neighbours, **sa_kwargs)
    rng = np.random.default_rng(n)
    updates = {node: rng.normal(0, 0.01, size).astype(np.float32) for node in range(1, n + 1)}
    dropped = set(random.Random(n).sample(sorted(updates), int(round(drop * n))))
    wire = np.uint32 if sa.modulus_bits <= 32 else np.uint64
    cpu = {node: 0.0 for node in updates}
    peak = {node: 0 for node in updates}
    server_cpu, server_peak, down, refused, abandoned = 0.0, 0, 0, 0, ""

    def on_client(node, fn, *args, **kwargs):
        out, seconds, grew = peak_growth(fn, *args, **kwargs)
        cpu[node] += seconds
        peak[node] = max(peak[node], grew)
        return out

    def on_server(fn, *args):
        nonlocal server_cpu, server_peak
        out, seconds, grew = peak_growth(fn, *args)
        server_cpu += seconds
        server_peak = max(server_peak, grew)
        return out

    server = SecAggRound(sa, 1, sorted(updates), size)
    t = threshold(sa, n)
    states, keys = {}, {}
    for node in updates:
        states[node], adv = on_client(node, client.advertise_keys, 1, node)
        keys[node] = (adv["pk-enc"], adv["pk-mask"], adv["commit"])
        down += 8 * 4  # stage, round, self id, num sampled
    peers = on_server(server.on_keys, keys)
    down += size_of(peers) + 8 * len(peers)
    shares = {node: on_client(node, client.share_keys, states[node], p, threshold=t, expected_threshold=t)
              for node, p in peers.items()}
    inbox = on_server(server.on_shares, shares)
    down += size_of(inbox) + n * size * 4  # ciphertexts + the global adapter (float32)
    masked = {}
    for node, cts in inbox.items():
        on_client(node, client.receive_shares, states[node], cts)
        if node in dropped:
            continue
        values, _ = on_client(node, client.prepare_update, [updates[node]], sa=sa, clip_norm=0.0,
                              noise_std=0.0, rng=np.random.default_rng(node))
        masked[node] = on_client(node, client.mask, states[node], values,
                                 modulus_bits=sa.modulus_bits).astype(wire)
    plan = on_server(server.on_masked, masked)
    down += size_of(plan)
    reveals = {}
    for node, lists in plan.items():
        try:  # a client whose neighbourhood kept fewer than threshold refuses to reveal
            reveals[node] = on_client(node, client.reveal, states[node], *lists)
        except client.ProtocolAbort:
            refused += 1
    try:
        total = on_server(server.on_unmask, reveals)
    except Abandoned as why:
        total, abandoned = None, str(why)
    survivors = len(masked)
    up_survivor = (size_of(keys) + size_of(shares)) / n + (
        sum(v.nbytes for v in masked.values()) + size_of(reveals)) / max(1, survivors)
    held = size_of(keys) + size_of(shares) + sum(v.nbytes for v in masked.values()) + size_of(reveals)
    exact = np.mean([updates[i].astype(np.float64) for i in masked], axis=0)
    mean = exact + np.inf if total is None else mean_update(total, len(masked), sa=sa)
    # plain: the server holds the survivors' float32 updates and averages them
    plain, plain_cpu, plain_peak = peak_growth(
        lambda: np.mean(np.stack([updates[i] for i in masked]).astype(np.float64), axis=0))
    update_bytes = size * 4
    client_held = max(len(s.to_json()) // 2 for s in states.values())  # hex: 2 chars a byte
    return {
        "clients": n, "dropout": drop, "neighbours": min(neighbours or n - 1, n - 1), "threshold": t,
        "survivors": survivors,
        "server_cpu_s": server_cpu, "plain_server_cpu_s": plain_cpu,
        "client_cpu_s": sum(cpu.values()) / n, "client_cpu_max_s": max(cpu.values()),
        "server_mib": (held + server_peak) / 2**20,
        "plain_server_mib": (survivors * update_bytes + plain_peak) / 2**20,
        "client_mib": (client_held + max(peak.values())) / 2**20, "plain_client_mib": update_bytes / 2**20,
        "up_bytes_per_survivor": up_survivor, "down_bytes_per_client": down / n,
        "plain_up_bytes": update_bytes, "plain_down_bytes": update_bytes,
        "up_overhead": up_survivor / update_bytes - 1,
        "down_overhead": down / n / update_bytes - 1,
        "max_abs_error": float(np.abs(mean - exact).max()),
        "refused_to_reveal": refused, "abandoned": abandoned[:80] or "no",
        "plain_vs_exact": float(np.abs(plain - exact).max()),
    }


def protocol_settings(counts: list[int], graphs: list[int], dropouts: list[float]) -> list[tuple[int, int, float]]:
    """(clients, neighbours, dropout) rows: each graph per count, a k >= n - 1 being the
    complete graph (0), listed once."""
    rows = []
    for n in counts:
        for k in dict.fromkeys(0 if k == 0 or k >= n - 1 else k for k in graphs):
            rows += [(n, k, d) for d in dropouts]
    return rows


def quality_runs(counts: list[int], dropouts: list[float], setting: dict[str, int], echo: bool
                 ) -> list[dict[str, Any]]:
    """Per client count: plain FedAvg, then SecAgg+ at each dropout, same seeds and
    settings; each compared with that count's plain run."""
    rows = []
    for n in counts:
        runs = [("plain", 0.0)] + [("secaggplus", d) for d in dropouts]
        base = None
        for i, (method, drop) in enumerate(runs):
            overrides = {"federation.num_clients": n, "federation.num_rounds": setting["rounds"],
                         "training.local_steps": setting["steps"], "training.eval_max_batches": 2,
                         "strategy.min_train_clients": n, "strategy.min_evaluate_clients": n,
                         "data.docs_per_client": setting["docs"], "federation.round_timeout": 600}
            if method != "plain":
                overrides.update({"secure_aggregation.method": method,
                                  "secure_aggregation.simulate_dropout": drop,
                                  "secure_aggregation.num_neighbours": setting["neighbours"]})
            cfg = experiment(overrides, run_name=f"secagg-{n}-{method}-{drop:g}")
            print(f"[secagg] quality: {n} clients, run {i + 1}/{len(runs)}: {method}, dropout {drop:g}",
                  flush=True)
            run = run_engine(cfg, echo=echo)
            trained = [r for r in run.summary["rounds"] if r["round"] >= 1]
            last = trained[-1]
            row = {"clients": n, "aggregation": method, "dropout": drop,
                   "weighting": cfg.secure_aggregation.weighting if method != "plain" else "examples",
                   "survivors": last.get("secagg_survivors", last.get("clients_sampled")),
                   "abandoned": int(sum(r.get("secagg_abandoned", 0) for r in trained)),
                   "eval_perplexity": last["eval_perplexity"],
                   "central_perplexity": last.get("central_perplexity"),
                   "seconds_per_round": float(np.mean([r["round_seconds"] for r in trained])),
                   "server_secagg_cpu_s": float(np.mean([r.get("secagg_server_cpu_seconds", 0.0)
                                                         for r in trained])),
                   "up_bytes_per_client": last["bytes_up"] / last["clients_sampled"],
                   "output_dir": cfg.output_dir}
            base = base or row
            row["ppl_diff"] = row["eval_perplexity"] / base["eval_perplexity"] - 1
            if row["central_perplexity"] and base["central_perplexity"]:
                row["central_ppl_diff"] = row["central_perplexity"] / base["central_perplexity"] - 1
            row["round_time_ratio"] = row["seconds_per_round"] / base["seconds_per_round"]
            rows.append(row)
    return rows


def floats(text: str, what: str, parser: argparse.ArgumentParser, kind=float) -> list:
    try:
        return [kind(v) for v in text.split(",") if v]
    except ValueError as err:
        parser.error(f"{what}: {err}")
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench secagg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,50,100", help="protocol rows: client counts ('' none)")
    parser.add_argument("--dropouts", default="0,0.1,0.3", help="protocol rows: dropout fractions")
    parser.add_argument("--graphs", default="20,0",
                        help="protocol rows: neighbours per client, each a row (0: complete graph)")
    parser.add_argument("--threshold-fraction", type=float, default=0.6)
    parser.add_argument("--size", type=int, default=TINY_ADAPTER, help="values per update")
    parser.add_argument("--quality-clients", default="10,50,100", help="engine runs: client counts ('' none)")
    parser.add_argument("--quality-dropouts", default="0,0.1,0.3", help="engine runs: SecAgg+ dropouts")
    parser.add_argument("--quality-rounds", type=int, default=2)
    parser.add_argument("--quality-steps", type=int, default=5)
    parser.add_argument("--quality-docs", type=int, default=16, help="data.docs_per_client")
    parser.add_argument("--quality-neighbours", type=int, default=0)
    parser.add_argument("--deployment-agents", type=int, default=3,
                        help="a real SuperLink and this many agents: one round plain vs SecAgg+ (0: skip)")
    parser.add_argument("--deployment-rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 5 clients, no engine runs")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/secagg.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.clients, args.dropouts, args.graphs, args.size = "5", "0,0.2", "0", 64
        args.quality_clients, args.deployment_agents = "", 0
    counts = floats(args.clients, "--clients", parser, int)
    dropouts = floats(args.dropouts, "--dropouts", parser)
    graphs = floats(args.graphs, "--graphs", parser, int)
    quality_counts = floats(args.quality_clients, "--quality-clients", parser, int)
    quality_dropouts = floats(args.quality_dropouts, "--quality-dropouts", parser)
    if any(n < 3 for n in counts + quality_counts) or any(
            not 0 <= d < 1 - args.threshold_fraction for d in dropouts + quality_dropouts):
        parser.error("--clients must be >= 3 and dropout fractions in [0, 1 - --threshold-fraction)")
    if any(k < 0 or k % 2 for k in graphs):
        parser.error("--graphs: even numbers >= 0")
    sa_kwargs = {"threshold_fraction": args.threshold_fraction}
    rows = []
    if counts:  # warm-up: first-use costs (lazy imports, crypto backend) in no row
        release_freed_memory()
        protocol_row(3, 0.0, size=64, neighbours=0, sa_kwargs=sa_kwargs)
    for n, k, drop in protocol_settings(counts, graphs, dropouts):
        print(f"[secagg] protocol: {n} clients, {k or 'all'} neighbours, dropout {drop:g}", flush=True)
        rows.append(protocol_row(n, drop, size=args.size, neighbours=k, sa_kwargs=sa_kwargs))
    if rows:
        print(f"\nProtocol cost per round, {args.size} values per update (in process; plain = the server "
              "holds and averages float32 updates):")
        print(table(rows, ["clients", "dropout", "neighbours", "threshold", "survivors", "server_cpu_s",
                           "plain_server_cpu_s", "client_cpu_s", "server_mib", "plain_server_mib",
                           "client_mib", "plain_client_mib", "up_bytes_per_survivor", "up_overhead",
                           "down_bytes_per_client", "down_overhead", "max_abs_error", "abandoned"]))
    setting = {"rounds": args.quality_rounds, "steps": args.quality_steps, "docs": args.quality_docs,
               "neighbours": args.quality_neighbours}
    quality = quality_runs(quality_counts, quality_dropouts, setting, args.echo) if quality_counts else []
    if quality:
        print(f"\nQuality, simulation engine: {setting['rounds']} rounds x {setting['steps']} steps "
              "(diff: perplexity / the same count's plain run - 1):")
        print(table(quality, ["clients", "aggregation", "dropout", "survivors", "abandoned", "eval_perplexity",
                              "ppl_diff", "central_perplexity", "central_ppl_diff", "seconds_per_round",
                              "round_time_ratio", "server_secagg_cpu_s", "up_bytes_per_client"]))
    deployment = []
    if args.deployment_agents:
        from fedslm.simulations.bench.secagg_deploy import deployment_rounds

        deployment = deployment_rounds(args.deployment_agents, rounds=args.deployment_rounds)
        print(f"\nDeployment engine, {args.deployment_agents} agents (TLS, node auth, 127.0.0.1):")
        print(table(deployment, ["aggregation", "round", "round_seconds", "round_time_ratio",
                                 "server_secagg_cpu_s", "bytes_up_per_client"]))
    result = {"benchmark": "secagg", "protocol": rows, "quality_setting": setting, "quality": quality,
              "deployment": deployment, "secure_aggregation": sa_kwargs, "machine": machine()}
    print(f"\nwrote {write_json('secagg', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
