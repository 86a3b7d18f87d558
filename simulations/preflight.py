"""Checks that fail fast, before any engine starts, with one line naming what is wrong.

Starting a SuperLink and Ray takes seconds; a missing data file or an impossible
sequence length should not cost that, nor surface as a traceback from a Ray worker.
For the builtin model, already built, nothing here imports transformers' modelling code
(~3 CPU-seconds a launch): its shape and length are the recipe's own.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedslm.builtin_model import BUILTIN_RECIPE, built_builtin_model
from fedslm.config import BUILTIN_MODEL, ConfigError, ExperimentConfig
from fedslm.device import refuse_unsupported
from fedslm.data import (build_federated_texts, central_test_texts, load_client_split, root_texts,
                         synthetic_public_corpus)
from fedslm.data.core import check_client_split
from fedslm.errors import ModelError

FULL_CHECK_MAX_CLIENTS = 100  # synthetic federations above this are sample-checked
SAMPLE_SIZE = 8
POOL_HINT_CLIENTS = 1000  # above this, one SuperNode per client costs visibly per round


def sampled_partitions(num_clients: int, k: int = SAMPLE_SIZE) -> list[int]:
    """``k`` partition ids spread evenly over ``0..num_clients-1``, first and last included."""
    if num_clients <= k:
        return list(range(num_clients))
    return sorted({round(i * (num_clients - 1) / (k - 1)) for i in range(k)})


def check_data(cfg: ExperimentConfig) -> list[str]:
    """Every client of a small federation; a spread sample of a large synthetic one.
    Returns notes on data the partitioning left out.

    A synthetic client is generated from its own seeded stream, so checking a sample
    costs the same at 100 or 10,000 clients; the others must partition the whole
    dataset anyway, which also checks every client.
    """
    n, task = cfg.federation.num_clients, cfg.task.name
    if cfg.strategy.name == "fltrust":  # the server's root records (a missing or malformed file)
        s = cfg.strategy
        root_texts(cfg.data, num_clients=n, task=task, root_docs=s.root_docs, root_data=s.root_data)
    if cfg.data.source != "synthetic" or n <= FULL_CHECK_MAX_CLIENTS:
        texts = build_federated_texts(cfg.data, num_clients=n, task=task)
        if len(texts.clients) != n:
            raise ConfigError(f"federation.num_clients: data yields {len(texts.clients)} clients, "
                              f"expected {n}")
        return list(texts.notes)
    hint = "raise data.docs_per_client"
    for pid in sampled_partitions(n):
        check_client_split(pid, load_client_split(cfg.data, num_clients=n, partition_id=pid, task=task),
                           hint=hint)
    central_test_texts(cfg.data, num_clients=n, task=task)
    return []


def check_model_shape(cfg: ExperimentConfig, path: str) -> None:
    """``peft.target_modules`` against the architecture, built on the meta device from
    its config alone (no weights: seconds even for a large model). The builtin Llama with
    PEFT's own targets (``auto``: ``q_proj``, ``v_proj``) has them by construction."""
    if cfg.model.name_or_path == BUILTIN_MODEL and cfg.peft.target_modules in ([], ["auto"]):
        return
    import torch
    from transformers import AutoConfig

    from fedslm.model import check_target_modules
    from fedslm.tasks import get_task

    config = AutoConfig.from_pretrained(path, local_files_only=True) if _local(path) else None
    if config is None:
        return  # a hub name not cached yet: build_peft_model checks it when it loads
    task = get_task(cfg.task.name)
    for key, value in task.model_kwargs(cfg).items():  # e.g. num_labels, as from_pretrained sets it
        setattr(config, key, value)
    with torch.device("meta"):
        try:
            skeleton = task.auto_model().from_config(config)
        except (ValueError, KeyError) as err:
            raise ModelError(f"model.name_or_path: {task.name} cannot use {path!r}: "
                             f"{str(err).splitlines()[0][:200]}") from None
    check_target_modules(skeleton, cfg.peft)


def _local(path: str) -> bool:
    import os

    if os.path.isdir(os.path.expanduser(path)):
        return True
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not in the local cache
        return False


def base_model_path(cfg: ExperimentConfig) -> str:
    """``fedslm.runtime.model_path`` (which builds the builtin model when it is missing),
    without importing torch and transformers when the builtin model is already built."""
    if cfg.model.name_or_path == BUILTIN_MODEL:
        built = built_builtin_model(cfg.model, synthetic_public_corpus(cfg.data.seed))
        if built is not None:
            return str(built)
    from fedslm.runtime import model_path

    return model_path(cfg.model, cfg.data.seed)


def max_length(cfg: ExperimentConfig, path: str) -> int:
    """The longest input the base model takes: the builtin recipe's, else its config's."""
    if cfg.model.name_or_path == BUILTIN_MODEL:
        return int(BUILTIN_RECIPE["llama"]["max_position_embeddings"])
    from fedslm.model import max_sequence_length

    return max_sequence_length(path)


def preflight_deployment(cfg: ExperimentConfig) -> int:
    """The CA file for a remote SuperLink, and the checkpoint to resume; returns the round
    the run continues after (0 when starting fresh)."""
    fed = cfg.federation
    if fed.engine == "remote" and fed.root_certificates:
        from fedslm.pki import PkiError, load_ca_certificate

        try:
            load_ca_certificate(fed.root_certificates)
        except PkiError as err:
            raise ConfigError(f"federation.root_certificates: {err}") from None
    if not fed.resume_from:
        return 0
    from fedslm.server.checkpoint import check_resumable, checkpoint_path, load_checkpoint

    ckpt = load_checkpoint(checkpoint_path(fed.resume_from))
    check_resumable(ckpt, cfg)
    if "privacy_accountant" in ckpt.extra:  # the ledger file must continue the checkpoint's
        from fedslm.server.privacy import (PrivacyStateError, load_server_privacy, new_server_state,
                                    resumed_state, server_privacy_path)

        path = server_privacy_path(fed.resume_from)
        try:
            resumed_state(load_server_privacy(path) or new_server_state(cfg),
                          ckpt.extra["privacy_accountant"], path=path)
        except PrivacyStateError as err:
            raise ConfigError(f"federation.resume_from: {err}") from None
    return ckpt.round


def check_machine(cfg: ExperimentConfig) -> None:
    """What this machine must offer the run: GPUs it is told to give each simulated
    client, and an output dir it can write (the run's log, checkpoints and tables)."""
    fed = cfg.federation
    if fed.engine == "simulation" and fed.client_num_gpus > 0:
        import torch

        if torch.cuda.device_count() == 0:
            raise ConfigError(f"federation.client_num_gpus: {fed.client_num_gpus:g} per client, "
                              "but this machine has no GPU torch can use; set it to 0")
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as err:
            why = err.strerror or type(err).__name__
            raise ConfigError(f"output_dir: cannot write to {out} ({why})") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir: cannot write to {out} (permission denied)")


def preflight(cfg: ExperimentConfig) -> str:
    """Validate data and model against the config; returns the resolved base model path.
    Prints what the partitioning dropped, if anything."""
    check_machine(cfg)
    if cfg.federation.engine == "simulation":  # remote clients are checked by their agents
        refuse_unsupported(cfg)
    for note in check_data(cfg):
        print(f"[fedslm] {note}", flush=True)
    path = base_model_path(cfg)
    check_model_shape(cfg, path)
    limit = max_length(cfg, path)
    if cfg.training.seq_len > limit:
        raise ConfigError(f"training.seq_len: {cfg.training.seq_len} exceeds the maximum "
                          f"sequence length {limit} of model {cfg.model.name_or_path}")
    return path


TRACKING_TIMEOUT = 3.0


def check_tracking(cfg: ExperimentConfig) -> None:
    """The MLflow tracking URI, before any engine starts: an unreachable server would
    otherwise be retried by MLflow's client for minutes inside the ServerApp."""
    uri = cfg.tracking.uri
    if not cfg.tracking.enabled or not uri:
        return
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(f"{uri.rstrip('/')}/health", timeout=TRACKING_TIMEOUT)
        except httpx.HTTPError as err:
            raise ConfigError(f"tracking.uri: cannot reach the MLflow server at {uri} "
                              f"({type(err).__name__}: {str(err)[:120] or 'no answer'})") from None
    elif uri.startswith("sqlite:///"):
        import os
        from pathlib import Path

        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"tracking.uri: cannot create {folder} for {uri} "
                              f"({err.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"tracking.uri: {folder} is not writable ({uri})")


def hints(cfg: ExperimentConfig) -> list[str]:
    """Advice for a config that works but is slower than it needs to be (not errors)."""
    fed = cfg.federation
    out = []
    if fed.engine == "simulation" and fed.supernodes == 0 and fed.num_clients > POOL_HINT_CLIENTS:
        out.append(f"federation.num_clients={fed.num_clients} runs one simulated SuperNode per "
                   "client, and Flower's engine polls every node 10 times a second (1.5x slower "
                   "rounds at 10,000 clients than at 100); federation.supernodes=10 serves all clients from "
                   "10 SuperNodes (docs/benchmarks.md)")
    return out
