"""geometry: what a robust rule sees each round, honest updates against hostile ones.

One run of the robustness benchmark (same settings, same in-process rounds), observed
at the strategy: the deltas it aggregates after screening and bounding, by node. Per
round: the median delta norm of honest and of malicious clients as the rule sees them
(after the bound's clipping, if any); cosines (honest with the mean of the other honest, malicious with the honest
mean, mean pairwise honest-honest and malicious-honest); Krum's view (Flower's own
``select_multikrum`` with f = the malicious count: how many malicious among the n - f
MultiKrum keeps, and whether Krum's one pick is malicious); and the aggregate delta
against the honest clients' mean delta (cosine, and its projection on that mean as a
fraction of the mean: 1 = the honest signal passes whole, < 0 = the round moved
against it). Malicious clients are nodes 1..round(fraction * clients), as in
``fedslm.client.attack``.

    python -m fedslm.simulations.bench geometry --attack sign_flip --fraction 0.3 --defence default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedslm.simulations.bench.common import BENCH_DIR, table
from fedslm.simulations.bench.robustness import ATTACKS, DEFENCES, defence_overrides, run_one


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def round_geometry(deltas: dict[int | None, np.ndarray], malicious: set[int], f: int) -> dict[str, Any]:
    """One round's figures from the flat deltas by node id (None: the aggregate's)."""
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    nodes = sorted(n for n in deltas if n is not None)
    honest = [n for n in nodes if n not in malicious]
    bad = [n for n in nodes if n in malicious]
    mean_h = np.mean([deltas[n] for n in honest], axis=0)
    out: dict[str, Any] = {
        "norm_honest": float(np.median([np.linalg.norm(deltas[n]) for n in honest])),
        "cos_honest_vs_other_honest": float(
            np.mean([cosine(deltas[n], np.mean([deltas[m] for m in honest if m != n], axis=0)) for n in honest])
        )
        if len(honest) > 1
        else 0.0,
        "cos_honest_pairs": float(np.mean([cosine(deltas[a], deltas[b]) for a in honest for b in honest if a < b]))
        if len(honest) > 1
        else 0.0,
    }
    if bad:
        out["norm_malicious"] = float(np.median([np.linalg.norm(deltas[n]) for n in bad]))
        out["cos_malicious_vs_honest_mean"] = float(np.mean([cosine(deltas[n], mean_h) for n in bad]))
        out["cos_malicious_honest_pairs"] = float(np.mean([cosine(deltas[a], deltas[b]) for a in bad for b in honest]))
    contents = [RecordDict({"arrays": ArrayRecord({"x": Array(deltas[n])})}) for n in nodes]
    index = {id(c): n for c, n in zip(contents, nodes)}
    keep = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=len(nodes) - f)
    pick = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=1)
    out["multikrum_malicious_kept"] = sum(index[id(c)] in malicious for c in keep)
    out["krum_picks_malicious"] = int(index[id(pick[0])] in malicious)
    if None in deltas:
        agg = deltas[None]
        out["cos_aggregate_vs_honest_mean"] = cosine(agg, mean_h)
        out["honest_signal_passed"] = float(agg @ mean_h / float(mean_h @ mean_h))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedslm.simulations.bench geometry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--attack", default="sign_flip", help=f"one of {', '.join(ATTACKS)} or none")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument(
        "--defence", default="default", help=f"one of {', '.join(DEFENCES)}, optionally +key=value overrides"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON path (default outputs/bench/geometry.json)")
    args = parser.parse_args(argv)
    if args.attack not in (*ATTACKS, "none") or args.defence.split("+")[0] not in DEFENCES:
        print(f"error: unknown attack {args.attack!r} or defence {args.defence!r}", file=sys.stderr)
        return 2
    import logging

    from fedslm.simulations.bench.common import machine, write_json

    logging.getLogger("flwr").setLevel(logging.ERROR)
    f = int(round(args.fraction * args.clients)) if args.attack != "none" else 0
    overrides = {
        "federation.num_clients": args.clients,
        "federation.num_rounds": args.rounds,
        "training.local_steps": args.local_steps,
        **defence_overrides(args.defence, f),
    }
    if args.attack != "none":
        overrides.update(
            {"attack.kind": args.attack, "attack.fraction": args.fraction, "attack.scale": ATTACKS[args.attack]}
        )
    rounds: list[dict[str, Any]] = []
    malicious = set(range(1, f + 1))  # node n answers for partition n - 1

    def observe(server_round: int, deltas: dict[int | None, np.ndarray]) -> None:
        rounds.append({"round": server_round, **round_geometry(deltas, malicious, max(f, 1))})

    name = f"geometry-{args.attack}-{args.fraction}-{args.defence}"
    final = run_one(overrides, name=name, observe=observe)
    columns = ["round", *(k for k in rounds[0] if k != "round")] if rounds else ["round"]
    print(table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rounds], columns))
    out = Path(args.out) if args.out else BENCH_DIR / "geometry.json"
    result = {"machine": machine(), "settings": {**overrides}, "final": final, "rounds": rounds}
    print(f"wrote {write_json('geometry', result, str(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
