"""Flower ClientApp: thin handlers over ``fedslm.client.handlers``, which unpacks the message,
calls the plain task functions (``fedslm.client.task``) and packs the reply.

This module is light on purpose (Flower, the config schema; not torch, transformers or
PEFT): Flower loads the ServerApp and the ClientApp under one import lock, and its
simulation engine starts Ray only once both are loaded. ``fedslm.client.handlers``, and torch
with it, is imported in a background thread as soon as this module is loaded, so a Ray
worker imports while the ServerApp sets up, and the first message waits only for what
is left of that import (see ``fedslm.server.app`` too).
"""

from __future__ import annotations

import functools
import threading

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod

from fedslm.config import ExperimentConfig
from fedslm.quiet import quiet_process
from fedslm.runconfig import from_run_config
from fedslm.warm_imports import import_heavy

HANDLERS = "fedslm.client.handlers"
threading.Thread(target=import_heavy, args=(HANDLERS,), name="import-handlers",
                 daemon=True).start()

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _config(items: tuple) -> ExperimentConfig:
    cfg = from_run_config(dict(items))
    quiet_process(cfg.verbose)  # once per config and worker, before any model loads
    return cfg


def experiment(context: Context) -> ExperimentConfig:
    return _config(tuple(sorted(context.run_config.items())))


def user_level_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """dp_fedavg with ``privacy.clip_side=client``: Flower's ``adaptiveclipping_mod``
    clips the update before it leaves (to the norm the server sent) and reports whether
    it clipped; the server adapts the norm or keeps it fixed. Otherwise a no-op."""
    privacy = experiment(context).privacy
    if privacy.mode == "dp_fedavg" and privacy.clip_side == "client":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[user_level_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    from fedslm.client import handlers  # torch and the rest: on the first message (see above)

    return handlers.train_reply(experiment(context), msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedslm.client import handlers

    return handlers.evaluate_reply(experiment(context), msg, context)
