"""Round checkpoints: what the server needs to continue a run after its process dies.

After every round the server writes ``<output_dir>/checkpoint.npz``: the global adapter,
the strategy's own state (FedAdam/FedYogi/FedAdagrad ``m_t``/``v_t``, FedAvgM's momentum),
the per-round and per-client history, the MLflow run id, Python's ``random`` state (Flower
samples clients with it), the config it was made with, and the state of every registered
``StateHook`` (the user-level privacy accountant registers one). A restarted server with
``federation.resume_from=<that output_dir>`` continues with round k+1 in the same MLflow
run, so the finished run has the same rounds as one that never stopped.

The file is written to a temporary name, fsynced, then renamed over the old one: a crash
while writing leaves the last good checkpoint in place. It carries a sha256 over its
arrays and metadata: a truncated, corrupt or edited checkpoint is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedslm.atomic import atomic_write
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.server.rounds import History

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT_VERSION = 2  # 2: a sha256 over arrays and metadata
# Strategy attributes that carry state from round to round (Flower 1.41): FedOpt family
# (FedAdam, FedYogi, FedAdagrad) and FedAvgM. Anything else is rebuilt from the config.
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")
# Keys that may differ between the interrupted run and the one that continues it.
RESUMABLE_CHANGES = {
    "output_dir", "federation.resume_from", "federation.address",
    "federation.root_certificates", "federation.insecure", "federation.round_timeout",
    "federation.i_know_this_is_insecure",
    "federation.num_rounds",
}


@dataclass
class StateHook:
    """Extra server state that must survive a restart, saved as JSON-able data.

    Register one per stateful component in ``run_experiment``; e.g. the user-level
    privacy accountant (server/privacy.py): ``StateHook("privacy_accountant",
    accountant.state_dict, accountant.load_state_dict)``. A checkpoint that lacks a
    registered hook's state is refused on resume, so a budget is never silently reset.
    """

    name: str
    save: Callable[[], dict[str, Any]]
    load: Callable[[dict[str, Any]], None]


@dataclass
class Checkpoint:
    """Everything a restarted server needs to continue after ``round``."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    history: History
    mlflow_run_id: str
    config: dict[str, Any]
    random_state: list = field(default_factory=list)
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)


# ---------------------------------------------------------------- strategy state

def _strategy_chain(strategy: Any) -> list[Any]:
    """The strategy and the ones it wraps (Flower's DP wrappers keep ``.strategy``)."""
    chain = [strategy]
    while hasattr(chain[-1], "strategy") and len(chain) < 8:
        chain.append(chain[-1].strategy)
    return chain


def strategy_state(strategy: Any) -> dict[str, np.ndarray]:
    """Flat ``"<depth>/<attribute>/<key>"`` arrays of the strategy's round-to-round state."""
    state: dict[str, np.ndarray] = {}
    for depth, obj in enumerate(_strategy_chain(strategy)):
        for attr in STATEFUL_ATTRIBUTES:
            value = getattr(obj, attr, None)
            if value is None:
                continue
            items = value.items() if isinstance(value, Mapping) else (
                (f"{i:04d}", v) for i, v in enumerate(value))
            for key, arr in items:
                state[f"{depth}/{attr}/{key}"] = np.asarray(arr)
    return state


def restore_strategy_state(strategy: Any, state: Mapping[str, np.ndarray]) -> None:
    """Inverse of ``strategy_state``; refuses state the strategy has no slot for."""
    chain = _strategy_chain(strategy)
    grouped: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for flat, arr in state.items():
        depth, attr, key = flat.split("/", 2)
        grouped.setdefault((int(depth), attr), {})[key] = np.array(arr)
    for (depth, attr), values in grouped.items():
        if depth >= len(chain) or not hasattr(chain[depth], attr):
            raise ConfigError(f"federation.resume_from: the checkpoint holds strategy state "
                              f"{attr!r} that strategy {type(strategy).__name__} does not have")
        if attr == "momentum_vector":
            setattr(chain[depth], attr, [values[k] for k in sorted(values)])
        else:
            setattr(chain[depth], attr, values)


# ---------------------------------------------------------------- file format

def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_FILE


def save_checkpoint(path: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically: temp file, fsync, rename over the previous one."""
    meta = {
        "format": FORMAT_VERSION, "round": ckpt.round, "mlflow_run_id": ckpt.mlflow_run_id,
        "config": ckpt.config, "random_state": ckpt.random_state, "extra": ckpt.extra,
        "history": {"rounds": ckpt.history.rounds, "clients": ckpt.history.clients},
    }
    payload = {f"adapter/{k}": np.asarray(v) for k, v in ckpt.arrays.items()}
    payload.update({f"strategy/{k}": v for k, v in ckpt.strategy_state.items()})
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    payload["digest"] = np.frombuffer(_digest(payload).encode(), dtype=np.uint8)
    return atomic_write(path, lambda fh: np.savez(fh, **payload))


def _digest(payload: Mapping[str, np.ndarray]) -> str:
    """sha256 over every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(k for k in payload if k != "digest"):
        arr = np.ascontiguousarray(payload[name])
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; one-line ConfigError otherwise."""
    if not path.is_file():
        raise ConfigError(f"federation.resume_from: no checkpoint at {path} "
                          "(the run did not finish a round, or this is not its output dir)")
    try:
        with np.load(path, allow_pickle=False) as data:
            payload = {k: data[k] for k in data.files}
        meta = json.loads(payload["meta"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"federation.resume_from: {path} is not a readable checkpoint "
                          f"({type(err).__name__})") from err
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(f"federation.resume_from: {path} has format {meta.get('format')}, "
                          f"expected {FORMAT_VERSION}")
    if "digest" not in payload or payload["digest"].tobytes().decode() != _digest(payload):
        raise ConfigError(f"federation.resume_from: {path} does not match its sha256 "
                          "(corrupt or edited); refusing to resume from it")
    arrays = {k.removeprefix("adapter/"): v for k, v in payload.items() if k.startswith("adapter/")}
    strategy = {k.removeprefix("strategy/"): v for k, v in payload.items()
                if k.startswith("strategy/")}
    history = History(rounds=meta["history"]["rounds"], clients=meta["history"]["clients"])
    return Checkpoint(round=meta["round"], arrays=arrays, strategy_state=strategy,
                      history=history, mlflow_run_id=meta["mlflow_run_id"],
                      config=meta["config"], random_state=meta["random_state"],
                      extra=meta["extra"])


# ---------------------------------------------------------------- resume rules

def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(ckpt: Checkpoint, cfg: ExperimentConfig) -> None:
    """The run continuing a checkpoint must be the same experiment (more rounds allowed)."""
    saved, now = _flat(ckpt.config), _flat(cfg.to_dict())
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_CHANGES or saved.get(key) == now.get(key):
            continue
        raise ConfigError(f"federation.resume_from: the checkpoint was made with "
                          f"{key}={saved.get(key)!r}, this run has {key}={now.get(key)!r}")
    if cfg.federation.num_rounds < ckpt.round:
        raise ConfigError(f"federation.num_rounds: {cfg.federation.num_rounds} is below the "
                          f"{ckpt.round} rounds the checkpoint has already completed")


def random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_random_state(state: list) -> None:
    if state:
        random.setstate((state[0], tuple(state[1]), state[2]))


def restore_hooks(ckpt: Checkpoint, hooks: list[StateHook]) -> None:
    """Give each hook its saved state; a hook without saved state is an error."""
    names = {h.name for h in hooks}
    for name in ckpt.extra:
        if name not in names:
            raise ConfigError(f"federation.resume_from: the checkpoint holds {name!r} state "
                              "but this run has nothing to restore it into")
    for hook in hooks:
        if hook.name not in ckpt.extra:
            raise ConfigError(f"federation.resume_from: the checkpoint has no {hook.name!r} "
                              "state; refusing to start it from scratch")
        hook.load(ckpt.extra[hook.name])


def make_checkpoint(rnd: int, arrays: Mapping[str, np.ndarray], strategy: Any,
                    history: History, *, mlflow_run_id: str, cfg: ExperimentConfig,
                    hooks: list[StateHook]) -> Checkpoint:
    return Checkpoint(round=rnd, arrays=dict(arrays), strategy_state=strategy_state(strategy),
                      history=history, mlflow_run_id=mlflow_run_id or "", config=cfg.to_dict(),
                      random_state=random_state(), extra={h.name: h.save() for h in hooks})


def resume_state(cfg: ExperimentConfig, strategy: Any, hooks: list[StateHook]) -> Checkpoint | None:
    """With ``federation.resume_from``: load its checkpoint, check it belongs to this
    experiment, and put the strategy state, hook state and sampling RNG back."""
    if not cfg.federation.resume_from:
        return None
    ckpt = load_checkpoint(checkpoint_path(cfg.federation.resume_from))
    check_resumable(ckpt, cfg)
    restore_strategy_state(strategy, ckpt.strategy_state)
    restore_hooks(ckpt, hooks)
    set_random_state(ckpt.random_state)
    return ckpt
