"""What DP-SGD costs on one client: step time and peak memory, plain vs Opacus hooks vs ghost.

    python -m fedslm.simulations.bench.dp_cost                       # tiny + small models, CPU
    python -m fedslm.simulations.bench.dp_cost --sizes small --batch-size 16 --seq-len 128 --json out.json

Each (model size, mode) runs in fresh processes (``--passes`` of them, interleaved with
the other configurations, so a busy machine slows all alike), so peak memory is that
configuration's own: on CUDA ``torch.cuda.max_memory_allocated`` while training; on CPU
the peak resident set size while training minus the resident size before the first step
(the training working set). Time per step, wall clock and CPU time of the process (less
sensitive to other load), is the median over ``--repeats`` timed blocks of ``--steps``
steps after ``--warmup`` steps, then the median over passes; ratios are of CPU time.

Same LoRA setup and training loop (``fedslm.training.run_steps``) as the federated clients,
and the same batches: by default the DP runs train on the plain run's fixed-size batches
(Opacus's hooks, per-example clipping and noise, on the Poisson loader's expected batch
size). A real DP-SGD client samples Poisson batches, whose size varies from step to step
(Binomial(n, q)): its peak memory follows the largest batch drawn, not the DP mechanics;
``--poisson`` measures that instead and the table shows the largest batch seen.
Models other than ``tiny`` (the builtin tiny Llama) are randomly initialised Llamas of
the given size: the cost of DP does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

SIZES = {  # hidden, layers, heads, intermediate
    "tiny": None,  # the builtin tiny Llama (64 x 2)
    "small": (256, 4, 4, 688),
    "medium": (512, 8, 8, 1376),
    "large": (1024, 12, 16, 2752),
}
MODES = ("none", "hooks", "ghost")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _model(size: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedslm.config import ModelConfig, PeftConfig
    from fedslm.model import build_peft_model, load_base_model
    from fedslm.runtime import model_path

    if SIZES[size] is None:
        base, _ = load_base_model(model_path(ModelConfig()), dtype="float32")
    else:
        hidden, layers, heads, inter = SIZES[size]
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers,
                                            num_attention_heads=heads, num_key_value_heads=heads,
                                            intermediate_size=inter, max_position_embeddings=1024,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2))
        for p in base.parameters():
            p.requires_grad_(False)
    return build_peft_model(base, PeftConfig(dropout=0.0))


def measure(size: str, mode: str, *, batch_size: int, seq_len: int, steps: int, warmup: int,
            repeats: int, threads: int, device: str, poisson: bool = False) -> dict:
    """One configuration, in the current process (``main`` gives each its own process)."""
    import torch

    from fedslm.client.dp_sgd import make_private
    from fedslm.training import make_training_setup, run_steps
    from fedslm.config import TrainingConfig

    torch.set_num_threads(threads)
    model = _model(size).to(device)
    records = batch_size * 16  # Poisson rate 1/16, expected batch = batch_size
    blocks = torch.randint(4, 1024, (records, seq_len), device=device)
    cfg = TrainingConfig(learning_rate=1e-3, local_steps=1, batch_size=batch_size, seq_len=seq_len,
                         warmup_ratio=0.0)
    setup = make_training_setup(model, blocks, cfg, generator_seed=0)
    fixed_batches = setup.loader
    hooks = None
    if mode != "none":
        private = make_private(setup, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                               accountant="prv")
        setup, hooks = private.setup, private.hooks
        if not poisson:  # the same batches as the plain run (see the module docstring)
            setup.loader = fixed_batches
    largest = _largest_batch(setup)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()  # model and data loaded, nothing trained yet
    setup.local_steps = warmup
    run_steps(setup)
    times, cpu_times = [], []
    setup.local_steps = steps
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = run_steps(setup)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps)
        cpu_times.append((time.process_time() - cpu_start) / steps)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"size": size, "mode": mode, "device": device, "batch_size": batch_size, "seq_len": seq_len,
           "threads": threads, "steps": steps * repeats, "step_seconds": statistics.median(times),
           "step_seconds_all": times, "cpu_step_seconds": statistics.median(cpu_times),
           "examples_per_step": result.num_examples / max(1, result.steps),
           "largest_batch": largest(), "poisson": poisson and mode != "none",
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "total_params": sum(p.numel() for p in model.parameters())}
    if device == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        out["peak_memory_bytes"] = max(0, peak_rss - rss_before)
        out["peak_rss_bytes"] = peak_rss
    if hooks is not None:
        hooks.cleanup()
    return out


def _largest_batch(setup):
    """Wrap ``setup.loader`` to remember the largest batch it yields; returns a getter."""
    seen = [0]
    inner = setup.loader

    class Watched:
        def __iter__(self):
            for batch in inner:
                seen[0] = max(seen[0], len(batch[0]))  # a (blocks,) tuple, as run_steps reads it
                yield batch

        def __len__(self):
            return len(inner)

        def __getattr__(self, name):
            return getattr(inner, name)

    setup.loader = Watched()
    return lambda: seen[0]


def _child(queue, kwargs) -> None:
    try:
        queue.put(measure(**kwargs))
    except BaseException as exc:  # reported, not hidden: the table shows which run failed
        queue.put({"size": kwargs["size"], "mode": kwargs["mode"], "error": f"{type(exc).__name__}: {exc}"})


def run_isolated(**kwargs) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def combine(passes: list[dict]) -> dict:
    """Medians over the interleaved passes of one configuration."""
    ok = [p for p in passes if "error" not in p]
    if not ok:
        return passes[0]
    out = dict(ok[0])
    for key in ("step_seconds", "cpu_step_seconds", "peak_memory_bytes", "examples_per_step"):
        out[key] = statistics.median(p[key] for p in ok)
    out["largest_batch"] = max(p.get("largest_batch", 0) for p in ok)
    out["passes"] = [{k: p[k] for k in ("step_seconds", "cpu_step_seconds", "peak_memory_bytes")} for p in ok]
    return out


def table(results: list[dict]) -> str:
    lines = [f"{'model':<7} {'mode':<6} {'wall ms/step':>12} {'cpu ms/step':>11} {'x plain':>8} "
             f"{'peak MiB':>9} {'x plain':>8} {'params (train/total)':>22} {'largest batch':>14}"]
    plain = {r["size"]: r for r in results if r["mode"] == "none" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"{r['size']:<7} {r['mode']:<6} failed: {r['error']}")
            continue
        base = plain.get(r["size"])
        t_ratio = r["cpu_step_seconds"] / base["cpu_step_seconds"] if base else float("nan")
        m_ratio = (r["peak_memory_bytes"] / base["peak_memory_bytes"]
                   if base and base["peak_memory_bytes"] else float("nan"))
        lines.append(f"{r['size']:<7} {r['mode']:<6} {1000 * r['step_seconds']:>12.1f} "
                     f"{1000 * r['cpu_step_seconds']:>11.1f} {t_ratio:>8.2f} "
                     f"{r['peak_memory_bytes'] / 2**20:>9.1f} {m_ratio:>8.2f} "
                     f"{r['trainable_params']:>10,}/{r['total_params']:<11,} "
                     f"{r.get('largest_batch', 0):>14}{' (Poisson)' if r.get('poisson') else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3, help="fresh processes per configuration, interleaved")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--poisson", action="store_true",
                        help="DP runs sample Poisson batches as a real client does (sizes vary)")
    parser.add_argument("--json", type=Path, default=Path("outputs/bench/dp_cost.json"))
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    for name, allowed, given in (("--sizes", SIZES, sizes), ("--modes", MODES, modes)):
        bad = [g for g in given if g not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad[0]!r}; expected {', '.join(allowed)}")
    passes: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in sizes for m in modes}
    for index in range(args.passes):  # interleaved, so load from other processes hits all modes alike
        for size in sizes:
            for mode in modes:
                passes[(size, mode)].append(run_isolated(
                    size=size, mode=mode, batch_size=args.batch_size, seq_len=args.seq_len,
                    steps=args.steps, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                    device=args.device, poisson=args.poisson))
                print(f"[dp_cost] pass {index + 1}/{args.passes}: {size}/{mode} done", file=sys.stderr, flush=True)
    results = [combine(p) for p in passes.values()]
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                     "results": results}, indent=2))
    print(f"\nJSON: {args.json.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
