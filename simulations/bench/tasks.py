"""Federated vs centralized fine-tuning per task, and each task's loss cost.

    python -m fedslm.simulations.bench tasks                 # built-in synthetic data (no files)
    python -m fedslm.simulations.bench tasks --real          # + SST-2 and Alpaca from ../shared/data
    python -m fedslm.simulations.bench tasks --tiny          # seconds: a smoke run

Same model (the builtin tiny Llama), same data and the same total number of optimizer
steps: *federated* is FedAvg (mean weighted by num-examples, what Flower's FedAvg
computes) over every client's ``fit`` for R rounds x S local steps; *centralized* trains
one adapter for N x R x S steps on the pooled train splits. Both are scored by the same
client ``evaluate`` on every client's test split and pooled by the task (``Task.pooled``).
The federated loop runs in process (the engine's own overhead is
``bench overhead``'s subject). Classification is also run under label skew (Dirichlet
alpha = 0.3 over the label), with what a personal fine-tuned copy recovers per client.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedslm.shared_data import shared_data_dir
from fedslm.simulations.bench.common import experiment, machine, table, torch_threads, write_json

SHARED = shared_data_dir()


def pooled_scores(cfg, arrays, *, personal: bool = False) -> dict[str, float]:
    """The task's metrics of ``arrays`` pooled over every client's test split."""
    from fedslm.client.task import evaluate
    from fedslm.server.metrics import summarize
    from fedslm.tasks import get_task

    rows = []
    for pid in range(cfg.federation.num_clients):
        state = Path(cfg.output_dir) / "clients" / str(pid)
        rows.append(evaluate(cfg, arrays, partition_id=pid, server_round=99, client_dir=state))
    task = get_task(cfg.task.name)
    out = summarize(rows, "", task=task)
    if personal:
        gains = [r["personal_gain"] for r in rows]
        out["personal_gain_mean"] = float(np.mean(gains))
        out["clients_improved"] = float(np.mean([g > 0 for g in gains]))
    return out


def federated(cfg) -> dict[str, np.ndarray]:
    from fedslm.client.task import fit
    from fedslm.server.experiment import initial_adapter

    arrays = initial_adapter(cfg)
    for rnd in range(1, cfg.federation.num_rounds + 1):
        replies = [fit(cfg, arrays, partition_id=pid, server_round=rnd,
                       client_dir=Path(cfg.output_dir) / "clients" / str(pid))
                   for pid in range(cfg.federation.num_clients)]
        weights = np.array([m["num-examples"] for _, m in replies], dtype=np.float64)
        arrays = {k: np.sum([w * r[k] for (r, _), w in zip(replies, weights)], axis=0) / weights.sum()
                  for k in arrays}
        arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    return arrays


def centralized(cfg, *, same_updates: bool = False) -> dict[str, np.ndarray]:
    """One adapter on all clients' train splits pooled: the same total steps (N x R x S
    steps of batch B), or with ``same_updates`` the same number of sequential updates and
    examples as FedAvg (R x S steps of batch N x B)."""
    from fedslm.adapters import adapter_arrays, load_adapter_arrays
    from fedslm.client.records import client_texts
    from fedslm.training import train_local
    from fedslm.runtime import encoded, experiment_model
    from fedslm.server.experiment import initial_adapter
    from fedslm.tasks import get_task

    model, tokenizer = experiment_model(cfg)
    load_adapter_arrays(model, initial_adapter(cfg))
    pooled = tuple(r for pid in range(cfg.federation.num_clients) for r in client_texts(cfg, pid, "train"))
    n, r, steps = cfg.federation.num_clients, cfg.federation.num_rounds, cfg.training.local_steps
    training = (dataclasses.replace(cfg.training, local_steps=r * steps, batch_size=n * cfg.training.batch_size)
                if same_updates else dataclasses.replace(cfg.training, local_steps=n * r * steps))
    train_local(model, encoded(cfg, pooled, tokenizer), training, generator_seed=cfg.training.seed,
                loss_fn=get_task(cfg.task.name).loss)
    return adapter_arrays(model)


def compare(name: str, overrides: dict[str, Any], *, personalize: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    cfg = experiment(overrides, run_name=f"tasks-{name}")
    from fedslm.tasks import get_task

    headline = get_task(cfg.task.name).headline
    fed = pooled_scores(cfg, federated(cfg))
    cen = pooled_scores(cfg, centralized(cfg))
    same = pooled_scores(cfg, centralized(cfg, same_updates=True))
    row = {"setting": name, "task": cfg.task.name, "metric": headline,
           "federated": fed.get(headline), "centralized": cen.get(headline),
           "centralized_same_updates": same.get(headline)}
    if headline == "perplexity":
        row["gap"] = f"{100 * (fed[headline] / cen[headline] - 1):+.2f}%"
        row["gap_same_updates"] = f"{100 * (fed[headline] / same[headline] - 1):+.2f}%"
    else:
        row["gap"] = f"{100 * (fed[headline] - cen[headline]):+.2f} pts"
        row["gap_same_updates"] = f"{100 * (fed[headline] - same[headline]):+.2f} pts"
        row["federated_accuracy"], row["centralized_accuracy"] = fed["accuracy"], cen["accuracy"]
    if "rouge_l" in fed:
        row["federated_rouge_l"], row["centralized_rouge_l"] = fed["rouge_l"], cen["rouge_l"]
    if personalize:
        pcfg = dataclasses.replace(cfg, personalization=dataclasses.replace(
            cfg.personalization, method="finetune", finetune_steps=cfg.training.local_steps))
        personal = pooled_scores(pcfg, federated(cfg), personal=True)
        row["personal_gain_mean"] = personal["personal_gain_mean"]
        row["clients_improved"] = personal["clients_improved"]
    row["seconds"] = time.perf_counter() - start
    return row


def step_cost(steps: int) -> list[dict[str, Any]]:
    """Seconds per training step of each task's loss, same model, batch size and length."""
    from fedslm.client.records import client_data
    from fedslm.training import train_local
    from fedslm.tasks import get_task

    rows = []
    for task in ("causal_lm", "instruct", "classify"):
        cfg = experiment({"task.name": task, "training.local_steps": steps, "training.seq_len": 64,
                          "training.batch_size": 8}, run_name=f"tasks-cost-{task}")
        model, tensors = client_data(cfg, 0, "train")
        train_local(model, tensors, cfg.training, generator_seed=0, loss_fn=get_task(task).loss)  # warm
        t0 = time.process_time()
        result = train_local(model, tensors, cfg.training, generator_seed=1, loss_fn=get_task(task).loss)
        rows.append({"task": task, "cpu_ms_per_step": 1000 * (time.process_time() - t0) / result.steps,
                     "tokens_per_example": int(tensors[0].shape[1])})
    base = rows[0]["cpu_ms_per_step"]
    for r in rows:
        r["vs_causal_lm"] = r["cpu_ms_per_step"] / base
    return rows


def real_data_settings(tmp: Path, *, sst2_rows: int, alpaca_rows: int) -> dict[str, dict[str, Any]]:
    """SST-2 and Alpaca subsets (read from ../shared/data, written to a temp dir only)."""
    import json

    sst2 = (SHARED / "sst2" / "train.tsv").read_text().splitlines()
    (tmp / "sst2.tsv").write_text("\n".join(sst2[: sst2_rows + 1]) + "\n")
    alpaca = json.loads((SHARED / "alpaca" / "alpaca_5000.json").read_text())[:alpaca_rows]
    (tmp / "alpaca.json").write_text(json.dumps(alpaca))
    sst = {"task.name": "classify", "data.source": "text_files", "data.path": str(tmp / "sst2.tsv"),
           "data.text_key": "sentence", "data.label_names": "negative,positive", "task.eval_generations": 0}
    return {
        "sst2-iid": sst,
        "sst2-dirichlet0.3": {**sst, "data.partitioner": "dirichlet", "data.dirichlet_alpha": 0.3},
        "alpaca-iid": {"task.name": "instruct", "data.source": "text_files",
                       "data.path": str(tmp / "alpaca.json"), "training.seq_len": 128,
                       "task.eval_generations": 4, "task.max_new_tokens": 24},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="also SST-2 and Alpaca from ../shared/data")
    parser.add_argument("--tiny", action="store_true", help="smoke settings (seconds)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (all settings)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    clients, rounds, steps = (2, 1, 2) if args.tiny else (args.clients, args.rounds, args.steps)
    common = {"federation.num_clients": clients, "federation.num_rounds": rounds,
              "training.local_steps": steps, "training.learning_rate": args.lr}
    synthetic_docs = 12 if args.tiny else 48
    settings = {
        "synthetic-causal_lm-iid": {"task.name": "causal_lm", "data.heterogeneity": 0.0},
        "synthetic-classify-iid": {"task.name": "classify", "data.heterogeneity": 0.0,
                                   "task.eval_generations": 0},
        "synthetic-classify-skew": {"task.name": "classify", "data.heterogeneity": 0.9,
                                    "task.eval_generations": 0},
        "synthetic-instruct-iid": {"task.name": "instruct", "data.heterogeneity": 0.0,
                                   "task.eval_generations": 4, "task.max_new_tokens": 16},
    }
    settings = {k: {**v, "data.docs_per_client": synthetic_docs} for k, v in settings.items()}
    with tempfile.TemporaryDirectory() as tmp, torch_threads(1):
        if args.real:
            settings.update(real_data_settings(Path(tmp), sst2_rows=60 * clients if args.tiny else 300 * clients,
                                               alpaca_rows=20 * clients if args.tiny else 100 * clients))
        rows = [compare(name, {**common, **s}, personalize="skew" in name or "dirichlet" in name)
                for name, s in settings.items()]
        cost = step_cost(3 if args.tiny else 20)
    print(table(rows, ["setting", "metric", "federated", "centralized", "gap", "centralized_same_updates",
                       "gap_same_updates", "federated_accuracy",
                       "centralized_accuracy", "federated_rouge_l", "centralized_rouge_l",
                       "personal_gain_mean", "clients_improved", "seconds"]))
    print()
    print(table(cost, ["task", "cpu_ms_per_step", "vs_causal_lm", "tokens_per_example"]))
    path = write_json("tasks", {"machine": machine(), "settings": {"clients": clients, "rounds": rounds,
                                "local_steps": steps, "learning_rate": args.lr},
                                "comparison": rows, "step_cost": cost}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
