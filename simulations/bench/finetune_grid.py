"""How much ``finetune`` personalization gains for a grid of (learning rate, steps).

Takes a finished run's output dir (its ``config.json`` and final global ``adapter/``),
and for each setting fine-tunes a copy per client exactly as ``personalization=finetune``
does at evaluation time, then prints the mean per-client gain over the global adapter
(100 * (1 - ppl_personal / ppl_global), on each client's own test split) with its
standard error and the share of clients improved::

    python -m fedslm.simulations.bench.finetune_grid --run-dir outputs/runs/<date>/<time> \\
        --grid 0.003:5,0.001:5,0.0003:5,0.003:2,0.001:10

Personal copies go to a temporary dir; the run dir is only read.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from safetensors.numpy import load_file

from fedslm.client.personal import evaluate_personal
from fedslm.adapters import ADAPTER_WEIGHTS_FILE
from fedslm.config import ExperimentConfig


def parse_grid(text: str) -> list[tuple[float, int]]:
    """``"lr:steps,lr:steps"`` -> [(lr, steps), ...]."""
    try:
        return [(float(lr), int(steps)) for lr, steps in (item.split(":") for item in text.split(","))]
    except ValueError as exc:
        raise SystemExit(f"error: --grid: expected lr:steps[,lr:steps...], got {text!r}") from exc


def finetune_gains(run_dir: Path, lr: float, steps: int) -> list[float]:
    """Per-client gains (%) of fine-tuning the run's final global adapter."""
    config = json.loads((run_dir / "config.json").read_text())
    config["personalization"] = {**config.get("personalization", {}), "method": "finetune",
                                 "finetune_steps": steps, "finetune_learning_rate": lr}
    cfg = ExperimentConfig.from_dict(config)
    global_arrays = load_file(str(run_dir / "adapter" / ADAPTER_WEIGHTS_FILE))
    with tempfile.TemporaryDirectory(prefix="fedslm-ftgrid-") as state:
        return [evaluate_personal(cfg, global_arrays, partition_id=pid,
                                  server_round=cfg.federation.num_rounds, state_dir=Path(state))
                ["personal_gain"] for pid in range(cfg.federation.num_clients)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--grid", default="0.003:5,0.001:5,0.0003:5,0.003:2,0.001:10")
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.json").is_file() or not (args.run_dir / "adapter").is_dir():
        raise SystemExit(f"error: --run-dir: {args.run_dir} has no config.json and adapter/ "
                         "(give the output dir of a finished run)")
    print(f"{'lr':>8} {'steps':>5} {'gain % (mean ±sem)':>20} {'improved':>8}")
    for lr, steps in parse_grid(args.grid):
        gains = finetune_gains(args.run_dir, lr, steps)
        sem = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0
        improved = 100.0 * sum(g > 0 for g in gains) / len(gains)
        print(f"{lr:>8g} {steps:>5} {statistics.mean(gains):>+12.2f} ±{sem:<6.2f} {improved:>7.0f}%",
              flush=True)


if __name__ == "__main__":
    main()
