"""Each aggregation rule end to end on Flower's simulation engine (3 clients, 2 rounds):
exact bytes per round say who sent and received which tensors at which rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from tests.proc_util import run_cli, survivors

pytestmark = pytest.mark.e2e

SMALL = ["federation.num_clients=3", "federation.num_rounds=2", "training.local_steps=3",
         "data.docs_per_client=16", "tracking.enabled=false"]
FULL = 17408  # one rank-8 adapter of tiny-llama: 4 x (A + B), 4,096 floats + 8 npy headers
RANK = {2: 5120, 4: 9216, 8: FULL}  # the same at rank r: r * 2,048 B + 1,024 B of headers

CASES = {  # name: (overrides, bytes up per round, bytes down per round (train + evaluate))
    "ffa": (["aggregation=ffa"], 3 * FULL // 2, 3 * FULL // 2 + 3 * FULL // 2),
    "flora": (["aggregation=flora", 'peft.ranks="0 r=2, 1 r=4, * r=8"'],
              RANK[2] + RANK[4] + RANK[8], RANK[2] + RANK[4] + RANK[8] + 3 * FULL),
    "flexlora": (["aggregation=flexlora", 'peft.ranks="34% r=2, 33% r=4, 33% r=8"'],
                 RANK[2] + RANK[4] + RANK[8], RANK[2] + RANK[4] + RANK[8] + 3 * FULL),
}
# FedAvg at mixed ranks runs on the deployment engine instead (ranks by device tier, exact
# bytes: test_deploy_e2e.py::test_three_agents_with_tls_and_node_auth_run_two_rounds); rank
# specs by partition are resolved in tests/test_aggregation_resume.py and test_aggregation_math.py.


@pytest.mark.parametrize("case", list(CASES))
def test_rule_runs_end_to_end_with_exact_bytes(tmp_path: Path, case: str) -> None:
    overrides, up, down = CASES[case]
    run_dir = tmp_path / "run"
    proc, marker = run_cli([*SMALL, *overrides, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert survivors(marker) == []
    rounds = {r["round"]: r for r in json.loads((run_dir / "summary.json").read_text())["rounds"]}
    for rnd in (1, 2):
        assert rounds[rnd]["clients_rejected"] == 0
        assert (rounds[rnd]["bytes_up"], rounds[rnd]["bytes_down"]) == (up, down)
    assert rounds[2]["eval_loss"] < rounds[0]["eval_loss"]
    if case in ("flora", "flexlora"):
        assert rounds[1]["agg_rank_min"] == 2 and rounds[1]["agg_rank_max"] == 8
        assert 0 <= rounds[2]["agg_truncation_error"] < 1
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 8 and all(v.shape in ((8, 64), (64, 8)) for v in saved.values())
