"""The real ClientApp, called as Flower calls it: only adapter tensors and numbers leave."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.serde import message_to_proto

from fedslm.client.app import app
from fedslm.adapters import from_array_record, parameter_role, to_array_record
from fedslm.config import ExperimentConfig
from fedslm.runconfig import PROJECT_ROOT, to_run_config
from fedslm.runtime import client_split
from fedslm.server.experiment import initial_adapter
from tests import fakes

NUM_CLIENTS = 3


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "federation": {"num_clients": NUM_CLIENTS},
        "training": {"local_steps": 3},
        "data": {"docs_per_client": 16},
        "output_dir": str(tmp_path_factory.mktemp("run")),
    })


def _message(kind: str, arrays: ArrayRecord, server_round: int = 1) -> Message:
    return fakes.instruction(11, fakes.round_content(arrays, server_round), kind=kind)


def _context(cfg: ExperimentConfig, partition: int) -> Context:
    return Context(run_id=1, node_id=11, node_config={"partition-id": partition,
                   "num-partitions": NUM_CLIENTS}, state=RecordDict(), run_config=to_run_config(cfg))


def test_train_reply_carries_only_changed_adapter_tensors_and_no_text(cfg: ExperimentConfig) -> None:
    sent = initial_adapter(cfg)
    reply = app(_message("train", to_array_record(sent)), _context(cfg, partition=1))

    content = reply.content
    assert set(content.array_records) == {"arrays"}
    assert set(content.metric_records) == {"metrics"}
    assert not content.config_records  # no strings at all travel back
    received = from_array_record(content.array_records["arrays"])
    assert set(received) == set(sent)
    assert all(parameter_role(name) == "shared" for name in received)
    assert all(".lora_A." in n or ".lora_B." in n for n in received)
    assert {n: v.shape for n, v in received.items()} == {n: v.shape for n, v in sent.items()}
    assert any(not np.array_equal(received[n], sent[n]) for n in sent if "lora_B" in n)

    metrics = content.metric_records["metrics"]
    train_texts = client_split(cfg.data, num_clients=NUM_CLIENTS, partition_id=1).train
    assert metrics["num-examples"] > 0 and metrics["steps"] == 3 and metrics["partition-id"] == 1
    # The serialized reply contains none of the client's text.
    wire = message_to_proto(reply).SerializeToString()
    for text in train_texts:
        for snippet in (text[:24], text[len(text) // 2: len(text) // 2 + 24]):
            assert snippet.encode() not in wire


def test_evaluate_reply_is_metrics_only(cfg: ExperimentConfig) -> None:
    reply = app(_message("evaluate", to_array_record(initial_adapter(cfg))), _context(cfg, partition=0))
    assert not reply.content.array_records and not reply.content.config_records
    metrics = reply.content.metric_records["metrics"]
    assert set(metrics) == {"loss", "perplexity", "accuracy", "num-examples", "num-tokens", "partition-id"}
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-12)
    assert 0.0 <= metrics["accuracy"] <= 1.0


BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "peft"}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import %s
print("loaded")
"""


@pytest.mark.parametrize("module", ["fedslm.client.app", "fedslm.server.app"])
def test_an_app_loads_without_torch(module: str) -> None:
    """Flower loads both apps under one lock before its simulation engine starts Ray, so
    loading them must not wait for torch (fedslm.client.app and fedslm.server.app say why)."""
    out = subprocess.run([sys.executable, "-c", BLOCK_HEAVY % module], cwd=PROJECT_ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr[-500:]


@pytest.mark.parametrize(("argv0", "imports"), [("/venv/bin/flwr-simulation", False), ("default_worker.py", True)])
def test_handlers_are_imported_ahead_except_in_the_simulation_process(argv0: str, imports: bool) -> None:
    # Flower's simulation process loads the ClientApp only to check it; a Ray worker (or a
    # SuperNode's flwr-clientapp) starts importing the handlers as soon as it loads the app
    code = ("import sys, threading; sys.argv[0] = sys.argv[1]; import fedslm.client.app; "
            "print('import-handlers' in [t.name for t in threading.enumerate()])")
    out = subprocess.run([sys.executable, "-c", code, argv0], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == str(imports)
