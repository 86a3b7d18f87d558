"""fuzz: random and mutated client replies through the server's whole reply pipeline.

Each case is one round's replies (one honest, the rest random or mutated from honest
ones: payload bytes flipped, inserted, cut; npy headers rewritten; declared shapes and
dtypes changed; records and metric keys added, dropped, retyped; compression methods
and scales changed; status replies with random metrics) sent through what the round
loop does with them: status screening, decoding against the configured compression,
train screening, bounded influence, Flower's FedAvg ``aggregate_train``, evaluate
screening, the weight cap and Flower's ``aggregate_evaluate``. Unexpected: any exception
escaping, a rejection that came from the catch-all (an exception screening did not
name), a non-finite or out-of-bound aggregate, or a reply decoded at a size other than
the reference's. Reported: cases, unexpected count by kind, slowest case, and the peak
memory a case allocated (tracemalloc) against the reference adapter's size. Per case
both wall time and this process's CPU time: on a shared machine a wall-time maximum
measures the scheduler (a case of 2 ms CPU took 3.4 s wall at load 20 on 2 cores), the
CPU time what the pipeline does. Like the ServerApp (``freeze_startup_objects``), the
objects that exist before the first counted case are left out of full garbage
collections, which otherwise walk ~400,000 of them inside some case.

    python -m fedslm.simulations.bench fuzz --cases 100000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from collections import Counter
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

METHODS = ("none", "fp16", "int8", "int4")
METRIC_KEYS = ("num-examples", "loss", "perplexity", "accuracy", "partition-id", "dp-epsilon",
               "dp-delta", "confusion", "rouge_l_sum", "x")
CATCH_ALL = ("unreadable reply", "compressed update unreadable")


def reference_adapter(rng: np.random.Generator) -> ArrayRecord:
    return ArrayRecord({"l0.lora_A.weight": Array(rng.normal(0, 0.1, (2, 3)).astype(np.float32)),
                        "l0.lora_B.weight": Array(np.zeros((3, 2), np.float32))})


def message(node: int, content: RecordDict, kind: str = "train") -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="q", group_id="1", created_at=0.0, ttl=60.0,
                        message_type=kind)
    return make_message(metadata, content)


def honest_train(reference: ArrayRecord, method: str, rng: np.random.Generator) -> RecordDict:
    from fedslm.compression import update_records

    received = {k: v.numpy() for k, v in reference.items()}
    trained = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in received.items()}
    records = update_records(trained, received, method=method, residual_path=None)
    return RecordDict({**records, "metrics": MetricRecord({"num-examples": int(rng.integers(1, 50)),
                                                           "loss": 2.0})})


def check_round(train: list[RecordDict], evaluate: list[RecordDict], reference: ArrayRecord,
                method: str) -> list[str]:
    """Run one round's replies through the reply pipeline; the unexpected outcomes."""
    from flwr.serverapp.strategy import FedAvg

    from fedslm.compression import CompressionError, decode_update
    from fedslm.config import RobustConfig
    from fedslm.replies import MAX_PARAM_ABS
    from fedslm.server.decompress import decode_train_replies
    from fedslm.server.metrics import client_rows
    from fedslm.server.screening import (bound_influence, cap_evaluate_weights, for_flower_evaluate,
                                  screen_evaluate_replies, screen_status_replies,
                                  screen_train_replies)

    bad: list[str] = []
    for content in train:  # the compressed decoder alone raises only CompressionError
        try:
            full = decode_update(content, reference)
            if full is not None and [a.shape for a in full.values()] != [a.shape for a in reference.values()]:
                bad.append("decode_update: wrong shape")
        except CompressionError:
            pass
        except Exception as err:  # noqa: BLE001
            bad.append(f"decode_update: {type(err).__name__}")
    try:
        msgs = [message(i + 1, c) for i, c in enumerate(train)]
        status = screen_status_replies(msgs)
        decoded = decode_train_replies(status.accepted, reference, method)
        screened = screen_train_replies(decoded.accepted, reference)
        reasons = [*status.rejected.values(), *decoded.rejected.values(), *screened.rejected.values()]
        bounded = bound_influence(screened.accepted, reference, RobustConfig())
        if bounded.replies:
            arrays, _ = FedAvg().aggregate_train(1, bounded.replies)
            for value in arrays.values():
                v = value.numpy()
                if not np.isfinite(v).all() or np.abs(v).max() > MAX_PARAM_ABS:
                    bad.append("aggregate out of bounds")
        ev = screen_evaluate_replies([message(i + 1, c, "evaluate") for i, c in enumerate(evaluate)])
        reasons += list(ev.rejected.values())
        rows = client_rows("evaluate", 1, ev.accepted)
        cap_evaluate_weights(rows, RobustConfig().weight_cap)
        if ev.accepted:
            FedAvg().aggregate_evaluate(1, for_flower_evaluate(ev.accepted, rows))
        bad += [f"catch-all: {r.split('(')[1].split(':')[0]}" for r in reasons if r.startswith(CATCH_ALL)]
    except Exception as err:  # noqa: BLE001
        bad.append(f"pipeline: {type(err).__name__}: {str(err)[:80]}")
    return bad


# ---- random and mutated replies (numpy RNG: fast enough for 10^5 cases) ---------------


def _mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(5)
        pos = int(rng.integers(0, max(1, len(b))))
        if op == 0 and b:
            b[pos % len(b)] = int(rng.integers(256))
        elif op == 1:
            b[pos:pos] = rng.bytes(int(rng.integers(1, 9)))
        elif op == 2:
            del b[pos:pos + int(rng.integers(1, 9))]
        elif op == 3:  # rewrite the npy header dict
            header = rng.choice([b"{'descr': '<f8', 'fortran_order': False, 'shape': (6,), }",
                                 b"{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }",
                                 b"{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
                                 b"{'descr': '<f4', 'fortran_order': False, 'shape': (4,",
                                 b"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
                                 b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }",
                                 b"__import__('os')", b"{'descr': '<f4'}"])
            head = header + b" " * (63 - (10 + len(header)) % 64) + b"\n"
            b = bytearray(b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + bytes(b[128:]))
        else:
            b = b[:pos]
    return bytes(b)


def _mutate_array(arr: Array, rng: np.random.Generator) -> Array:
    op = rng.integers(4)
    dtype, shape, stype, data = arr.dtype, list(arr.shape), arr.stype, arr.data
    if op == 0:
        data = _mutate_bytes(data, rng)
    elif op == 1:
        shape = [int(x) for x in rng.choice([0, 1, 3, 2**31, 2**62, 10**11], size=int(rng.integers(0, 3)))]
        if rng.random() < 0.3:
            shape = [2**70]
    elif op == 2:
        dtype = str(rng.choice(["float64", "float16", "int8", "object", "bogus"]))
    else:
        stype = str(rng.choice(["torch", "", "numpy.ndarray"]))
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def _random_value(rng: np.random.Generator) -> Any:
    op = rng.integers(8)
    if op == 0:
        return float(rng.choice([np.nan, np.inf, -np.inf, 1e300, -1.0, 0.0]))
    if op == 1:
        return int(rng.choice([0, -1, 1, 10**12, 2**62]))
    if op == 2:
        return [int(x) for x in rng.integers(-2, 5, size=int(rng.integers(0, 5)))]
    if op == 3:
        return [float(x) for x in rng.normal(size=int(rng.integers(0, 4)))]
    return float(rng.normal(0, 10))


def _mutate_metrics(metrics: MetricRecord, rng: np.random.Generator) -> MetricRecord:
    out = dict(metrics)
    for _ in range(int(rng.integers(1, 3))):
        key = str(rng.choice(METRIC_KEYS))
        if rng.random() < 0.3:
            out.pop(key, None)
        else:
            out[key] = _random_value(rng)
    try:
        return MetricRecord(out)
    except Exception:  # noqa: BLE001 - Flower refuses the value: the sender could not send it
        return metrics


def hostile_train(content: RecordDict, rng: np.random.Generator) -> RecordDict:
    records = dict(content.items())
    for _ in range(int(rng.integers(1, 3))):
        op = rng.integers(7)
        if op in (0, 1) and isinstance(records.get("arrays"), ArrayRecord) and len(records["arrays"]):
            arrays = dict(records["arrays"].items())
            name = str(rng.choice(sorted(arrays)))
            arrays[name] = _mutate_array(arrays[name], rng)
            if rng.random() < 0.2:
                arrays["extra"] = Array(rng.normal(size=3).astype(np.float32))
            records["arrays"] = ArrayRecord(arrays)
        elif op == 2 and isinstance(records.get("metrics"), MetricRecord):
            records["metrics"] = _mutate_metrics(records["metrics"], rng)
        elif op == 3:
            records["compression"] = ConfigRecord({"method": str(rng.choice([*METHODS, "zip", ""]))})
        elif op == 4:
            records[str(rng.choice(["arrays", "metrics", "status", "compression", "more"]))] = (
                [MetricRecord({"x": 1.0}), ConfigRecord({"a": "b"}), ArrayRecord()][rng.integers(3)])
        elif op == 5:
            records = {"metrics": _mutate_metrics(MetricRecord({"partition-id": 1, "dp-epsilon": 1.0}), rng),
                       "status": ConfigRecord({"status": str(rng.choice(["budget-exhausted", "x"])),
                                               "message": "spent"})}
        else:
            records.pop(str(rng.choice(["arrays", "metrics", "compression"])), None)
    return RecordDict(records)


def hostile_evaluate(rng: np.random.Generator) -> RecordDict:
    base = MetricRecord({"loss": 2.0, "num-examples": 10, "accuracy": 0.5})
    records: dict[str, Any] = {"metrics": _mutate_metrics(base, rng)}
    if rng.random() < 0.1:
        records["arrays"] = ArrayRecord()
    return RecordDict(records)


def random_round(rng: np.random.Generator, reference: ArrayRecord, method: str,
                 pool: dict[str, list[RecordDict]]) -> tuple[list[RecordDict], list[RecordDict]]:
    """One honest reply and 1-3 hostile ones mutated from honest ones of ``pool`` (the
    pipeline rebinds a message's content, never changes a record in place)."""
    def honest(m: str) -> RecordDict:
        return pool[m][int(rng.integers(len(pool[m])))]

    train = [honest(method)]
    train += [hostile_train(honest(str(rng.choice(METHODS)) if rng.random() < 0.2 else method), rng)
              for _ in range(int(rng.integers(1, 4)))]
    evaluate = [RecordDict({"metrics": MetricRecord({"loss": 2.0, "num-examples": 10})})]
    evaluate += [hostile_evaluate(rng) for _ in range(int(rng.integers(1, 3)))]
    return train, evaluate


WARMUP = 20  # first cases import modules: not counted in time or memory
MEMORY_EVERY = 50  # tracemalloc slows a case several times: trace one case in this many
PROGRESS_EVERY = 5000  # a progress line on stderr


def run(cases: int, seed: int) -> dict[str, Any]:
    import logging

    from fedslm.server.rounds import freeze_startup_objects

    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregation
    rng = np.random.default_rng(seed)
    reference = reference_adapter(rng)
    pool = {m: [honest_train(reference, m, rng) for _ in range(16)] for m in METHODS}
    ref_bytes = sum(a.numpy().nbytes for a in reference.values())
    unexpected: Counter[str] = Counter()
    times: list[float] = []
    cpu_times: list[float] = []
    peak, replies = 0, 0
    start = time.perf_counter()
    for i in range(cases):
        method = METHODS[i % len(METHODS)]
        train, evaluate = random_round(rng, reference, method, pool)
        replies += len(train) + len(evaluate)
        traced = i >= WARMUP and i % MEMORY_EVERY == 0
        if traced:
            tracemalloc.start()
        if i == WARMUP:
            freeze_startup_objects()
        t0, c0 = time.perf_counter(), time.process_time()
        unexpected.update(check_round(train, evaluate, reference, method))
        if traced:
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        elif i >= WARMUP:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        if (i + 1) % PROGRESS_EVERY == 0:  # a long run shows it is alive and how it stands
            print(f"  {i + 1:,} cases, {sum(unexpected.values())} unexpected, "
                  f"slowest {max(cpu_times, default=0.0) * 1000:.1f} ms CPU, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return {"cases": cases, "replies": replies, "seed": seed,
            "unexpected": sum(unexpected.values()), "unexpected_kinds": dict(unexpected),
            "slowest_case_s": max(times, default=0.0),
            "slowest_case_cpu_s": max(cpu_times, default=0.0),
            "p99_case_cpu_s": float(np.percentile(cpu_times, 99)) if cpu_times else 0.0,
            "cases_over_100ms_wall": sum(t > 0.1 for t in times),
            "cases_over_100ms_cpu": sum(t > 0.1 for t in cpu_times),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "p99_case_s": float(np.percentile(times, 99)) if times else 0.0, "seconds": time.perf_counter() - start,
            "peak_case_alloc_bytes": peak, "reference_adapter_bytes": ref_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cases < 1:
        print("error: --cases must be >= 1", file=sys.stderr)
        return 2
    from fedslm.simulations.bench.common import write_json

    result = run(args.cases, args.seed)
    print(f"fuzz: {result['cases']:,} rounds, {result['replies']:,} replies, "
          f"{result['unexpected']} unexpected {result['unexpected_kinds'] or ''}; slowest case "
          f"{result['slowest_case_s'] * 1000:.1f} ms wall (p99 {result['p99_case_s'] * 1000:.1f} ms, "
          f"{result['cases_over_100ms_wall']} over 100 ms), "
          f"{result['slowest_case_cpu_s'] * 1000:.1f} ms CPU (p99 {result['p99_case_cpu_s'] * 1000:.1f} ms, "
          f"{result['cases_over_100ms_cpu']} over 100 ms); "
          f"peak allocation in a case "
          f"{result['peak_case_alloc_bytes']:,} B (adapter {result['reference_adapter_bytes']} B); "
          f"{result['seconds']:.0f} s")
    print(f"wrote {write_json('fuzz', result, args.out)}")
    return 1 if result["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
