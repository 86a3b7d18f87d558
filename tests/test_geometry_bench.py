"""The robustness benchmark's variant specs and the geometry benchmark's per-round
figures, on hand-built deltas (exact values)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedTrimmedAvg

from fedslm.simulations.bench.geometry import round_geometry
from fedslm.simulations.bench.robustness import _observed, attack_overrides, defence_overrides, parse_spec
from tests.fakes import arrays, train_reply


def test_a_variant_spec_adds_overrides_to_a_kept_defence_or_attack() -> None:
    assert parse_spec("fedtrimmedavg+strategy.trim_beta=0.3") == ("fedtrimmedavg", {"strategy.trim_beta": 0.3})
    assert defence_overrides("multikrum+robust.clip=none+strategy.num_selected=4", 3) == {
        "strategy.name": "multikrum",
        "strategy.num_malicious": 3,
        "robust.clip": "none",
        "strategy.num_selected": 4,
    }
    assert defence_overrides("default", 3) == {}
    assert attack_overrides("sign_flip+attack.scale=1", 0.3) == {
        "attack.kind": "sign_flip",
        "attack.fraction": 0.3,
        "attack.scale": 1,
    }
    with pytest.raises(ValueError, match="'robust.clip' is not key=value"):
        parse_spec("multikrum+robust.clip")


def test_round_geometry_of_four_orthogonal_honest_deltas_and_one_flipped_sum() -> None:
    honest = {n: np.eye(5)[n - 2] for n in range(2, 6)}  # nodes 2..5: e1..e4, unit norm
    total = sum(honest.values())
    deltas = {1: -total / 2, **honest}  # node 1: against all of them, unit norm
    deltas[None] = np.mean([deltas[n] for n in range(1, 6)], axis=0)  # FedAvg: total / 10
    got = round_geometry(deltas, malicious={1}, f=1)
    assert got == pytest.approx(
        {
            "norm_honest": 1.0,
            "cos_honest_vs_other_honest": 0.0,
            "cos_honest_pairs": 0.0,
            "norm_malicious": 1.0,
            "cos_malicious_vs_honest_mean": -1.0,
            "cos_malicious_honest_pairs": -0.5,
            # squared distances: honest-honest 2, flipped-honest 3; Krum's scores 4 and 6
            "multikrum_malicious_kept": 0,
            "krum_picks_malicious": 0,
            "cos_aggregate_vs_honest_mean": 1.0,
            "honest_signal_passed": 0.4,  # (total/10 . total/4) / |total/4|^2
        }
    )


def test_the_observer_sees_the_deltas_before_a_rule_consumes_them() -> None:
    sent = arrays({"w": np.zeros(2, np.float32)})
    seen: list[tuple[int, dict]] = []
    replies = [train_reply(n, {"w": np.array([n, -n], np.float32)}) for n in (1, 2, 3)]
    # FedTrimmedAvg pops each reply's arrays while it aggregates
    aggregate = _observed(FedTrimmedAvg(beta=0.0).aggregate_train, lambda r, d: seen.append((r, d)), lambda: sent)
    result, _ = aggregate(7, replies)
    assert np.array_equal(result["w"].numpy(), [2.0, -2.0])
    assert seen[0][0] == 7 and sorted(seen[0][1], key=str) == [1, 2, 3, None]
    assert seen[0][1][3].tolist() == [3.0, -3.0] and seen[0][1][None].tolist() == [2.0, -2.0]


def test_merge_keeps_a_parallel_runs_cells_and_refuses_other_settings(tmp_path, capsys) -> None:
    import json

    from fedslm.simulations.bench.robustness import main

    settings = {"federation.num_clients": 10, "federation.num_rounds": 10, "training.local_steps": 20}
    honest = {"perplexity": 8.0, "server_seconds_per_round": 0.1, "clipped_fraction_mean": 0.0}

    def write(name: str, cells: list[dict], **extra: dict) -> str:
        path = tmp_path / name
        path.write_text(
            json.dumps(
                {
                    "settings": {**settings, **extra},
                    "initial_perplexity": 9.0,
                    "honest": {"no-bounds": honest},
                    "cells": cells,
                }
            )
        )
        return str(path)

    cell = {"fraction": 0.3, "server_seconds_per_round": 0.1, "clipped_fraction_mean": 0.5}
    out = write("a.json", [{"attack": "sign_flip", "defence": "default", "perplexity": 8.8, **cell}])
    other = write(
        "b.json",
        [
            {"attack": "sign_flip", "defence": "default", "perplexity": 1.0, **cell},
            {"attack": "scale", "defence": "default", "perplexity": 8.16, **cell},
        ],
    )
    args = ["--table-only", "--out", out, "--fractions", "0.3", "--defences", "default"]
    assert main([*args, "--attacks", "sign_flip,scale", "--merge", other]) == 0
    merged = json.loads((tmp_path / "a.json").read_text())["cells"]
    assert [(c["attack"], c["perplexity"]) for c in merged] == [("sign_flip", 8.8), ("scale", 8.16)]
    assert "| scale | 0.3 | 8.16 (1.020) ✔ |" in capsys.readouterr().out
    bad = write("c.json", [], **{"training.local_steps": 5})
    assert main([*args, "--merge", bad]) == 2
    assert "c.json was measured with other settings; --merge needs the same" in capsys.readouterr().err
