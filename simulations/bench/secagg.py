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
import random
import sys
import time
import tracemalloc
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


def protocol_row(n: int, drop: float, *, size: int, neighbours: int, sa_kwargs: dict) -> dict[str, Any]:
    sa = SecureAggregationConfig(method="secaggplus", num_neighbours=neighbours, **sa_kwargs)
    rng = np.random.default_rng(n)
    updates = {node: rng.normal(0, 0.01, size).astype(np.float32) for node in range(1, n + 1)}
    dropped = set(random.Random(n).sample(sorted(updates), int(round(drop * n))))
    wire = np.uint32 if sa.modulus_bits <= 32 else np.uint64
    client_cpu, server_cpu, down, refused, abandoned = 0.0, 0.0, 0, 0, ""
    held, transient = 0, 0
    tracemalloc.start()

    def on_client(fn, *args, **kwargs):
        nonlocal client_cpu
        start = time.process_time()
        out = fn(*args, **kwargs)
        client_cpu += time.process_time() - start
        return out

    def on_server(fn, *args):
        nonlocal server_cpu, transient
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        start = time.process_time()
        out = fn(*args)
        server_cpu += time.process_time() - start
        transient = max(transient, tracemalloc.get_traced_memory()[1] - before)
        return out

    server = SecAggRound(sa, 1, sorted(updates), size)
    t = threshold(sa, n)
    states, keys = {}, {}
    for node in updates:
        states[node], adv = on_client(client.advertise_keys, 1, node)
        keys[node] = (adv["pk-enc"], adv["pk-mask"], adv["commit"])
        down += 8 * 4  # stage, round, self id, num sampled
    peers = on_server(server.on_keys, keys)
    down += size_of(peers) + 8 * len(peers)
    shares = {node: on_client(client.share_keys, states[node], p, threshold=t, expected_threshold=t)
              for node, p in peers.items()}
    inbox = on_server(server.on_shares, shares)
    down += size_of(inbox) + n * size * 4  # ciphertexts + the global adapter (float32)
    masked = {}
    for node, cts in inbox.items():
        on_client(client.receive_shares, states[node], cts)
        if node in dropped:
            continue
        values, _ = on_client(client.prepare_update, [updates[node]], sa=sa, clip_norm=0.0, noise_std=0.0,
                              rng=np.random.default_rng(node))
        masked[node] = on_client(client.mask, states[node], values, modulus_bits=sa.modulus_bits).astype(wire)
    plan = on_server(server.on_masked, masked)
    down += size_of(plan)
    reveals = {}
    for node, lists in plan.items():
        try:  # a client whose neighbourhood kept fewer than threshold refuses to reveal
            reveals[node] = on_client(client.reveal, states[node], *lists)
        except client.ProtocolAbort:
            refused += 1
    try:
        total = on_server(server.on_unmask, reveals)
    except Abandoned as why:
        total, abandoned = None, str(why)
    survivors = len(masked)
    up_survivor = (size_of(keys) + size_of(shares)) / n + (
        sum(v.nbytes for v in masked.values()) + size_of(reveals)) / survivors
    held = size_of(keys) + size_of(shares) + sum(v.nbytes for v in masked.values()) + size_of(reveals)
    tracemalloc.stop()
    exact = np.mean([updates[i].astype(np.float64) for i in masked], axis=0)
    mean = exact + np.inf if total is None else mean_update(total, len(masked), sa=sa)
    # plain: the server holds n float32 updates and sums them
    start = time.process_time()
    for _ in range(5):
        plain = np.mean(np.stack([updates[i] for i in masked]).astype(np.float64), axis=0)
    plain_cpu = (time.process_time() - start) / 5
    update_bytes = size * 4
    return {
        "clients": n, "dropout": drop, "neighbours": min(neighbours or n - 1, n - 1), "threshold": t,
        "server_cpu_s": server_cpu, "plain_server_cpu_s": plain_cpu,
        "client_cpu_s": client_cpu / n,
        "server_mib": (held + transient) / 2**20, "plain_server_mib": (len(masked) * update_bytes + size * 8) / 2**20,
        "up_bytes_per_survivor": up_survivor, "down_bytes_per_client": down / n,
        "plain_up_bytes": update_bytes, "plain_down_bytes": update_bytes,
        "up_overhead": up_survivor / update_bytes - 1,
        "max_abs_error": float(np.abs(mean - exact).max()),
        "refused_to_reveal": refused, "abandoned": abandoned[:80] or "no",
        "plain_vs_exact": float(np.abs(plain - exact).max()),
    }


def quality_runs(setting: dict[str, int], dropouts: list[float], echo: bool) -> list[dict[str, Any]]:
    rows = []
    runs = [("plain", 0.0)] + [("secaggplus", d) for d in dropouts]
    for i, (method, drop) in enumerate(runs):
        overrides = {"federation.num_clients": setting["clients"], "federation.num_rounds": setting["rounds"],
                     "training.local_steps": setting["steps"], "training.eval_max_batches": 4,
                     "strategy.min_train_clients": setting["clients"]}
        if method != "plain":
            overrides.update({"secure_aggregation.method": method, "secure_aggregation.simulate_dropout": drop})
        cfg = experiment(overrides, run_name=f"secagg-{method}-{drop:g}")
        print(f"[secagg] quality run {i + 1}/{len(runs)}: {method}, dropout {drop:g}", flush=True)
        run = run_engine(cfg, echo=echo)
        trained = [r for r in run.summary["rounds"] if r["round"] >= 1]
        last = trained[-1]
        rows.append({"aggregation": method, "dropout": drop, "eval_perplexity": last["eval_perplexity"],
                     "central_perplexity": last.get("central_perplexity"),
                     "seconds_per_round": float(np.mean([r["round_seconds"] for r in trained])),
                     "survivors": last.get("secagg_survivors", last.get("clients_sampled")),
                     "up_bytes_per_client": last["bytes_up"] / last["clients_sampled"],
                     "output_dir": cfg.output_dir})
    base = rows[0]
    for row in rows:
        row["ppl_diff"] = row["eval_perplexity"] / base["eval_perplexity"] - 1
        if row["central_perplexity"] and base["central_perplexity"]:
            row["central_ppl_diff"] = row["central_perplexity"] / base["central_perplexity"] - 1
        row["round_time_ratio"] = row["seconds_per_round"] / base["seconds_per_round"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench secagg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,50,100", help="comma-separated client counts")
    parser.add_argument("--dropouts", default="0,0.1,0.3", help="comma-separated dropout fractions")
    parser.add_argument("--neighbours", type=int, default=0, help="0: every other client (SecAgg)")
    parser.add_argument("--threshold-fraction", type=float, default=0.6)
    parser.add_argument("--size", type=int, default=TINY_ADAPTER, help="values per update")
    parser.add_argument("--quality-clients", type=int, default=10)
    parser.add_argument("--quality-rounds", type=int, default=3)
    parser.add_argument("--quality-steps", type=int, default=10)
    parser.add_argument("--quality-dropouts", default="0,0.3", help="'' for no engine runs")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/secagg.json)")
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",") if c]
        dropouts = [float(d) for d in args.dropouts.split(",") if d]
        quality_dropouts = [float(d) for d in args.quality_dropouts.split(",") if d]
    except ValueError as err:
        parser.error(f"--clients/--dropouts/--quality-dropouts: {err}")
    if any(n < 3 for n in counts) or any(not 0 <= d < 0.5 for d in dropouts + quality_dropouts):
        parser.error("--clients must be >= 3 and dropout fractions in [0, 0.5) (threshold 0.6)")
    sa_kwargs = {"threshold_fraction": args.threshold_fraction}
    rows = []
    for n in counts:
        for drop in dropouts:
            print(f"[secagg] protocol: {n} clients, dropout {drop:g}", flush=True)
            rows.append(protocol_row(n, drop, size=args.size, neighbours=args.neighbours, sa_kwargs=sa_kwargs))
    print(f"\nProtocol cost per round, {args.size} values per update (in process; plain = the server "
          "holds and averages float32 updates):")
    print(table(rows, ["clients", "dropout", "neighbours", "threshold", "server_cpu_s",
                       "plain_server_cpu_s", "client_cpu_s",
                       "server_mib", "plain_server_mib", "up_bytes_per_survivor", "down_bytes_per_client",
                       "plain_up_bytes", "up_overhead", "max_abs_error", "abandoned"]))
    setting = {"clients": args.quality_clients, "rounds": args.quality_rounds, "steps": args.quality_steps}
    quality = quality_runs(setting, quality_dropouts, args.echo) if quality_dropouts else []
    if quality:
        print(f"\nQuality, simulation engine: {setting['clients']} clients x {setting['rounds']} rounds x "
              f"{setting['steps']} steps (diff: perplexity / plain's - 1):")
        print(table(quality, ["aggregation", "dropout", "survivors", "eval_perplexity", "ppl_diff",
                              "central_perplexity", "central_ppl_diff", "seconds_per_round",
                              "round_time_ratio", "up_bytes_per_client"]))
    result = {"benchmark": "secagg", "protocol": rows, "quality_setting": setting, "quality": quality,
              "secure_aggregation": sa_kwargs, "machine": machine()}
    print(f"\nwrote {write_json('secagg', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
