"""throughput: tokens/second of our client training loop vs a minimal hand-written one.

Same LoRA model (the default builtin tiny Llama, r=8 on q/v), same client-0 token
blocks, same batches in the same order, same number of optimizer steps. Ours is
``fedslm.training.train_local`` exactly as a client calls it each round (optimizer and
loader built per call, warm-up/decay schedule, pad masking, global grad-norm clipping,
loss read back every step). The hand-written loop is AdamW with zero_grad / forward /
backward / step over pre-built batches and nothing else. Repetitions alternate between
the two (ABBA order) and the medians are compared.

The ratio is taken on tokens per CPU second of this process (``time.process_time``):
with one torch thread that is the loop's own speed, unaffected by other work on a shared
machine taking the core away; tokens per wall second are reported next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from fedslm.simulations.bench.common import experiment, machine, median, table, torch_threads, write_json

TARGET = 0.95


def hand_written(model, batches, *, learning_rate: float) -> int:
    """Tokens trained on by the plainest LoRA fine-tuning loop."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    return sum(b.numel() for b in batches)


def ours(model, blocks, training, *, seed: int) -> int:
    """Tokens trained on by one client round of ``train_local``."""
    from fedslm.training import train_local

    return train_local(model, blocks, training, generator_seed=seed).num_examples * blocks.shape[1]


def same_batches(blocks, training, *, seed: int):
    """The batches ``train_local`` draws for ``seed``: its loader, cycled to local_steps."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(blocks), batch_size=training.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    batches = []
    while len(batches) < training.local_steps:
        batches += [b for (b,) in loader][: training.local_steps - len(batches)]
    return batches


def measure(steps: int, reps: int, threads: int) -> dict[str, Any]:
    from fedslm.client.records import client_data as _client_data

    cfg = experiment({"training.local_steps": steps}, run_name="throughput")
    training = cfg.training
    with torch_threads(threads):
        model, (blocks,) = _client_data(cfg, 0, "train")
        seed = 1234
        batches = same_batches(blocks, training, seed=seed)
        ours(model, blocks, training, seed=seed)  # warm-up both paths
        hand_written(model, batches, learning_rate=training.learning_rate)
        loops = {"ours": lambda: ours(model, blocks, training, seed=seed),
                 "hand_written": lambda: hand_written(model, batches, learning_rate=training.learning_rate)}
        wall: dict[str, list[float]] = {"ours": [], "hand_written": []}
        cpu: dict[str, list[float]] = {"ours": [], "hand_written": []}
        for rep in range(reps):
            order = ("ours", "hand_written") if rep % 2 == 0 else ("hand_written", "ours")
            for name in order:
                t, c = time.perf_counter(), time.process_time()
                tokens = loops[name]()
                cpu[name].append(tokens / (time.process_time() - c))
                wall[name].append(tokens / (time.perf_counter() - t))
    return {"setting": {"steps": steps, "reps": reps, "threads": threads,
                        "batch_size": training.batch_size, "seq_len": training.seq_len,
                        "blocks": int(blocks.shape[0]), "training": dataclasses.asdict(training)},
            "tokens_per_second": wall, "tokens_per_cpu_second": cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per repetition")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a client's share)")
    parser.add_argument("--tiny", action="store_true", help="3 steps x 2 reps (smoke test)")
    parser.add_argument("--out", help="JSON path (default outputs/bench/throughput.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.reps = 3, 2
    result = measure(args.steps, args.reps, args.threads)
    wall, cpu = result["tokens_per_second"], result["tokens_per_cpu_second"]
    ratio = median(cpu["ours"]) / median(cpu["hand_written"])
    wall_ratio = median(wall["ours"]) / median(wall["hand_written"])
    rows = [{"loop": "fedslm.training.train_local", "tokens_per_cpu_s": median(cpu["ours"]),
             "tokens_per_s": median(wall["ours"])},
            {"loop": "hand-written PyTorch", "tokens_per_cpu_s": median(cpu["hand_written"]),
             "tokens_per_s": median(wall["hand_written"])},
            {"loop": "ratio (ours / hand-written)", "tokens_per_cpu_s": ratio, "tokens_per_s": wall_ratio,
             "target": TARGET, "met": "yes" if ratio >= TARGET else "no"}]
    print(table(rows, ["loop", "tokens_per_cpu_s", "target", "met", "tokens_per_s"]))
    result.update(benchmark="throughput", ratio=ratio, wall_ratio=wall_ratio, target=TARGET,
                  machine=machine())
    print(f"\nwrote {write_json('throughput', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
