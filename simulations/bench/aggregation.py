"""aggregation: what each LoRA aggregation rule costs the server and what it buys in quality.

Server cost (in process, no engine, one BLAS thread): aggregating ``--clients`` replies of a SmolLM2-135M
sized adapter (30 layers x q_proj, v_proj at 576 x 576, rank 8) with each rule: median
wall time of 3 and peak numpy memory (tracemalloc) of one aggregation. FFA averages only
B; fedavg averages A and B; flora stacks and re-factors with a thin QR/SVD; flexlora
forms each layer's dense ``576 x 576`` mean product and takes its SVD.

Quality (simulation engine, built-in synthetic data): each rule at data heterogeneity 0
and 1, then per-client ranks (a 4/8/16 mix, global rank 16) against everyone at r=4 and
everyone at r=16, with ``peft.alpha = 2 r`` so the LoRA scale is the same everywhere;
and every rule (and the 4/8/16 mix) under DP-FedAvg at noise 0.5 and 1.0 (same clipping,
same ε; ``fedslm.aggregation.private``). ``--data shakespeare``: the same runs on
Shakespeare by speaker; ``--data sst2``: SST-2 sentiment classification (``task=classify``,
the shared ``sst2/train.tsv`` read in place) with label skew (Dirichlet alpha 0.3 over the
label). ``--set KEY=VALUE`` (repeatable) adds an override to every run.
``--centralised``: no federation, no engine: one adapter trained on the whole
``sst2/train.tsv`` for ``--steps`` steps (with the ``--set`` overrides) and scored on
``sst2/dev.tsv``, to see whether the model can learn the task at all.
Reported: final eval and central perplexity (classification: accuracy and macro-F1, and
the per-round central macro-F1 curve), bytes up and down per round (train + evaluate),
the server's aggregation time per round. One run per row: differences of a
few hundredths of perplexity are within run-to-run noise (client sampling is seeded,
thread timing is not).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from typing import Any

import numpy as np
import yaml

from fedslm.shared_data import shared_data_path
from fedslm.simulations.bench.common import experiment, machine, run_engine, table, write_json

RULES = ("fedavg", "ffa", "flora", "flexlora")
MIX = "30% r=4, 50% r=8, 20% r=16"
RANK_RUNS = {  # name: overrides
    "mix 4/8/16 fedavg": {"peft.r": 16, "peft.alpha": 32.0, "peft.ranks": MIX},
    "mix 4/8/16 flexlora": {"peft.r": 16, "peft.alpha": 32.0, "peft.ranks": MIX,
                            "aggregation.name": "flexlora"},
    "all r=4": {"peft.r": 4, "peft.alpha": 8.0},
    "all r=16": {"peft.r": 16, "peft.alpha": 32.0},
}
DP_RUNS = {  # DP-FedAvg (user level): each rule clips and noises what it aggregates
    f"{rule} dp z={z:g}": {"aggregation.name": rule, "privacy.mode": "dp_fedavg",
                            "privacy.noise_multiplier": z}
    for z in (0.5, 1.0) for rule in RULES
} | {
    f"mix 4/8/16 {rule} dp z={z:g}": {**RANK_RUNS[f"mix 4/8/16 {rule}"], "privacy.mode": "dp_fedavg",
                                      "privacy.noise_multiplier": z}
    for z in (0.5, 1.0) for rule in ("fedavg", "flexlora")
}
# Shakespeare by speaker (conf/data/shakespeare.yaml; the file is read-only shared data)
SHAKESPEARE = {"data.source": "shakespeare", "data.path": shared_data_path("tinyshakespeare.txt"),
               "data.min_lines": 560}
# SST-2 with label skew (conf/data/sst2.yaml + the Dirichlet partitioner over the label)
SST2 = {"task.name": "classify", "data.source": "text_files", "data.path": shared_data_path("sst2/train.tsv"),
        "data.text_key": "sentence", "data.label_key": "label", "data.label_names": "negative,positive",
        "data.partitioner": "dirichlet", "data.dirichlet_alpha": 0.3, "task.eval_generations": 0}
SOURCES = {"shakespeare": SHAKESPEARE, "sst2": SST2}


def server_cost_rows(clients: int, rank: int, layers: int = 60, dim: int = 576) -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_limits

    from fedslm.aggregation import fedavg, ffa, flexlora, flora
    from fedslm.aggregation.private import private_aggregate

    rng = np.random.default_rng(0)
    replies = [{**{f"l{i}.lora_A.weight": rng.standard_normal((rank, dim)).astype(np.float32)
                   for i in range(layers)},
                **{f"l{i}.lora_B.weight": rng.standard_normal((dim, rank)).astype(np.float32)
                   for i in range(layers)}} for _ in range(clients)]
    counts = list(range(10, 10 + clients))
    b_only = [ffa.travelling(r) for r in replies]
    dp = dict(rank=rank, clip_norm=0.1, noise_multiplier=1.0, rng=np.random.default_rng(0))
    sent = [{k: v * 0.99 for k, v in replies[0].items()}] * clients
    calls = {"fedavg": lambda: fedavg.aggregate(replies, counts, rank=rank),
             "ffa": lambda: ffa.aggregate(b_only, counts),
             "flora": lambda: flora.aggregate(replies, counts, rank=rank),
             "flexlora": lambda: flexlora.aggregate(replies, counts, rank=rank),
             # DP-FedAvg: factor deltas (fedavg, ffa at half the size), or dense product
             # deltas, noise and one SVD per layer (flora and flexlora alike)
             "fedavg + DP": lambda: private_aggregate(replies, sent, product_space=False, **dp),
             "flora/flexlora + DP": lambda: private_aggregate(replies, sent, product_space=True, **dp)}
    rows = []
    with threadpool_limits(1):  # one BLAS thread: a shared, loaded machine oversubscribes more
        for name, call in calls.items():
            rows.append(_cost(name, call) | {"clients": clients, "layers": layers, "rank": rank})
    return rows


def _cost(name: str, call) -> dict[str, Any]:
    """Median seconds of 3 calls, and the peak traced (numpy) memory of a 4th."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"rule": name, "seconds": statistics.median(times), "peak_mib": peak / 2**20}


def quality_rows(setting: dict[str, Any], echo: bool, only: set[str] | None,
                 data: str = "synthetic", extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    runs: list[tuple[str, float, dict[str, Any]]] = []
    hets = setting["heterogeneity"] if data == "synthetic" else (1.0,)
    for het in hets:
        runs += [(rule, het, {"aggregation.name": rule}) for rule in RULES]
    runs += [(name, 1.0, overrides) for name, overrides in RANK_RUNS.items()]
    runs += [(name, 1.0, overrides) for name, overrides in DP_RUNS.items()]
    if only:
        runs = [r for r in runs if r[0] in only]
    rows = []
    for i, (name, het, overrides) in enumerate(runs):
        source = SOURCES.get(data, {"data.heterogeneity": het})
        cfg = experiment({"federation.num_clients": setting["clients"],
                          "federation.num_rounds": setting["rounds"],
                          "training.local_steps": setting["steps"],
                          **source, **(extra or {}), **overrides},
                         run_name=f"aggregation-{i}")
        print(f"[aggregation] run {i + 1}/{len(runs)}: {name} on {data}"
              + (f" at heterogeneity {het:g}" if data == "synthetic" else ""), flush=True)
        run = run_engine(cfg, echo=echo)
        trained = [r for r in run.summary["rounds"] if r["round"] >= 1]
        last = trained[-1]
        first = run.summary["rounds"][0]
        quality = ({"eval_ppl": last["eval_perplexity"], "central_ppl": last.get("central_perplexity"),
                    "eval_ppl_round0": first["eval_perplexity"]} if cfg.task.name != "classify" else
                   {"eval_f1_round0": first.get("eval_macro_f1"), "eval_acc": last.get("eval_accuracy"),
                    "eval_f1": last.get("eval_macro_f1"), "central_acc": last.get("central_accuracy"),
                    "central_f1": last.get("central_macro_f1"),
                    "central_f1_curve": [r.get("central_macro_f1") for r in run.summary["rounds"]],
                    "central_acc_curve": [r.get("central_accuracy") for r in run.summary["rounds"]]})
        rows.append({
            "run": name, "data": data, "heterogeneity": het if data == "synthetic" else None,
            "global_r": cfg.peft.r, **quality,
            "up_bytes": statistics.fmean(r["bytes_up"] for r in trained),
            "down_bytes": statistics.fmean(r["bytes_down"] for r in trained),
            "server_agg_ms": 1e3 * statistics.fmean(r["server_aggregate_seconds"] for r in trained),
            "truncation": last.get("agg_truncation_error"),
            "epsilon_user": last.get("dp_epsilon_user"),
            "output_dir": cfg.output_dir,
        })
    return rows


def centralised_sst2(steps: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One adapter on all of SST-2 train (``steps`` steps), accuracy and macro-F1 on dev."""
    import csv
    import json

    from fedslm.adapters import load_adapter_arrays
    from fedslm.training import train_local
    from fedslm.runtime import encoded, experiment_model
    from fedslm.server.experiment import initial_adapter
    from fedslm.simulations.bench.common import torch_threads
    from fedslm.tasks import get_task

    def records(name: str) -> tuple[str, ...]:
        with open(shared_data_path(f"sst2/{name}.tsv"), newline="") as f:
            rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            return tuple(json.dumps({"text": r["sentence"], "label": int(r["label"])}) for r in rows)

    cfg = experiment({**SST2, "training.local_steps": steps, **extra}, run_name="aggregation-sst2-centralised")
    task = get_task("classify")
    with torch_threads(1):
        model, tokenizer = experiment_model(cfg)
        load_adapter_arrays(model, initial_adapter(cfg))
        train, dev = encoded(cfg, records("train"), tokenizer), encoded(cfg, records("dev"), tokenizer)
        before = task.evaluate(model, dev, batch_size=64)
        start = time.perf_counter()
        train_local(model, train, cfg.training, generator_seed=cfg.training.seed, loss_fn=task.loss)
        seconds = time.perf_counter() - start
        after = task.evaluate(model, dev, batch_size=64)
    majority = max(int(dev[2].sum()), len(dev[2]) - int(dev[2].sum())) / len(dev[2])
    return {"steps": steps, "set": extra, "dev_examples": len(dev[2]), "dev_majority_acc": majority,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "acc_before": before["accuracy"], "f1_before": before["macro_f1"],
            "acc": after["accuracy"], "f1": after["macro_f1"], "train_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench aggregation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="local steps per round")
    parser.add_argument("--heterogeneity", default="0,1", help="comma-separated data.heterogeneity values")
    parser.add_argument("--data", choices=("synthetic", "shakespeare", "sst2"), default="synthetic",
                        help="shakespeare: one client per speaker with >= 560 lines (8 speakers); "
                             "sst2: SST-2 classification, Dirichlet 0.3 label skew")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run (e.g. training.learning_rate=0.05)")
    parser.add_argument("--only", default="", help="comma-separated run names (e.g. 'ffa,all r=4'); '' = all")
    parser.add_argument("--server-clients", type=int, default=10, help="replies in the server-cost table (0: skip it)")
    parser.add_argument("--no-engine", action="store_true", help="only the server-cost table")
    parser.add_argument("--centralised", action="store_true",
                        help="only: one adapter on all of SST-2 train, scored on SST-2 dev (no engine)")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/aggregation.json)")
    args = parser.parse_args(argv)
    try:
        hets = tuple(float(h) for h in args.heterogeneity.split(",") if h)
    except ValueError:
        parser.error(f"--heterogeneity: {args.heterogeneity!r} is not comma-separated numbers")
    try:
        extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    except ValueError:
        parser.error(f"--set: expected KEY=VALUE, got {args.set!r}")
    if args.centralised:
        row = centralised_sst2(args.steps, extra)
        print(table([row], ["steps", "trainable", "dev_examples", "dev_majority_acc", "acc_before", "f1_before",
                            "acc", "f1", "train_seconds"]))
        path = write_json("aggregation_sst2_centralised", {"centralised": row, "machine": machine()}, args.out)
        print(f"wrote {path}")
        return 0
    cost = server_cost_rows(args.server_clients, rank=8) if args.server_clients > 0 else []
    if cost:
        print(f"Server cost of one aggregation ({args.server_clients} clients, SmolLM2-135M-sized adapter):")
        print(table(cost, ["rule", "clients", "layers", "rank", "seconds", "peak_mib"]))
    setting = {"clients": args.clients, "rounds": args.rounds, "steps": args.steps, "heterogeneity": hets}
    quality = [] if args.no_engine else quality_rows(
        setting, args.echo, {s.strip() for s in args.only.split(",") if s.strip()} or None, args.data, extra)
    if quality:
        print(f"\nAfter {args.rounds} rounds, {args.clients} clients x {args.steps} steps "
              f"(tiny-llama, {args.data}):")
        scores = (["eval_f1_round0", "eval_acc", "eval_f1", "central_acc", "central_f1"] if args.data == "sst2"
                  else ["eval_ppl_round0", "eval_ppl", "central_ppl"])
        print(table(quality, ["run", "data", "heterogeneity", "global_r", *scores, "up_bytes", "down_bytes",
                              "server_agg_ms", "truncation", "epsilon_user"]))
        if args.data == "sst2":
            for row in quality:
                curve = " ".join("-" if v is None else f"{v:.3f}" for v in row["central_f1_curve"])
                print(f"central macro-F1 by round, {row['run']}: {curve}")
    result = {"benchmark": "aggregation", "server_cost": cost, "quality_setting": setting | {"set": extra},
              "quality": quality, "machine": machine()}
    print(f"\nwrote {write_json('aggregation', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
