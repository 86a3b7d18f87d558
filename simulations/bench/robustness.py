"""robustness: final global perplexity under each simulated attack and each defence.

Each run is the real round code in one process: the server's ``train_phase`` (reply
screening, bounded influence, Flower's strategy) asks an in-process grid whose nodes
answer with the real client handler (``fedslm.client.handlers.train_reply``: training, the
attack simulator ``fedslm.client.attack``, compression); the engine adds processes, not
behaviour (``overhead`` measures what it costs). After the last round the global adapter
is evaluated on the central held-out split. Synthetic data, 10 clients, every client
every round; attacks from ``attack.start_round`` 1 by the first ``fraction`` of
partitions.

Defences: ``no-bounds`` (FedAvg, robust.clip=none, robust.weight_cap=0), ``default``
(FedAvg with the default bounds), ``fedmedian``, ``fedtrimmedavg`` (beta 0.2), ``krum``,
``multikrum`` and ``bulyan`` (num_malicious = the malicious count; bulyan only where
n >= 4f + 3), ``fltrust`` (the server's root update on ``strategy.root_docs`` synthetic
records; its server seconds include that training), the robust rules behind the default
bounds. Reported per cell: final central perplexity and its ratio to the honest no-bounds
run (✔ within 5 %), and for ``backdoor`` its success rate on the central split's clean
prompts carrying the trigger (``fedslm.backdoor``: ``bd 0.31``); per defence, its honest-run cost
(perplexity ratio) and server seconds per round (screening + bounding + aggregation).
Cells run fraction by fraction in the order given; each finished row is printed as a
markdown table row and the JSON is rewritten after every cell, so a cut-short run keeps
what it measured.

    python -m fedslm.simulations.bench robustness --fractions 0.2,0.3,0.1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedslm.config import ExperimentConfig
from fedslm.keys import ARRAYS_KEY
from fedslm.runconfig import nest
from fedslm.simulations.bench.common import BENCH_DIR

ATTACKS = {"scale": 100.0, "sign_flip": 10.0, "gaussian": 1.0, "same_value": 1.0,
           "num_examples": 1e6, "backdoor": 1.0}  # backdoor: default trigger/target, scale unused
DEFENCES = ("no-bounds", "default", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
            "fltrust")
WITHIN = 1.05  # the target: within 5 % of the honest perplexity


class InProcessGrid:
    """Nodes 1..n answering train messages with the real client handler, in this process;
    client time is kept apart from fedslm.server time."""

    def __init__(self, cfg) -> None:
        self.cfg, self.outbox, self.client_seconds = cfg, {}, 0.0

    def get_node_ids(self):
        return list(range(1, self.cfg.federation.num_clients + 1))

    def push_messages(self, messages):
        from flwr.app import Context, Message, RecordDict

        from fedslm.client.handlers import train_reply

        ids = []
        for i, msg in enumerate(messages):
            msg_id = f"{msg.metadata.group_id}-{msg.metadata.message_type}-{i}"
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={
                "partition-id": node - 1, "num-partitions": self.cfg.federation.num_clients},
                state=RecordDict(), run_config={})
            start = time.perf_counter()
            reply = train_reply(self.cfg, msg, context)
            self.client_seconds += time.perf_counter() - start
            reply = Message(reply.content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.outbox[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``multikrum+robust.clip=none``: a defence of ``DEFENCES`` (or an attack of
    ``ATTACKS``) and config overrides on top of it: a kept rule with another setting
    (``fedtrimmedavg+strategy.trim_beta=0.3``), an attack at another scale
    (``sign_flip+attack.scale=1``)."""
    name, *parts = spec.split("+")
    extra: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{part!r} is not key=value")
        extra[key] = _scalar(value)
    return name, extra


def attack_overrides(spec: str, fraction: float) -> dict[str, Any]:
    kind, extra = parse_spec(spec)
    return {"attack.kind": kind, "attack.fraction": fraction, "attack.scale": ATTACKS[kind], **extra}


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def defence_overrides(spec: str, malicious: int) -> dict[str, Any]:
    name, extra = parse_spec(spec)
    if name == "no-bounds":
        return {"robust.clip": "none", "robust.weight_cap": 0.0, **extra}
    if name == "default":
        return extra
    known = {"strategy.num_malicious": malicious} if name in ("krum", "multikrum", "bulyan") else {}
    return {"strategy.name": name, **known, **extra}


def run_one(overrides: dict[str, Any], *, name: str, observe: Observer | None = None) -> dict[str, Any]:
    """One in-process run; final central perplexity and server seconds per round.
    ``observe(round, deltas)`` sees, each round, the deltas the strategy aggregates (after
    screening and bounding), flat, by node id, and under ``None`` the aggregate's."""
    import random

    import numpy as np
    import torch

    from fedslm.adapters import to_array_record
    from fedslm.data import central_test_texts
    from fedslm.server.experiment import initial_adapter, make_central_eval, partition_train_sizes
    from fedslm.server.rounds import RoundPlan, train_phase
    from fedslm.server.strategy import build_strategy
    from fedslm.simulations.bench.common import experiment

    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps messages with the task's identity, which a real ServerApp process sets
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    cfg = experiment(overrides, run_name=f"robustness-{name}")
    torch.set_num_threads(1)
    random.seed(cfg.training.seed)
    np.random.seed(cfg.training.seed)
    torch.manual_seed(cfg.training.seed)
    arrays = to_array_record(initial_adapter(cfg))
    central = make_central_eval(cfg, central_test_texts(cfg.data, num_clients=cfg.federation.num_clients))
    strategy, grid = build_strategy(cfg), InProcessGrid(cfg)
    if observe is not None:
        strategy.aggregate_train = _observed(strategy.aggregate_train, observe, lambda: arrays)
    plan = RoundPlan(num_rounds=cfg.federation.num_rounds, timeout=600.0, robust=cfg.robust,
                     compression=cfg.compression.method, known_sizes=partition_train_sizes(cfg))
    start, clipped, trusted = time.perf_counter(), [], []
    for rnd in range(1, cfg.federation.num_rounds + 1):
        arrays, metrics, rows = train_phase(grid, strategy, plan, rnd, arrays)
        clipped.append(metrics.get("robust_clipped_fraction", 0.0))
        trusted += [(r["partition-id"], r["trust"]) for r in rows if "trust" in r]
    server = (time.perf_counter() - start - grid.client_seconds) / cfg.federation.num_rounds
    final = central(cfg.federation.num_rounds, arrays)
    loss = final["central_loss"]
    out = {"perplexity": math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.inf,
           "server_seconds_per_round": server, "clipped_fraction_mean": float(np.mean(clipped))}
    if "central_backdoor_success" in final:
        out["backdoor_success"] = final["central_backdoor_success"]
    if trusted:  # fltrust: how much trust the attackers' and the honest replies got
        out.update(trust_summary(trusted, malicious=malicious_partitions(cfg)))
    print(f"  {name}: perplexity {out['perplexity']:.4g}, server {server:.3f} s/round, "
          f"clipped {out['clipped_fraction_mean']:.2f}"
          + (f", backdoor success {out['backdoor_success']:.2f}" if "backdoor_success" in out else "")
          + "".join(f", {k} {v:.3f}" for k, v in out.items() if k.startswith("trust_")),
          flush=True)
    return out


def malicious_partitions(cfg: ExperimentConfig) -> int:
    """How many partitions attack (the first ones, ``fedslm.client.attack``)."""
    return int(round(cfg.attack.fraction * cfg.federation.num_clients)) if cfg.attack.kind != "none" else 0


def trust_summary(trusted: list[tuple[int, float]], *, malicious: int) -> dict[str, float]:
    """FLTrust's trust over all rounds, (partition id, trust) per reply: the mean of the
    malicious partitions' and the honest ones', and the fraction of each given none."""
    out: dict[str, float] = {}
    for side, scores in (("malicious", [t for p, t in trusted if p < malicious]),
                         ("honest", [t for p, t in trusted if p >= malicious])):
        if scores:
            out[f"trust_mean_{side}"] = float(np.mean(scores))
            out[f"trust_zero_fraction_{side}"] = sum(t == 0 for t in scores) / len(scores)
    return out


Observer = Callable[[int, dict[int | None, np.ndarray]], None]


def _observed(aggregate_train: Callable, observe: Observer, sent: Callable[[], Any]) -> Callable:
    """``aggregate_train`` that first shows ``observe`` the flat deltas it aggregates (some
    Flower rules consume their replies' arrays, so they are copied first)."""
    def flat(record: Any) -> np.ndarray:
        return np.concatenate([record[k].numpy().astype(np.float64).ravel() for k in sorted(record.keys())])

    def wrapped(server_round: int, replies: Any) -> Any:
        replies = list(replies)
        base = flat(sent())
        deltas: dict[int | None, np.ndarray] = {
            m.metadata.src_node_id: flat(m.content.array_records[ARRAYS_KEY]) - base for m in replies}
        out = aggregate_train(server_round, replies)
        if out[0] is not None:
            deltas[None] = flat(out[0]) - base
        observe(server_round, deltas)
        return out

    return wrapped


def initial_perplexity(overrides: dict[str, Any]) -> float:
    from fedslm.adapters import to_array_record
    from fedslm.data import central_test_texts
    from fedslm.server.experiment import initial_adapter, make_central_eval
    from fedslm.simulations.bench.common import experiment

    cfg = experiment(overrides, run_name="robustness-initial")
    central = make_central_eval(cfg, central_test_texts(cfg.data, num_clients=cfg.federation.num_clients))
    return math.exp(central(0, to_array_record(initial_adapter(cfg)))["central_loss"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench robustness",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--fractions", default="0.1,0.2,0.3")
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help="comma-separated; each may add +key=value overrides (sign_flip+attack.scale=1)")
    parser.add_argument("--defences", default=",".join(DEFENCES),
                        help="comma-separated; each may add +key=value overrides (multikrum+robust.clip=none)")
    parser.add_argument("--backdoor-target", default=None,
                        help="attack.target of the backdoor runs (default: the config's)")
    parser.add_argument("--out", default=None, help="JSON path (default outputs/bench/robustness.json)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells --out already holds (same settings) and run the rest")
    parser.add_argument("--skip-honest", action="store_true",
                        help="measure no missing honest run (the attack cells only; the ratios need "
                             "the honest no-bounds run in --out)")
    parser.add_argument("--merge", action="append", default=[], metavar="JSON",
                        help="also keep the cells of this JSON (same settings; a parallel run's "
                             "--out); repeatable")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: the table of what --out holds ('not run' for the rest)")
    args = parser.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    defences = [d for d in args.defences.split(",") if d]
    bad = [a for a in attacks if a.split("+")[0] not in ATTACKS]
    bad += [d for d in defences if d.split("+")[0] not in DEFENCES]
    if bad:
        print(f"error: unknown attack or defence {bad[0]!r}", file=sys.stderr)
        return 2
    for spec, make in [*((d, lambda d=d: defence_overrides(d, 0)) for d in defences),
                       *((a, lambda a=a: attack_overrides(a, 0.0)) for a in attacks)]:
        try:  # a variant's overrides must name real keys with valid values
            ExperimentConfig.from_dict(nest(make()))
        except ValueError as err:
            print(f"error: {spec!r}: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
    fractions = [float(f) for f in args.fractions.split(",") if f]
    import logging

    from fedslm.simulations.bench.common import machine, table, write_json

    logging.getLogger("flwr").setLevel(logging.ERROR)  # per-round progress and rejections

    base = {"federation.num_clients": args.clients, "federation.num_rounds": args.rounds,
            "training.local_steps": args.local_steps,
            **({"attack.target": args.backdoor_target} if args.backdoor_target else {})}
    out_path = Path(args.out) if args.out else BENCH_DIR / "robustness.json"
    old: dict[str, Any] = {}
    if args.resume or args.table_only:
        old = json.loads(out_path.read_text()) if out_path.exists() else {}
        if old and {k: old["settings"].get(k) for k in base} != base:
            print(f"error: {out_path} was measured with other settings; --resume needs the same",
                  file=sys.stderr)
            return 2
    start = old.get("initial_perplexity") or initial_perplexity(base)
    print(f"initial adapter: central perplexity {start:.4g}", flush=True)
    result: dict[str, Any] = {"machine": machine(), "settings": {
        **base, "fractions": fractions, "attack_scales": ATTACKS}, "initial_perplexity": start,
        "honest": dict(old.get("honest", {})), "cells": list(old.get("cells", []))}
    measured = {(c["attack"], c["fraction"], c["defence"]): c for c in result["cells"]}
    for other_path in args.merge:  # cells measured by a parallel run into another file
        other = json.loads(Path(other_path).read_text())
        if {k: other["settings"].get(k) for k in base} != base:
            print(f"error: {other_path} was measured with other settings; --merge needs the same",
                  file=sys.stderr)
            return 2
        for name, res in other.get("honest", {}).items():
            result["honest"].setdefault(name, res)
        for c in other.get("cells", []):
            if (key := (c["attack"], c["fraction"], c["defence"])) not in measured:
                measured[key] = c
                result["cells"].append(c)

    def measure(key: tuple[str, float, str], overrides: dict[str, Any]) -> dict[str, Any] | None:
        """A cell's result: measured before (--resume), now, or None (--table-only)."""
        attack, fraction, defence = key
        have = result["honest"].get(defence) if attack == "honest" else measured.get(key)
        if have is not None or args.table_only or (attack == "honest" and args.skip_honest):
            return have
        res = run_one(overrides, name=f"{attack}-{fraction}-{defence}")
        if attack == "honest":
            result["honest"][defence] = res
        else:
            measured[key] = {"attack": attack, "fraction": fraction, "defence": defence, **res}
            result["cells"].append(measured[key])
        write_json("robustness", result, str(out_path))
        return res

    # with backdoor among the attacks the honest runs measure its baseline rate too
    # (attack.kind=backdoor with fraction 0: nobody poisons, the server still measures)
    backdoor = "backdoor" in {a.split("+")[0] for a in attacks}
    watch = {"attack.kind": "backdoor", "attack.fraction": 0.0} if backdoor else {}
    honest = {d: measure(("honest", 0.0, d), {**base, **defence_overrides(d, 0), **watch})
              for d in defences}
    first = result["honest"].get("no-bounds") or next((h for h in honest.values() if h), None)
    if first is None:
        print("error: no honest run measured yet", file=sys.stderr)
        return 2
    reference = result["reference_perplexity"] = first["perplexity"]
    columns = ["attack", "fraction", *defences]
    rows = [{"attack": "honest", "fraction": 0.0, **{d: cell(honest[d], reference) for d in defences}}]
    print(markdown_row(columns, rows[0], header=True), flush=True)
    for fraction in fractions:
        malicious = int(round(fraction * args.clients))
        for attack in attacks:
            row: dict[str, Any] = {"attack": attack, "fraction": fraction}
            for d in defences:
                overrides = {**base, **defence_overrides(d, malicious), **attack_overrides(attack, fraction)}
                try:
                    ExperimentConfig.from_dict(nest(overrides))
                except ValueError as err:  # a config refusal: krum's or bulyan's n >= ... f
                    row[d] = f"n/a ({str(err).splitlines()[0].split(': ', 1)[-1].split(' sampled')[0][:48]})"
                    continue
                row[d] = cell(measure((attack, fraction, d), overrides), reference, mark=True)
            rows.append(row)
            print(markdown_row(columns, row), flush=True)
    print("\nfinal central perplexity (ratio to the honest no-bounds run; ✔ within 5 %)")
    print(table(rows, columns))
    print("\nhonest-run cost per defence (perplexity ratio; server seconds per round): " + ", ".join(
        f"{d} {h['perplexity'] / reference:.4f}, {h['server_seconds_per_round']:.3f} s"
        for d, h in honest.items() if h))
    print(f"wrote {write_json('robustness', result, str(out_path))}")
    return 0


def cell(res: dict[str, Any] | None, reference: float, *, mark: bool = False) -> str:
    """``8.515 (1.000) ✔ bd 0.00``: perplexity, its ratio to the reference, within 5 %."""
    if res is None:
        return "not run"
    ratio = res["perplexity"] / reference
    text = f"{res['perplexity']:.4g} ({ratio:.3f})" + (" ✔" if mark and ratio <= WITHIN else "")
    return text + (f" bd {res['backdoor_success']:.2f}" if "backdoor_success" in res else "")


def markdown_row(columns: list[str], row: dict[str, Any], *, header: bool = False) -> str:
    line = "| " + " | ".join(str(row.get(c, "-")) for c in columns) + " |"
    if not header:
        return line
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n" + line


if __name__ == "__main__":
    sys.exit(main())
