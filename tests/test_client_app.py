"""The real ClientApp, called as Flower calls it: only adapter tensors and numbers leave."""

from __future__ import annotations

import json
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
"""


@pytest.mark.parametrize("module", ["fedslm.client.app", "fedslm.server.app"])
def test_an_app_loads_without_torch(module: str) -> None:
    """Flower loads both apps under one lock before its simulation engine starts Ray, so
    loading them must not wait for torch (fedslm.client.app and fedslm.server.app say why)."""
    code = f"{BLOCK_HEAVY}import {module}\nprint('loaded')"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr[-500:]


@pytest.mark.parametrize(("argv0", "imports"), [("/venv/bin/flwr-simulation", False), ("default_worker.py", True),
                                               ("/venv/bin/flwr-clientapp", False)])
def test_handlers_are_imported_ahead_only_in_a_ray_worker(argv0: str, imports: bool) -> None:
    # Flower's simulation process loads the ClientApp only to check it; a SuperNode's
    # flwr-clientapp serves one message, already pulled; a Ray worker serves many and
    # starts importing the handlers as soon as it loads the app
    code = ("import sys, threading; sys.argv[0] = sys.argv[1]; import fedslm.client.app; "
            "print('import-handlers' in [t.name for t in threading.enumerate()])")
    out = subprocess.run([sys.executable, "-c", code, argv0], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == str(imports)


SECAGG_STAGES = """
import json, sys
sys.argv[0] = "/venv/bin/flwr-clientapp"  # as a SuperNode starts it
from flwr.app import ConfigRecord, Context, RecordDict
from fedslm.client.app import app
from fedslm.config import ExperimentConfig
from fedslm.runconfig import to_run_config
from fedslm.secagg import protocol as P
from tests import fakes

cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3}, "output_dir": sys.argv[1],
                                  "secure_aggregation": {"method": "secaggplus", "weighting": "equal"}})
nodes = [1, 2, 3]
def stage(node, name, **fields):
    content = RecordDict({P.RECORD: ConfigRecord({P.STAGE: name, P.ROUND: 1, P.SELF_ID: node, **fields})})
    context = Context(run_id=5, node_id=node, node_config={"partition-id": node - 1, "num-partitions": 3},
                      state=RecordDict(), run_config=to_run_config(cfg))
    reply = app(fakes.instruction(node, content, kind=P.MESSAGE_TYPES[name]), context)
    assert not reply.has_error(), reply.error
    return reply.content[P.RECORD]
keys = {n: stage(n, "keys") for n in nodes}
out = {}
for n in nodes:
    peers = [p for p in nodes if p != n]
    shares = stage(n, "shares", **{P.PEERS: peers, P.PK_ENC: [keys[p][P.PK_ENC] for p in peers],
                                   P.PK_MASK: [keys[p][P.PK_MASK] for p in peers],
                                   P.THRESHOLD: 2, P.NUM_SAMPLED: 3})
    out[n] = list(shares[P.DESTINATIONS])
print(json.dumps({"destinations": out, "heavy": sorted(m for m in ("torch", "transformers", "peft")
                                                      if m in sys.modules)}))
"""


def test_secagg_key_and_share_stages_run_without_torch(tmp_path) -> None:
    """A device's flwr-clientapp runs one SecAgg+ stage per process: only the stage that
    trains may pay for torch, transformers and PEFT (fedslm.client.secagg_handler)."""
    out = subprocess.run([sys.executable, "-c", BLOCK_HEAVY + SECAGG_STAGES, str(tmp_path)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Error" not in out.stderr, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"destinations": {"1": [2, 3], "2": [1, 3], "3": [1, 2]}, "heavy": []}
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["0", "1", "2"]
    assert all((tmp_path / "clients" / str(i) / "secagg_5.json").stat().st_mode & 0o777 == 0o600
               for i in range(3))
