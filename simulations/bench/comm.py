"""comm: bytes each client sends and receives per round, and what compression costs in quality.

Bytes are counted exactly as the round loop does (``fedslm.adapters.payload_bytes``: the
serialized tensors, npy headers included, names excluded) and, as a check, as the whole
protobuf record (names and framing included):

* full fine-tuning of the base model: its state, every parameter once (tied embeddings
  once), packed into an ArrayRecord as float32, down and up;
* LoRA at r = 4, 8, 16 on the default target modules: the float32 adapter, down and up;
* compressed updates (``compression.method`` fp16, int8, int4): the uplink delta; the
  downlink stays the float32 adapter.

Quality: the default synthetic setting (10 clients x 5 rounds, LoRA r=8) on the
simulation engine per compression method (int4 at r=8 and int8 at r=4 are the deltas
under 1/200 of full fine-tuning), with and without error feedback; the cost is final
perplexity relative to the first uncompressed run at the default rank.
Client dropout draws differ between engine runs, so an uncompressed run is repeated to
show the run-to-run noise a difference must exceed. The engine's own per-round
``bytes_up`` is reported next to the static count.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from fedslm.config import COMPRESSION_METHODS as METHODS
from fedslm.simulations.bench.common import experiment, machine, run_engine, table, write_json

RANKS = (4, 8, 16)
TARGET_REDUCTION = 200.0
TARGET_QUALITY_COST = 0.01
QUALITY_RUNS = ("none", "none", "fp16", "int8", "int8-no-ef", "int4", "int4-no-ef",
                "none@r4", "int8@r4")


def parse_run(name: str) -> tuple[str, bool, int]:
    """``method[-no-ef][@rN]`` -> (compression method, error feedback, LoRA rank; 0 = default)."""
    spec, _, rank = name.partition("@r")
    method = spec.removesuffix("-no-ef")
    if method not in METHODS or (rank and not rank.isdigit()):
        raise ValueError(name)
    return method, not spec.endswith("-no-ef"), int(rank or 0)


def record_bytes(records: dict) -> tuple[int, int]:
    """(tensor payload bytes of the "arrays" record, protobuf bytes of all records)."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedslm.adapters import payload_bytes

    return payload_bytes(records["arrays"]), recorddict_to_proto(RecordDict(records)).ByteSize()


def static_rows(cfg) -> list[dict[str, Any]]:
    """Bytes per client per round for full fine-tuning, LoRA ranks and compression."""
    import torch

    from fedslm.adapters import adapter_arrays, to_array_record
    from fedslm.compression import update_records
    from fedslm.config import PeftConfig
    from fedslm.model import build_peft_model, load_base_model
    from fedslm.runtime import model_path

    path = model_path(cfg.model, cfg.data.seed)
    base, _ = load_base_model(path, dtype="float32")
    full = {n: p.detach().numpy().copy() for n, p in base.named_parameters()}
    full_up, full_proto = record_bytes({"arrays": to_array_record(full)})
    rows = [{"update": "full fine-tuning", "params": sum(v.size for v in full.values()),
             "up_bytes": full_up, "down_bytes": full_up, "up_proto_bytes": full_proto}]
    rng = np.random.default_rng(0)
    for r in RANKS:
        base, _ = load_base_model(path, dtype="float32")
        torch.manual_seed(0)
        received = adapter_arrays(build_peft_model(base, PeftConfig(r=r, alpha=2.0 * r)))
        trained = {n: v + 1e-3 * rng.standard_normal(v.shape).astype(np.float32)
                   for n, v in received.items()}
        down, _ = record_bytes({"arrays": to_array_record(received)})
        for method in METHODS:
            up, proto = record_bytes(update_records(trained, received, method=method, residual_path=None))
            rows.append({"update": f"LoRA r={r}" + ("" if method == "none" else f" {method} delta"),
                         "params": sum(v.size for v in received.values()),
                         "up_bytes": up, "down_bytes": down, "up_proto_bytes": proto})
    for row in rows:
        row["up_reduction"] = full_up / row["up_bytes"]
        row["up_proto_reduction"] = full_proto / row["up_proto_bytes"]
    return rows


def quality_runs(methods: tuple[str, ...], setting: dict[str, int], echo: bool,
                 ray_cpus: int = 0) -> list[dict[str, Any]]:
    """One engine run per method; ``ray_cpus`` > 0 caps its Ray (``federation.ray_cpus``)."""
    rows = []
    for i, name in enumerate(methods):
        method, ef, rank = parse_run(name)
        overrides = {"federation.num_clients": setting["clients"],
                     "federation.num_rounds": setting["rounds"],
                     "training.local_steps": setting["steps"],
                     "compression.method": method, "compression.error_feedback": ef}
        if ray_cpus:
            overrides["federation.ray_cpus"] = ray_cpus
        if rank:
            overrides.update({"peft.r": rank, "peft.alpha": 2.0 * rank})  # same alpha / r
        cfg = experiment(overrides, run_name=f"comm-{name.replace('@', '-')}-{i}")
        print(f"[comm] quality run {i + 1}/{len(methods)}: compression {name}", flush=True)
        run = run_engine(cfg, echo=echo)
        last = run.summary["rounds"][-1]
        trained = [r for r in run.summary["rounds"] if r["round"] >= 1]
        rows.append({
            "compression": name, "lora_r": cfg.peft.r,
            "eval_perplexity": last["eval_perplexity"],
            "central_perplexity": last.get("central_perplexity"),
            "engine_up_bytes_per_client": trained[-1]["bytes_up"] / trained[-1]["clients_sampled"],
            "output_dir": cfg.output_dir,
        })
    reference = next((r for r in rows if r["compression"] == "none"), None)
    for row in rows:
        if reference is not None:
            row["ppl_cost"] = row["eval_perplexity"] / reference["eval_perplexity"] - 1
            if row["central_perplexity"] and reference["central_perplexity"]:
                row["central_ppl_cost"] = row["central_perplexity"] / reference["central_perplexity"] - 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench comm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="local steps per round")
    parser.add_argument("--quality", default=",".join(QUALITY_RUNS),
                        help="engine runs, comma-separated method[-no-ef][@rN] with method "
                             f"{', '.join(METHODS)} (e.g. int8@r4: int8 at LoRA r=4); '' for none")
    parser.add_argument("--tiny", action="store_true",
                        help="one int4 engine run at 2 clients x 1 round x 2 steps on one Ray worker (smoke test)")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/comm.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.clients, args.rounds, args.steps, args.quality = 2, 1, 2, "int4"
    methods = tuple(m for m in args.quality.split(",") if m)
    for name in methods:
        try:
            parse_run(name)
        except ValueError:
            parser.error(f"--quality: {name!r} is not method[-no-ef][@rN] with method "
                         f"{', '.join(METHODS)}")
    cfg = experiment({}, run_name="comm-static")
    rows = static_rows(cfg)
    for row in rows:
        row["target"] = TARGET_REDUCTION
        row["met"] = "yes" if row["up_reduction"] >= TARGET_REDUCTION else "no"
    print(table(rows, ["update", "params", "up_bytes", "down_bytes", "up_reduction", "target", "met",
                       "up_proto_bytes", "up_proto_reduction"]))
    setting = {"clients": args.clients, "rounds": args.rounds, "steps": args.steps}
    quality = quality_runs(methods, setting, args.echo, ray_cpus=1 if args.tiny else 0) if methods else []
    if quality:
        for row in quality:
            row["target"] = TARGET_QUALITY_COST
            cost = row.get("ppl_cost")
            row["met"] = None if cost is None else ("yes" if cost <= TARGET_QUALITY_COST else "no")
        print(f"\nQuality after {args.rounds} rounds, {args.clients} clients x {args.steps} steps "
              f"(cost: perplexity / the first uncompressed run's - 1):")
        print(table(quality, ["compression", "lora_r", "eval_perplexity", "ppl_cost", "target", "met",
                              "central_perplexity", "central_ppl_cost", "engine_up_bytes_per_client"]))
    result = {"benchmark": "comm", "bytes": rows, "quality_setting": setting, "quality": quality,
              "targets": {"up_reduction": TARGET_REDUCTION, "ppl_cost": TARGET_QUALITY_COST},
              "machine": machine()}
    print(f"\nwrote {write_json('comm', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
