"""Shared fixtures: a tiny Llama and its tokenizer, built in-test (no downloads, no fedslm.data).

The model is saved once per session; each test gets a fresh copy through the real
``load_base_model`` path, because ``build_peft_model`` injects LoRA layers in place.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedslm.config import PeftConfig
from fedslm.model import build_peft_model, load_base_model, train_tokenizer
from fedslm.rundir import CACHE_ENV
from fedslm.simulations.engine import STATE_ENV as ENGINE_STATE_ENV
from tests.proc_util import ENGINE_MARK_ENV

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per pytest-xdist worker: two workers with a thread per core each
    # oversubscribe the cores, and OpenMP's spinning threads then slow a step 100-fold.
    torch.set_num_threads(1)

TINY = dict(
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def synthetic_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic subject-verb-object sentences: enough structure to learn quickly."""
    rng = random.Random(seed)
    subjects = ["the farmer", "a doctor", "my neighbour", "the river", "an old engine", "the council"]
    verbs = ["repairs", "watches", "describes", "sells", "carries", "measures", "remembers"]
    objects = ["the bridge", "a small boat", "the red barn", "fresh bread", "the winter storm", "two letters"]
    places = ["in the morning", "near the harbour", "after the rain", "at the market", "every day"]
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(places)}."
        for _ in range(n)
    ]


# Engine tests that take longest (pytest --durations on this machine), started first so
# that pytest-xdist's workers do not end the run waiting on one of them.
SLOWEST_FIRST = (
    "test_deploy_e2e.py",
    "test_warm_engine_e2e.py",
    "test_search_e2e.py",
    "test_kill_e2e.py",
    "test_ledger_floor.py",
    "test_aggregation_e2e.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Engine (e2e) tests first, the slowest files first; unit tests after, in file order."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.get_closest_marker("e2e") is None:
            return (2, 0)
        name = item.path.name
        return (0, SLOWEST_FIRST.index(name)) if name in SLOWEST_FIRST else (1, 0)

    items[:] = sorted(items, key=rank)  # stable: file and parameter order kept within a rank


# Modules whose tests share one costly module-scoped fixture (a deployed federation): all
# their tests go to one xdist worker, so the fixture starts once rather than on each worker.
# (xdist's own ``--dist loadgroup`` marks do not group under pytest 9.2: xdist 3.8 renames
# ``item._nodeid``, which pytest 9.2 no longer reads.)
ONE_WORKER = ("test_deploy_e2e.py",)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """One test at a time, in collection order, except ``ONE_WORKER`` modules, each handed
    to one worker whole (xdist's loadscope scheduler, scoped by test except for those)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module.rsplit("/", 1)[-1] in ONE_WORKER else nodeid

    return OneWorkerModules(config, log)  # type: ignore[arg-type]


@pytest.fixture(scope="session", autouse=True)
def owned_cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Nothing a test runs writes to ~/.cache: runs, Hugging Face datasets and the builtin
    model live in this session's dir (every engine process a test starts inherits the
    variable).

    The builtin model itself is built in pytest's own cache dir (``.pytest_cache``, under
    the repository) and linked here: built once per clone rather than once per xdist worker
    and session (a build is ~200 CPU-seconds on a busy machine); its name carries the
    recipe's hash, and the build's file lock lets the workers share it.
    """
    root = tmp_path_factory.mktemp("fedslm-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
    from tests.proc_util import RUNS_ENV

    patch.setenv(RUNS_ENV, str(tmp_path_factory.mktemp("cli-runs")))  # not /tmp itself
    from tests.stores import TEMPLATE_ENV

    patch.setenv(TEMPLATE_ENV, str(root / "mlflow-template.db"))  # made at first use: tests/stores.py
    # One Ray worker per simulated run that starts its own Ray (federation.ray_cpus' default;
    # engine tests run on shared_engine instead): the two xdist workers already keep both cores
    # busy, so a second Ray worker only adds its start-up imports (~8 CPU-seconds a run).
    patch.setenv("FEDSLM_RAY_CPUS", "1")
    # the builtin model, built now rather than inside the first CLI subprocess that needs
    # it (whose timeout would then have to cover the build too)
    from fedslm.config import ModelConfig
    from fedslm.runtime import _model_path, model_path

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    patch.setenv(CACHE_ENV, str(cache.mkdir("fedslm-builtin-model") if cache is not None else root))
    built = Path(model_path(ModelConfig()))
    if built.parent != root:
        (root / built.name).symlink_to(built, target_is_directory=True)
    patch.setenv(CACHE_ENV, str(root))
    _model_path.cache_clear()  # in this process too, the model resolves under root
    yield root
    patch.undo()


class SharedEngine:
    """One local engine for the engine tests of this xdist worker, started with ``fedslm
    engine up --ray-cpus 1`` (one client trains at a time) as a user would, rather than a
    SuperLink, SuperExec and Ray by each run (~6 CPU-seconds and seconds of wall a run).
    ``start`` returns the environment that points ``federation.superlink`` at it; in-process
    runs take it from ``tests.proc_util.on_test_ray``.

    Its processes (the SuperLink, and each run's ServerApp and ClientApps) inherit this
    process's environment as it is when it starts, hence after ``owned_cache_dir`` (the
    builtin model's cache dir, HF datasets): a variable a test sets later reaches the
    run's launcher but not them."""

    def __init__(self, home: Path) -> None:
        self.state = home / "engine.json"
        self.env: dict[str, str] = {}

    def _engine(self, command: str) -> None:
        cmd = [sys.executable, "-m", "fedslm.simulations.engine", command, "--state", str(self.state),
               "--ray-cpus", "1"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"fedslm engine {command}: {out.stdout}{out.stderr}"

    def start(self) -> dict[str, str]:
        if not self.env:
            self._engine("up")
            state = json.loads(self.state.read_text())
            self.env = {
                "FEDSLM_SUPERLINK": state["superlink"],
                ENGINE_MARK_ENV: state["mark"],
                ENGINE_STATE_ENV: str(self.state),
                "FEDSLM_RAY_CPUS": "0",  # a running engine's Ray size is its own
            }
        return self.env

    def stop(self) -> None:
        if self.env:
            self.env = {}
            self._engine("down")


@pytest.fixture(scope="session")
def shared_engine(owned_cache_dir: Path) -> Iterator[SharedEngine]:
    engine = SharedEngine(Path(tempfile.mkdtemp(prefix="fedslm-test-engine-", dir=owned_cache_dir)))
    yield engine
    engine.stop()


@pytest.fixture(autouse=True)
def engine_tests_share_one_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine (e2e) test's CLI runs default to the worker's ``SharedEngine``
    (through ``FEDSLM_SUPERLINK``, the Hydra default of ``federation.superlink``); a test
    that checks a run's own SuperLink or Ray passes ``federation.superlink=``. The engine
    starts at the first engine test and stops at the first unit test after it (engine tests
    run first: ``pytest_collection_modifyitems``), so an idle engine (~2.4 CPU-seconds a
    minute) never runs beside the unit tests, and the ``-m "not e2e"`` lane starts none."""
    engine = request.getfixturevalue("shared_engine")
    if request.node.get_closest_marker("e2e") is None:
        engine.stop()
        return
    for key, value in engine.start().items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return synthetic_sentences()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, sentences: list[str]) -> Path:
    """A randomly initialised 2-layer Llama + BPE tokenizer, saved with save_pretrained."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(sentences, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture
def tiny_base(tiny_model_dir: Path):
    """Fresh frozen (model, tokenizer) per test."""
    return load_base_model(str(tiny_model_dir), dtype="float32")


@pytest.fixture
def make_peft(tiny_model_dir: Path) -> Callable[..., object]:
    """Factory: a fresh LoRA-wrapped tiny model; same ``seed`` -> same LoRA init."""

    def make(seed: int = 0, **peft_kwargs):
        base, _ = load_base_model(str(tiny_model_dir), dtype="float32")
        torch.manual_seed(seed)
        return build_peft_model(base, PeftConfig(**{"dropout": 0.0, **peft_kwargs}))

    return make
