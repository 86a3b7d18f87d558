"""Flower ClientApp: thin handlers over ``fedslm.client.handlers``, which unpacks the message,
calls the plain task functions (``fedslm.client.task``) and packs the reply.

This module is light on purpose (Flower, the config schema; not torch, transformers or
PEFT): Flower loads the ServerApp and the ClientApp under one import lock, and its
simulation engine starts Ray only once both are loaded. ``fedslm.client.handlers``, and torch
with it, is imported in a background thread as soon as this module is loaded, so a Ray
worker imports while the ServerApp sets up, and the first message waits only for what
is left of that import (see ``fedslm.server.app`` too); not in Flower's simulation process,
which loads this module only to check it, nor in a SuperNode's ``flwr-clientapp``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import threading

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod

from fedslm.client.failures import failure_report_mod
from fedslm.config import ExperimentConfig
from fedslm.quiet import quiet_process
from fedslm.runconfig import from_run_config
from fedslm.warm_imports import import_heavy

HANDLERS = "fedslm.client.handlers"
# Flower's simulation process loads this module only to check it (its clients run in the
# Ray workers): importing the handlers there would hold the ServerApp's own heavy import
# (one lock, ``fedslm.warm_imports``) and take CPU from the workers while each run starts.
# A SuperNode's ``flwr-clientapp`` serves one message, already pulled when this loads:
# nothing to overlap, and a SecAgg+ key or share stage needs no torch at all.
if os.path.basename(sys.argv[0]) not in ("flwr-simulation", "flwr-clientapp"):
    threading.Thread(target=import_heavy, args=(HANDLERS,), name="import-handlers",
                     daemon=True).start()

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    cfg = from_run_config(dict(items))
    quiet_process(cfg.verbose)  # once per config and worker, before any model loads
    return cfg


def experiment(context: Context) -> ExperimentConfig:
    """The run's config; a device agent's ``--device`` (node config) overrides
    ``training.device`` on that node."""
    cfg = _config(tuple(sorted(context.run_config.items())))
    device = str(context.node_config.get("device", "") or "")
    if device and device != cfg.training.device:
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, device=device))
    return cfg


def user_level_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """dp_fedavg with ``privacy.clip_side=client``: Flower's ``adaptiveclipping_mod``
    clips the update before it leaves (to the norm the server sent) and reports whether
    it clipped; the server adapts the norm or keeps it fixed. Otherwise a no-op."""
    privacy = experiment(context).privacy
    if privacy.user_level and privacy.clip_side == "client":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[failure_report_mod, user_level_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    from fedslm.client import handlers  # torch and the rest: on the first message (see above)

    return handlers.train_reply(experiment(context), msg, context)


@app.evaluate(mods=[failure_report_mod])
def evaluate(msg: Message, context: Context) -> Message:
    from fedslm.client import handlers

    return handlers.evaluate_reply(experiment(context), msg, context)


def _secagg(msg: Message, context: Context) -> Message:
    from fedslm.client import secagg_handler  # torch and the rest, like the handlers above

    return secagg_handler.stage_reply(experiment(context), msg, context)


# SecAgg+ stages (fedslm.server.secagg_round): one Message-API round trip each, "train.secagg_<stage>"
for _stage in ("keys", "shares", "masked", "unmask"):
    app.train(f"secagg_{_stage}")(_secagg)
