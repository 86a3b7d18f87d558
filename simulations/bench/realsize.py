"""What a real-size SLM costs per client: ``builtin:shape:smollm2-135m`` (random weights,
the real shape), LoRA r=8 on q/v and on all linear layers.

CPU (default): each in-process variant runs in its own child process, so its peak RSS
is its own (VmHWM): FedSLM's ``train_local`` on the model the runtime builds,
a bare Hugging Face + PEFT loop over the same batches, DP-SGD, gradient checkpointing.
Then a real federated run per target set (2 clients x 1 round on the simulation
engine) with each process's peak RSS read from ``/proc/<pid>/status`` (VmHWM): Ray
workers are the clients, the ``flwr-simulation`` process holds the ServerApp.
Uplink bytes are the exact ArrayRecord payload and protobuf sizes of one reply.

``--device cuda`` (needs a GPU; CI has none): 135M and 0.5B shapes in fp32, bf16 and
4-bit: tokens/s of ``train_local`` vs the bare loop, peak GPU memory, and the largest
batch (powers of two up to ``--max-batch``) that trains a step without running out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPE_135M = "builtin:shape:smollm2-135m"
SHAPE_05B = "builtin:shape:qwen2.5-0.5b"
TARGETS = {"qv": ["auto"], "all-linear": ["all-linear"]}
VOCAB_IDS = (4, 1024)  # the builtin tokenizer's ordinary ids: real text's id range


DP_VARIANTS = {"dp_sgd": "hooks", "dp_sgd_ghost": "ghost"}  # variant -> privacy.grad_sample_mode

# --- one variant, in a child process ---------------------------------------------------


def batches(n: int, seq_len: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(*VOCAB_IDS, (n, seq_len), generator=g)


def build(shape: str, targets: list[str], *, device: str = "cpu", precision: str = "fp32",
          quantization: str = "none", gradient_checkpointing: bool = False):
    """FedSLM's model for this setting, exactly as a client's runtime builds it."""
    from fedslm.config import ModelConfig, PeftConfig
    from fedslm.runtime import peft_model

    dtype = "bfloat16" if precision == "bf16" and quantization == "none" and device == "cuda" else "float32"
    model_cfg = ModelConfig(name_or_path=shape, dtype=dtype, quantization=quantization)
    return peft_model(model_cfg, PeftConfig(r=8, alpha=16.0, dropout=0.0, target_modules=targets),
                      device=device, gradient_checkpointing=gradient_checkpointing)[0]


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class StepTime:
    """Seconds per step after the first: wall, and this process's CPU time (one torch
    thread, so on a shared machine CPU time is the fairer ratio)."""

    wall: float
    cpu: float


def bare_loop(shape: str, targets: list[str], blocks, *, batch_size: int, device: str = "cpu",
              precision: str = "fp32", quantization: str = "none") -> tuple[StepTime, Any]:
    """The baseline: from_pretrained + get_peft_model + AdamW, nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedslm.config import ModelConfig
    from fedslm.device import quantization_kwargs
    from fedslm.runtime import model_path

    path = model_path(ModelConfig(name_or_path=shape))
    dtype = torch.bfloat16 if precision == "bf16" and quantization == "none" and device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                **quantization_kwargs(quantization, torch.device(device)))
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    target = "all-linear" if targets == ["all-linear"] else ["q_proj", "v_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target,
                                            task_type="CAUSAL_LM"))
    if quantization == "none":
        model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    amp = (torch.autocast(device, dtype=torch.bfloat16) if precision in ("bf16",) or quantization != "none"
           else contextlib.nullcontext())
    start = cpu0 = 0.0
    steps = len(blocks) // batch_size
    for step in range(steps):
        if step == 1:  # the first step pays one-time costs in both loops
            _sync(device)
            start, cpu0 = time.perf_counter(), time.process_time()
        ids = blocks[step * batch_size:(step + 1) * batch_size].to(device)
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return StepTime((time.perf_counter() - start) / (steps - 1), (time.process_time() - cpu0) / (steps - 1)), model


def fedslm_loop(model, blocks, *, batch_size: int, precision: str = "fp32", dp: str = "",
                dp_batches: str = "fixed") -> StepTime:
    """FedSLM's own loop (``train_local``, or DP-SGD's with Opacus' ``dp`` grad-sample mode:
    ``hooks`` or ``ghost``), timed after its first step.

    DP-SGD draws Poisson batches (expected size ``batch_size``), so one run's peak memory
    follows its largest realized batch. ``dp_batches="fixed"`` keeps FedSLM's private
    setup (Opacus hooks, clipping, noise) but feeds the same fixed batches as the other
    loops: the like-for-like cost of per-example clipping. ``"poisson"`` runs
    ``train_dp_sgd`` itself."""
    from fedslm.training import make_training_setup, run_steps
    from fedslm.config import PrivacyConfig, TrainingConfig

    steps = len(blocks) // batch_size
    cfg = TrainingConfig(learning_rate=1e-4, local_steps=steps, batch_size=batch_size,
                         warmup_ratio=0.0, seq_len=blocks.shape[1], precision=precision)
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, grad_sample_mode=dp or "hooks")
    if dp and dp_batches == "poisson":
        import tempfile

        from fedslm.client.dp_sgd import train_dp_sgd

        with tempfile.TemporaryDirectory() as state:
            result, _ = train_dp_sgd(model, blocks, cfg, privacy,
                                     state_dir=Path(state), server_round=1, generator_seed=0)
        return StepTime(result.seconds / result.steps, float("nan"))
    setup = make_training_setup(model, blocks, cfg, generator_seed=0)
    optimizer, cleanup = setup.optimizer, None
    if dp:
        from torch.utils.data import DataLoader, TensorDataset

        from fedslm.client.dp_sgd import make_private

        private = make_private(setup, noise_multiplier=privacy.noise_multiplier,
                               max_grad_norm=privacy.max_grad_norm, grad_sample_mode=dp,
                               accountant=privacy.accountant_name())
        private.setup.loader = DataLoader(TensorDataset(blocks), batch_size=batch_size, shuffle=False)
        setup, optimizer, cleanup = private.setup, private.setup.optimizer.original_optimizer, private.hooks.cleanup
    marks: list[tuple[float, float]] = []

    def mark() -> None:
        _sync(str(_device(model)))
        marks.append((time.perf_counter(), time.process_time()))

    # the clock starts after the first step, which waits for the GPU; no later step does
    # (as in the bare loop: a sync per step would take away the CPU/GPU overlap)
    step_hook = optimizer.register_step_post_hook(lambda *_: None if marks else mark())
    try:
        steps = run_steps(setup).steps
        mark()
    finally:
        step_hook.remove()
        if cleanup is not None:
            cleanup()
    return StepTime((marks[-1][0] - marks[0][0]) / (steps - 1), (marks[-1][1] - marks[0][1]) / (steps - 1))


def _device(model):
    from fedslm.device import model_device

    return model_device(model)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def own_peak_rss() -> int:
    """This process's peak RSS since its exec (VmHWM; ``ru_maxrss`` would carry the
    forking parent's peak over exec)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One CPU variant in this process; its peak RSS is this process's."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    bs, seq = spec["batch_size"], spec["seq_len"]
    blocks = batches(bs * spec["steps"], seq)
    rss0 = own_peak_rss()
    out: dict[str, Any] = {"variant": spec["variant"], "targets": spec["targets"]}
    targets = TARGETS[spec["targets"]]
    if spec["variant"] == "bare":
        timing, model = bare_loop(spec["shape"], targets, blocks, batch_size=bs)
    else:
        model = build(spec["shape"], targets, gradient_checkpointing=spec["variant"] == "checkpointing")
        timing = fedslm_loop(model, blocks, batch_size=bs, dp=DP_VARIANTS.get(spec["variant"], ""),
                             dp_batches=spec.get("dp_batches", "fixed"))
        if spec["variant"] == "fedslm":
            from fedslm.adapters import adapter_arrays, to_array_record
            from fedslm.simulations.bench.comm import record_bytes

            payload, proto = record_bytes({"arrays": to_array_record(adapter_arrays(model))})
            out.update(uplink_payload_bytes=payload, uplink_message_bytes=proto)
    base = model.get_base_model()
    out.update(seconds_per_step=timing.wall, cpu_seconds_per_step=timing.cpu, tokens_per_s=bs * seq / timing.wall,
               peak_rss=own_peak_rss(),
               rss_before_model=rss0, model_bytes=model_bytes(base),
               trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
               base_parameters=sum(p.numel() for p in base.parameters()))
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-m", "fedslm.simulations.bench.realsize", "--child",
                           json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"realsize child {spec['variant']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the federated run: peak RSS per process --------------------------------------------


class PeakPerProcess:
    """Every descendant's own peak RSS (VmHWM), sampled until it exits, by role."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peaks, self._stop = interval, {}, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        from fedslm.simulations.bench.common import component

        while not self._stop.wait(self.interval):
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(Exception):
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines()
                               if line.startswith("VmHWM"))
                    role = component(" ".join(proc.cmdline()))
                    self.peaks[proc.pid] = (role, max(hwm, self.peaks.get(proc.pid, ("", 0))[1]))


def federated(targets: str, args) -> dict[str, Any]:
    from fedslm.simulations.bench.common import experiment, run_engine

    cfg = experiment({"model.name_or_path": SHAPE_135M, "peft.target_modules": TARGETS[targets],
                      "peft.dropout": 0.0, "federation.num_clients": 2, "federation.num_rounds": 1,
                      "federation.initial_evaluation": False, "training.local_steps": args.steps,
                      "training.batch_size": args.batch_size, "training.seq_len": args.seq_len,
                      "training.eval_max_batches": 1, "training.central_eval": False,
                      "data.docs_per_client": 48}, run_name=f"realsize-{targets}")
    with PeakPerProcess() as peaks:
        run = run_engine(cfg)
    rows = [r for r in run.summary.get("rounds", [])]
    clients = _client_rows(Path(cfg.output_dir))
    train = [c for c in clients if c.get("phase") == "train"]
    sps = [float(c["seconds"]) / float(c["steps"]) for c in train if c.get("steps")]
    workers = sorted((rss for role, rss in peaks.peaks.values() if role == "ray workers"), reverse=True)
    server = max((rss for role, rss in peaks.peaks.values() if role in ("simulation", "serverapp")), default=0)
    return {"targets": targets, "wall_s": run.wall, "rounds": len(rows),
            "client_seconds_per_step": sps, "client_peak_rss": workers[:2], "serverapp_peak_rss": server}


def _client_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "clients.csv") as fh:
        return list(csv.DictReader(fh))


# --- CPU table ----------------------------------------------------------------------------


def cpu(args) -> dict[str, Any]:
    from fedslm.config import ModelConfig
    from fedslm.runtime import model_path

    model_path(ModelConfig(name_or_path=SHAPE_135M))  # built once, before anything is timed
    common = {"shape": SHAPE_135M, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "steps": args.steps + 1, "threads": 1, "dp_batches": args.dp_batches}
    runs = []
    for targets in TARGETS:
        for variant in ("bare", "fedslm") + (("dp_sgd", "dp_sgd_ghost", "checkpointing") if targets == "qv" else ()):
            if args.variants and variant not in args.variants.split(",") and variant != "fedslm":
                continue
            print(f"[realsize] {targets} {variant} ...", flush=True)
            runs.append(run_child({**common, "variant": variant, "targets": targets}))
    fed = []
    if not args.skip_federated:
        for targets in TARGETS:
            print(f"[realsize] {targets}: 2 clients x 1 round on the simulation engine ...", flush=True)
            fed.append(federated(targets, args))
    return {"runs": runs, "federated": fed}


def cpu_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(r["targets"], r["variant"]): r for r in result["runs"]}
    fed = {f["targets"]: f for f in result["federated"]}
    rows = []
    for (targets, variant), r in by.items():
        bare, ours = by.get((targets, "bare")), by.get((targets, "fedslm"))
        cpu_s = r.get("cpu_seconds_per_step")
        row = {"lora": targets, "loop": variant, "s/step": r["seconds_per_step"], "CPU s/step": cpu_s,
               "tokens/s": r["tokens_per_s"],
               "vs bare": bare["seconds_per_step"] / r["seconds_per_step"] if bare else None,
               "CPU vs bare": _ratio(bare and bare.get("cpu_seconds_per_step"), cpu_s),
               "peak RSS MiB": r["peak_rss"] / 2**20, "model MiB": r["model_bytes"] / 2**20,
               "RSS/model": r["peak_rss"] / r["model_bytes"]}
        if variant in (*DP_VARIANTS, "checkpointing") and ours:
            row["time vs fedslm"] = r["seconds_per_step"] / ours["seconds_per_step"]
            row["CPU vs fedslm"] = _ratio(cpu_s, ours.get("cpu_seconds_per_step"))
            row["RSS vs fedslm"] = r["peak_rss"] / ours["peak_rss"]
        rows.append(row)
    for targets, f in fed.items():
        model = by[(targets, "fedslm")]["model_bytes"]
        sps = sum(f["client_seconds_per_step"]) / max(1, len(f["client_seconds_per_step"]))
        rows.append({"lora": targets, "loop": "federated (2 clients)", "s/step": sps,
                     "tokens/s": (by[(targets, "fedslm")]["tokens_per_s"]
                                  * by[(targets, "fedslm")]["seconds_per_step"] / sps),
                     "vs bare": by[(targets, "bare")]["seconds_per_step"] / sps,
                     "peak RSS MiB": max(f["client_peak_rss"], default=0) / 2**20, "model MiB": model / 2**20,
                     "RSS/model": max(f["client_peak_rss"], default=0) / model,
                     "ServerApp MiB": f["serverapp_peak_rss"] / 2**20})
    return rows


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den where both were measured (older JSON and Poisson DP rows carry no CPU time)."""
    if not num or not den or num != num or den != den:
        return None
    return num / den


def uplink_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in result["runs"]:
        if r["variant"] == "fedslm":
            full = (r["base_parameters"] - r["trainable"]) * 4  # every base weight, float32
            rows.append({"lora r=8": r["targets"], "trainable": r["trainable"],
                         "payload B": r["uplink_payload_bytes"], "message B": r["uplink_message_bytes"],
                         "full FT B": full, "full / LoRA": full / r["uplink_payload_bytes"]})
    return rows


# --- GPU table -----------------------------------------------------------------------------


def gpu(args) -> dict[str, Any]:
    import torch

    from fedslm.config import ModelConfig
    from fedslm.runtime import _peft_model, model_path

    rows = []
    for shape in (SHAPE_135M, SHAPE_05B):
        model_path(ModelConfig(name_or_path=shape))
        for setting in ("fp32", "bf16", "4bit"):
            precision, quant = ("bf16", "4bit") if setting == "4bit" else (setting, "none")
            blocks = batches(args.gpu_batch * (args.steps + 1), args.seq_len)
            row = {"shape": shape.rsplit(":", 1)[-1], "setting": setting}
            try:
                torch.cuda.reset_peak_memory_stats()
                bare_t, bare_model = bare_loop(shape, ["auto"], blocks, batch_size=args.gpu_batch,
                                               device="cuda", precision=precision, quantization=quant)
                del bare_model
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                model = build(shape, ["auto"], device="cuda", precision=precision, quantization=quant)
                ours = fedslm_loop(model, blocks, batch_size=args.gpu_batch, precision=precision).wall
                bare_s = bare_t.wall
                row.update({"tokens/s": args.gpu_batch * args.seq_len / ours,
                            "bare tokens/s": args.gpu_batch * args.seq_len / bare_s, "vs bare": bare_s / ours,
                            "peak GPU MiB": torch.cuda.max_memory_allocated() / 2**20,
                            "max batch": largest_batch(model, args, precision)})
            except Exception as exc:  # noqa: BLE001 - a row says what failed, the table goes on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            _peft_model.cache_clear()
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
    return {"gpu": torch.cuda.get_device_name(0), "rows": rows}


def largest_batch(model, args, precision: str) -> int:
    import torch

    from fedslm.training import make_training_setup, run_steps
    from fedslm.config import TrainingConfig

    best, bs = 0, args.gpu_batch
    while bs <= args.max_batch:
        try:
            cfg = TrainingConfig(learning_rate=1e-4, local_steps=1, batch_size=bs, warmup_ratio=0.0,
                                 seq_len=args.seq_len, precision=precision)
            run_steps(make_training_setup(model, batches(bs, args.seq_len), cfg, generator_seed=0))
            torch.cuda.synchronize()
            best, bs = bs, bs * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


# --- entry ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench realsize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed local steps (one more untimed)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--skip-federated", action="store_true", help="only the in-process variants")
    parser.add_argument("--variants", default="", help="comma list of in-process variants to run "
                        "(bare, dp_sgd, dp_sgd_ghost, checkpointing; fedslm always runs); default all")
    parser.add_argument("--dp-batches", choices=("fixed", "poisson"), default="fixed",
                        help="DP-SGD variants: the other loops' fixed batches through FedSLM's private "
                        "setup (like for like), or train_dp_sgd's own Poisson batches")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    from fedslm.simulations.bench.common import machine, table, write_json

    start = time.monotonic()
    if args.device == "cuda":
        from fedslm.device import resolve_device
        from fedslm.config import ConfigError

        try:
            resolve_device("cuda")
        except ConfigError as err:
            print(f"error: --device: {str(err).removeprefix('training.device: ')}", file=sys.stderr)
            return 2
        result = gpu(args)
        print(table(result["rows"], ["shape", "setting", "tokens/s", "bare tokens/s", "vs bare",
                                     "peak GPU MiB", "max batch", "error"]))
    else:
        result = cpu(args)
        print(table(cpu_rows(result), ["lora", "loop", "s/step", "CPU s/step", "tokens/s", "vs bare",
                                       "CPU vs bare", "peak RSS MiB", "model MiB", "RSS/model",
                                       "time vs fedslm", "CPU vs fedslm", "RSS vs fedslm", "ServerApp MiB"]))
        print()
        print(table(uplink_rows(result), ["lora r=8", "trainable", "payload B", "message B",
                                          "full FT B", "full / LoRA"]))
    result.update(settings=vars(args), machine=machine(), wall_s=time.monotonic() - start)
    path = write_json(f"realsize-{args.device}", result, args.out)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
