"""Checks that fail fast, before any engine starts, with one line naming what is wrong.

Starting a SuperLink and Ray takes seconds; a missing data file or an impossible
sequence length should not cost that, nor surface as a traceback from a Ray worker.
"""

from __future__ import annotations

from fedslm.config import ConfigError, ExperimentConfig
from fedslm.data import build_federated_texts
from fedslm.model import max_sequence_length
from fedslm.runtime import model_path


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
    from server.checkpoint import check_resumable, checkpoint_path, load_checkpoint

    ckpt = load_checkpoint(checkpoint_path(fed.resume_from))
    check_resumable(ckpt, cfg)
    return ckpt.round


def preflight(cfg: ExperimentConfig) -> str:
    """Validate data and model against the config; returns the resolved base model path."""
    texts = build_federated_texts(cfg.data, num_clients=cfg.federation.num_clients)
    if len(texts.clients) != cfg.federation.num_clients:
        raise ConfigError(f"federation.num_clients: data yields {len(texts.clients)} clients, "
                          f"expected {cfg.federation.num_clients}")
    path = model_path(cfg.model, cfg.data.seed)
    limit = max_sequence_length(path)
    if cfg.training.seq_len > limit:
        raise ConfigError(f"training.seq_len: {cfg.training.seq_len} exceeds the maximum "
                          f"sequence length {limit} of model {cfg.model.name_or_path}")
    return path
