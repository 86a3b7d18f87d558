"""The experiment schema: typed, documented dataclasses that reject bad values by key.

Every way into an experiment (Hydra in ``fedslm.simulations.run``, Flower's flat run config
in the ServerApp/ClientApp, tests) ends in ``ExperimentConfig.from_dict``, so a value
is checked once, where it enters, and the error names the dotted key that is wrong.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted key."""


def _fail(key: str, problem: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {problem}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(key, f"unknown value {value!r}; expected one of {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        _fail(key, f"must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        _fail(key, f"must be >= 0, got {value}")


def _fraction(key: str, value: float) -> None:
    if not 0 < value <= 1:
        _fail(key, f"must be in (0, 1], got {value}")


BUILTIN_MODEL = "builtin:tiny-llama"
SHAPE_PREFIX = "builtin:shape:"
BUILTIN_SHAPES = ("smollm2-135m", "qwen2.5-0.5b")  # fedslm.model.SHAPE_CONFIGS
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass
class ModelConfig:
    """The frozen base model.

    ``name_or_path`` is a Hugging Face hub name, a local directory written by
    ``save_pretrained``, ``builtin:tiny-llama``: a 2-layer Llama the project trains
    once from the synthetic corpus and caches under ``cache_dir``, or
    ``builtin:shape:<name>`` (``BUILTIN_SHAPES``): a randomly initialised model with a
    real SLM's shape, for measuring cost only (its outputs mean nothing).
    ``dtype`` is how the base weights are stored (``bfloat16`` halves their memory;
    LoRA weights stay float32). ``quantization`` ``8bit``/``4bit`` loads the base
    quantized with bitsandbytes (QLoRA; CUDA only).
    """

    name_or_path: str = BUILTIN_MODEL
    dtype: str = "float32"
    cache_dir: str = ""  # "" -> ~/.cache/fedslm ($FEDSLM_CACHE_DIR if set)
    quantization: str = "none"

    def check(self, at: str) -> None:
        if not self.name_or_path.strip():
            _fail(f"{at}.name_or_path", "must not be empty")
        _one_of(f"{at}.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        _one_of(f"{at}.quantization", self.quantization, QUANTIZATIONS)
        if self.name_or_path.startswith(SHAPE_PREFIX):
            _one_of(f"{at}.name_or_path", self.name_or_path,
                    tuple(SHAPE_PREFIX + name for name in BUILTIN_SHAPES))


@dataclass
class DataConfig:
    """Where client texts come from and how they are split across clients.

    ``synthetic`` is the built-in corpus (one topic/phrasing mix per client, tuned by
    ``heterogeneity``); ``text_files`` reads txt/jsonl/csv/parquet under ``path``;
    ``hf`` loads a Hugging Face dataset by ``hf_name``; ``shakespeare`` reads
    tinyshakespeare.txt at ``path`` and gives each speaker with at least ``min_lines``
    lines its own client (LEAF-style). Files: .txt (paragraphs), .jsonl, .json (an array
    of objects), .csv, .tsv, .parquet.

    Columns per task: ``text_key`` (causal_lm, classify), ``label_key`` and optional
    ``label_names`` (classify: labels are names or indices into them; empty = the
    distinct values, sorted), ``instruction_key``/``input_key``/``output_key`` or
    ``messages_key`` (instruct: Alpaca-style rows or chat messages).
    ``partition_key`` ("" with classify + dirichlet = ``label_key``: label skew;
    ``source_file`` = one client per file of a directory).
    """

    source: str = "synthetic"
    path: str = ""
    hf_name: str = ""
    hf_config: str = ""
    hf_split: str = "train"
    text_key: str = "text"
    label_key: str = "label"
    label_names: list[str] = field(default_factory=list)
    instruction_key: str = "instruction"
    input_key: str = "input"
    output_key: str = "output"
    messages_key: str = "messages"
    partitioner: str = "iid"
    partition_key: str = ""
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    min_lines: int = 64
    heterogeneity: float = 0.9
    docs_per_client: int = 48
    num_topics: int = 8
    seed: int = 0

    def check(self, at: str) -> None:
        _one_of(f"{at}.source", self.source, ("synthetic", "text_files", "hf", "shakespeare"))
        _one_of(f"{at}.partitioner", self.partitioner, ("iid", "dirichlet", "natural"))
        if self.source in ("text_files", "shakespeare") and not self.path:
            _fail(f"{at}.path", f"is required for data.source={self.source}")
        if self.source == "hf" and not self.hf_name:
            _fail(f"{at}.hf_name", "is required for data.source=hf")
        if self.partitioner == "natural" and self.source in ("text_files", "hf"):
            if not self.partition_key:
                _fail(f"{at}.partition_key", "is required for data.partitioner=natural "
                      "(source_file: one client per file)")
        _positive(f"{at}.dirichlet_alpha", self.dirichlet_alpha)
        if not 0 < self.test_fraction < 1:
            _fail(f"{at}.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.min_lines < 1:
            _fail(f"{at}.min_lines", f"must be >= 1, got {self.min_lines}")
        if not 0 <= self.heterogeneity <= 1:
            _fail(f"{at}.heterogeneity", f"must be in [0, 1], got {self.heterogeneity}")
        if self.docs_per_client < 4:
            _fail(f"{at}.docs_per_client", f"must be >= 4, got {self.docs_per_client}")
        if not 1 <= self.num_topics <= 16:
            _fail(f"{at}.num_topics", f"must be in 1..16 (the synthetic corpus has 16 topics), got {self.num_topics}")


@dataclass
class PeftConfig:
    """LoRA adapter: rank ``r``, scale ``alpha / r``, on ``target_modules``.

    ``target_modules`` ``auto`` (or empty) takes PEFT's own per-architecture defaults
    (Llama/Qwen: ``q_proj, v_proj``; GPT-2: ``c_attn``); ``all-linear`` every linear layer.
    ``ranks`` gives clients their own ranks (<= ``r``, the global and model rank):
    ``"30% r=4, 50% r=8, 20% r=16"``, by partition id ``"0-2 r=4, * r=8"`` or by the
    device tier in the node config ``"tier=small r=4, * r=8"``;
    "" = everyone at ``r`` (``fedslm.aggregation.ranks``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    bias: str = "none"
    ranks: str = ""

    def check(self, at: str) -> None:
        if self.r <= 0:
            _fail(f"{at}.r", f"must be > 0, got {self.r}")
        _positive(f"{at}.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            _fail(f"{at}.dropout", f"must be in [0, 1), got {self.dropout}")
        if len(self.target_modules) > 1 and {"auto", "all-linear"} & set(self.target_modules):
            _fail(f"{at}.target_modules", "auto and all-linear stand alone, not in a list")
        _one_of(f"{at}.bias", self.bias, ("none", "lora_only", "all"))
        from fedslm.aggregation.ranks import RankSpecError, parse_ranks

        try:
            spec = parse_ranks(self.ranks)
        except RankSpecError as err:
            _fail(f"{at}.ranks", str(err))
        if spec.ranks and max(spec.ranks) > self.r:
            _fail(f"{at}.ranks", f"rank {max(spec.ranks)} exceeds {at}.r={self.r} (the global rank)")


STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
              "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fltrust")
# Byzantine-robust rules (Flower's own, and FLTrust, fedslm.server.fltrust): each
# replaces the weighted mean by an order statistic, a selection or a trust-weighted
# mean, so neither DP-FedAvg's noise calibration nor an empty (local_only) update means
# anything to them.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fltrust")


@dataclass
class StrategyConfig:
    """Flower strategy and its server-side hyper-parameters.

    ``proximal_mu`` is sent to clients by FedProx; ``server_learning_rate`` and
    ``server_momentum`` drive FedAvgM; ``eta``, ``beta_1``, ``beta_2``, ``tau`` drive the
    adaptive FedOpt family (FedAdam, FedYogi, FedAdagrad). The robust rules:
    ``fedmedian`` (coordinate-wise median), ``fedtrimmedavg`` (mean after cutting
    ``trim_beta`` of the values at each end), ``krum``/``multikrum``/``bulyan`` (tolerate
    ``num_malicious`` hostile clients per round; multikrum averages ``num_selected``
    updates, 0 = the sampled clients minus ``num_malicious``; bulyan needs at least
    4 * num_malicious + 3 sampled clients).
    ``fltrust`` (Cao et al. 2021, ``fedslm.server.fltrust``) trusts each update by its
    direction against the server's own update, trained each round on clean root records:
    ``root_data``, a file in the task's format (as ``data.source=text_files`` reads one),
    or, when "", ``root_docs`` synthetic records drawn like the central split but
    disjoint from it and from every client (``data.source=synthetic`` only).
    ``fraction_evaluate=0`` turns federated evaluation off, as in Flower: no client is
    sent an evaluate message; the server's own evaluation (``training.central_eval``)
    still runs.
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    proximal_mu: float = 0.0
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    eta: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 0.001
    trim_beta: float = 0.2
    num_malicious: int = 0
    num_selected: int = 0
    root_docs: int = 32
    root_data: str = ""

    def check(self, at: str) -> None:
        _one_of(f"{at}.name", self.name, STRATEGIES)
        _non_negative(f"{at}.root_docs", self.root_docs)
        if self.root_data and self.name != "fltrust":
            _fail(f"{at}.root_data", f"is only used by fltrust, not {self.name}")
        if not 0 <= self.trim_beta < 0.5:
            _fail(f"{at}.trim_beta", f"must be in [0, 0.5), got {self.trim_beta}")
        if self.num_malicious < 0:
            _fail(f"{at}.num_malicious", f"must be >= 0, got {self.num_malicious}")
        if self.num_selected < 0:
            _fail(f"{at}.num_selected", f"must be >= 0, got {self.num_selected}")
        _fraction(f"{at}.fraction_train", self.fraction_train)
        if not 0 <= self.fraction_evaluate <= 1:
            _fail(f"{at}.fraction_evaluate", f"must be in [0, 1] (0: no federated evaluation), "
                  f"got {self.fraction_evaluate}")
        if self.min_train_clients < 1:
            _fail(f"{at}.min_train_clients", f"must be >= 1, got {self.min_train_clients}")
        if self.min_evaluate_clients < 1:
            _fail(f"{at}.min_evaluate_clients", f"must be >= 1, got {self.min_evaluate_clients}")
        _non_negative(f"{at}.proximal_mu", self.proximal_mu)
        _positive(f"{at}.server_learning_rate", self.server_learning_rate)
        if not 0 <= self.server_momentum < 1:
            _fail(f"{at}.server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        _positive(f"{at}.eta", self.eta)
        for name in ("beta_1", "beta_2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"{at}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        _positive(f"{at}.tau", self.tau)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (``127.0.0.0/8``, ``::1``); a name that
    could resolve elsewhere, or a wildcard such as 0.0.0.0, is not."""
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class FederationConfig:
    """Who takes part and on which engine.

    ``simulation`` starts Flower's simulation engine (a private SuperLink with virtual
    SuperNodes on Ray); ``remote`` submits the same apps to a running SuperLink at
    ``address`` over TLS, trusting the CA certificate ``root_certificates`` (``insecure``
    only for a local SuperLink started with ``--insecure``). ``resume_from`` names the
    output dir of an interrupted run: the run continues from its last round checkpoint,
    in the same MLflow run (see server/checkpoint.py). ``supernodes`` 0 simulates one
    SuperNode per client; k > 0 runs k SuperNodes that serve all ``num_clients`` clients,
    the server sending each sampled client's partition id with its message
    (``fedslm.server.population``): for large populations, where Flower's per-node polling
    makes every round slower.
    ``initial_evaluation`` evaluates the initial adapter on the clients first (round 0):
    the curves' starting point, at the cost of one more message per client, which real
    devices may want to save.
    ``i_know_this_is_insecure`` lets ``insecure`` reach a SuperLink that is not on this
    machine (anything but a loopback address): the run's config, the global adapter and
    every update then cross the network in clear text, to whoever answers at ``address``.
    ``ray_cpus`` caps the cores Ray may hand to virtual clients (Flower's
    ``init-args-num-cpus``; 0: all of this machine's), hence the clients that train at once:
    ``ray_cpus // client_num_cpus``. Fewer parallel clients start fewer Ray workers, each of
    which imports torch, transformers and the app (several CPU-seconds): on a machine that
    is already busy (a test suite, other jobs) one worker finishes a small run sooner.
    ``ray_address`` (``host:port``) runs the virtual clients on a Ray that is already
    running (``ray start --head`` here, or a cluster's head) instead of a Ray per run: no
    start-up cost per run, and clients on every node of that cluster. Its size was fixed
    when it started, so ``ray_cpus`` must stay 0; its workers inherit the environment of
    whoever started it (docs/deployment.md#running-on-a-ray-that-is-already-running).
    ``superlink`` (``127.0.0.1:PORT``) submits the run to a local engine that is already
    running (``fedslm engine up``: a simulation SuperLink and its Ray) instead of starting a
    SuperLink and a Ray for this run; the engine's Ray and its size were chosen when it
    started, so ``ray_address`` stays empty and ``ray_cpus`` 0.
    """

    num_clients: int = 10
    num_rounds: int = 5
    engine: str = "simulation"
    address: str = ""
    root_certificates: str = ""
    insecure: bool = False
    round_timeout: float = 600.0
    client_num_cpus: int = 1
    client_num_gpus: float = 0.0
    resume_from: str = ""
    supernodes: int = 0
    initial_evaluation: bool = True
    i_know_this_is_insecure: bool = False
    ray_cpus: int = 0
    ray_address: str = ""
    superlink: str = ""

    def check(self, at: str) -> None:
        if self.supernodes < 0:
            _fail(f"{at}.supernodes", f"must be >= 0, got {self.supernodes}")
        if self.supernodes > 0 and self.engine != "simulation":
            _fail(f"{at}.supernodes", "only applies to federation.engine=simulation")
        if self.num_clients < 1:
            _fail(f"{at}.num_clients", f"must be >= 1, got {self.num_clients}")
        if self.num_rounds < 1:
            _fail(f"{at}.num_rounds", f"must be >= 1, got {self.num_rounds}")
        _one_of(f"{at}.engine", self.engine, ("simulation", "remote"))
        if self.engine == "remote" and not self.address:
            _fail(f"{at}.address", "is required for federation.engine=remote")
        if self.engine == "remote" and not (self.root_certificates or self.insecure):
            _fail(f"{at}.root_certificates", "is required for federation.engine=remote "
                  "(TLS is on by default; federation.insecure=true only for a local test SuperLink)")
        if self.root_certificates and self.insecure:
            _fail(f"{at}.insecure", "contradicts federation.root_certificates; set only one")
        if (self.engine == "remote" and self.insecure and not self.i_know_this_is_insecure
                and not is_loopback(self.address.rsplit(":", 1)[0])):
            _fail(f"{at}.insecure", f"refusing to send a run without TLS to {self.address}, "
                  "which is not this machine; use federation.root_certificates (or set "
                  f"{at}.i_know_this_is_insecure=true)")
        _positive(f"{at}.round_timeout", self.round_timeout)
        if self.client_num_cpus < 1:
            _fail(f"{at}.client_num_cpus", f"must be >= 1, got {self.client_num_cpus}")
        if self.ray_cpus < 0:
            _fail(f"{at}.ray_cpus", f"must be >= 0 (0: every core), got {self.ray_cpus}")
        if self.ray_cpus and self.engine != "simulation":
            _fail(f"{at}.ray_cpus", "only applies to federation.engine=simulation")
        if 0 < self.ray_cpus < self.client_num_cpus:
            _fail(f"{at}.ray_cpus", f"{self.ray_cpus} is fewer than {at}.client_num_cpus="
                  f"{self.client_num_cpus}: Ray could not start a single client")
        if self.ray_address:
            self._check_ray_address(at)
        if self.superlink:
            self._check_superlink(at)
        _non_negative(f"{at}.client_num_gpus", self.client_num_gpus)

    def _check_superlink(self, at: str) -> None:
        if self.engine != "simulation":
            _fail(f"{at}.superlink", "only applies to federation.engine=simulation (a deployment's "
                  f"SuperLink is {at}.address)")
        host, _, port = self.superlink.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536 or not is_loopback(host.strip("[]")):
            _fail(f"{at}.superlink", f"expected 127.0.0.1:PORT of a local engine (`fedslm engine up` "
                  f"prints it), got {self.superlink!r}")
        if self.ray_address:
            _fail(f"{at}.ray_address", f"cannot be set with {at}.superlink={self.superlink}: that "
                  "engine's Ray was chosen when it started (`fedslm engine up`)")
        if self.ray_cpus:
            _fail(f"{at}.ray_cpus", f"must be 0 with {at}.superlink={self.superlink}: that engine's "
                  "Ray size was fixed when it started (`fedslm engine up --ray-cpus`)")

    def _check_ray_address(self, at: str) -> None:
        if self.engine != "simulation":
            _fail(f"{at}.ray_address", "only applies to federation.engine=simulation")
        host, _, port = self.ray_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in self.ray_address:
            _fail(f"{at}.ray_address", f"expected host:port of a running Ray's head (its GCS, "
                  f"`ray start --head` prints it), got {self.ray_address!r}")
        if self.ray_cpus:
            _fail(f"{at}.ray_cpus", f"must be 0 with {at}.ray_address={self.ray_address}: a running "
                  "Ray's CPUs were fixed when it started (ray start --num-cpus)")


@dataclass
class TrainingConfig:
    """Local training on each client and evaluation settings.

    ``local_steps`` > 0 fixes the optimizer steps per round; 0 trains ``local_epochs``
    passes over the client's train split instead. Learning rate warms up linearly over
    ``warmup_ratio`` of the steps, then decays linearly to zero.

    ``device`` ``auto`` is cuda when this machine has it, else cpu (``fedslm.device``);
    a device agent's ``--device`` overrides it for that device. ``precision`` ``bf16``
    or ``fp16`` runs forward and loss under ``torch.autocast`` (fp16 with a gradient
    scaler; LoRA weights and the optimizer stay float32). ``gradient_checkpointing``
    recomputes activations in the backward pass: less memory, more time.
    """

    learning_rate: float = 0.01
    local_steps: int = 20
    local_epochs: int = 1
    batch_size: int = 8
    seq_len: int = 64
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 42
    eval_max_batches: int = 0
    central_eval: bool = True
    device: str = "auto"
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def check(self, at: str) -> None:
        _one_of(f"{at}.device", self.device, DEVICES)
        _one_of(f"{at}.precision", self.precision, PRECISIONS)
        _positive(f"{at}.learning_rate", self.learning_rate)
        if self.local_steps < 0:
            _fail(f"{at}.local_steps", f"must be >= 0, got {self.local_steps}")
        if self.local_steps == 0 and self.local_epochs < 1:
            _fail(f"{at}.local_epochs", "must be >= 1 when training.local_steps=0")
        if self.batch_size < 1:
            _fail(f"{at}.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.seq_len < 2:
            _fail(f"{at}.seq_len", f"must be >= 2, got {self.seq_len}")
        if not 0 <= self.warmup_ratio < 1:
            _fail(f"{at}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _non_negative(f"{at}.max_grad_norm", self.max_grad_norm)
        _non_negative(f"{at}.weight_decay", self.weight_decay)
        _non_negative(f"{at}.eval_max_batches", self.eval_max_batches)


PRIVACY_MODES = ("none", "dp_sgd", "dp_fedavg", "dp_sgd+dp_fedavg")
# Strategies whose aggregate is the plain mean of client updates, so noise added to it
# has sensitivity clipping_norm / m. The others post-process the mean (momentum, Adam)
# *before* Flower's DP wrapper adds noise, where that sensitivity no longer holds.
DP_FEDAVG_STRATEGIES = ("fedavg", "fedprox")


@dataclass
class PrivacyConfig:
    """Differential privacy: per record on each client, or per client on the server.

    ``dp_sgd``: every client trains with Opacus DP-SGD (Poisson sampling, per-example
    clipping to ``max_grad_norm``, Gaussian noise ``noise_multiplier``); its ledger of
    (noise, sample rate, steps) lives on its disk and ``accountant`` (``prv`` or ``rdp``)
    turns it into a cumulative epsilon at ``delta`` (0 = 1/(10 n), n its records).
    ``target_epsilon`` > 0 calibrates the noise so each round alone spends that much.
    ``grad_sample_mode`` ``ghost`` clips without materialising per-example gradients.
    ``dp_fedavg``: the server clips each client's whole update to ``clipping_norm``
    (``clip_side`` server, or client via Flower's clipping mod), averages with equal
    weights and adds Gaussian noise; ``clipping`` ``adaptive`` tracks the
    ``target_quantile`` of update norms (Andrew et al.) with a noised count of stddev
    ``clipped_count_stddev`` (0 = sampled clients / 20). Accounted with ``rdp`` (dp-accounting),
    with amplification by client sampling. ``max_epsilon`` > 0 is a hard budget: a client
    (dp_sgd) or the server (dp_fedavg) stops before a round that would exceed it.
    ``dp_sgd+dp_fedavg``: both at once, each with its own ledger: clients run DP-SGD
    (``noise_multiplier``, ``max_grad_norm``, ``accountant``) and the server DP-FedAvg
    (``user_noise_multiplier``, ``clipping_norm``, always ``rdp``); ``max_epsilon`` caps
    both (a client refuses, the server stops the run). docs/privacy.md says what each
    epsilon covers.
    ``unit`` (DP-SGD, causal_lm): ``block`` (default) a record is a packed block of
    ``training.seq_len`` tokens; ``document`` one document per record, truncated to
    ``seq_len`` (per-document sampling and clipping; docs/privacy.md says why block is
    the default).
    ``audit`` plants the canaries of ``audit.*`` in the chosen clients' training texts and,
    at the end of the run, measures what the final global adapter leaks (canary
    exposure, membership inference, the epsilon lower bound they imply; docs/privacy.md).
    """

    mode: str = "none"
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 0.0
    accountant: str = ""  # "" = prv for dp_sgd, rdp for dp_fedavg
    grad_sample_mode: str = "hooks"
    target_epsilon: float = 0.0
    max_epsilon: float = 0.0
    clipping: str = "fixed"
    clip_side: str = "server"
    clipping_norm: float = 0.1
    target_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = 0.0
    user_noise_multiplier: float = 1.0  # dp_sgd+dp_fedavg: the server's (DP-FedAvg) noise
    unit: str = "block"  # DP-SGD's record for causal_lm: a packed block, or one document
    audit: bool = False

    @property
    def sample_level(self) -> bool:
        """Clients run DP-SGD (each record protected; a ledger on each client)."""
        return self.mode in ("dp_sgd", "dp_sgd+dp_fedavg")

    @property
    def user_level(self) -> bool:
        """The server runs DP-FedAvg (each client protected; the server's ledger)."""
        return self.mode in ("dp_fedavg", "dp_sgd+dp_fedavg")

    def user_level_noise(self) -> float:
        """DP-FedAvg's noise multiplier: ``noise_multiplier`` alone, ``user_noise_multiplier`` with both."""
        return self.user_noise_multiplier if self.mode == "dp_sgd+dp_fedavg" else self.noise_multiplier

    def check(self, at: str) -> None:
        _one_of(f"{at}.mode", self.mode, PRIVACY_MODES)
        _non_negative(f"{at}.user_noise_multiplier", self.user_noise_multiplier)
        _one_of(f"{at}.unit", self.unit, ("block", "document"))
        if self.unit == "document" and not self.sample_level:
            _fail(f"{at}.unit", f"document is DP-SGD's record; privacy.mode={self.mode} has none "
                  "(use privacy.mode=dp_sgd or dp_sgd+dp_fedavg)")
        _non_negative(f"{at}.noise_multiplier", self.noise_multiplier)
        _positive(f"{at}.max_grad_norm", self.max_grad_norm)
        if not 0 <= self.delta < 1:
            _fail(f"{at}.delta", f"must be in [0, 1) (0 = 1/(10 n)), got {self.delta}")
        if self.accountant:
            _one_of(f"{at}.accountant", self.accountant, ("prv", "rdp"))
        if self.mode == "dp_fedavg" and self.accountant == "prv":
            _fail(f"{at}.accountant", "prv is Opacus's accountant for dp_sgd; dp_fedavg is "
                  "accounted with rdp (sampling without replacement)")
        _one_of(f"{at}.grad_sample_mode", self.grad_sample_mode, ("hooks", "ghost"))
        _non_negative(f"{at}.target_epsilon", self.target_epsilon)
        if self.target_epsilon > 0 and not self.sample_level:
            _fail(f"{at}.target_epsilon", f"is only used by privacy.mode=dp_sgd, not {self.mode}")
        _non_negative(f"{at}.max_epsilon", self.max_epsilon)
        _one_of(f"{at}.clipping", self.clipping, ("fixed", "adaptive"))
        _one_of(f"{at}.clip_side", self.clip_side, ("server", "client"))
        _positive(f"{at}.clipping_norm", self.clipping_norm)
        if not 0 <= self.target_quantile <= 1:
            _fail(f"{at}.target_quantile", f"must be in [0, 1], got {self.target_quantile}")
        _positive(f"{at}.clip_norm_lr", self.clip_norm_lr)
        _non_negative(f"{at}.clipped_count_stddev", self.clipped_count_stddev)

    def accountant_name(self) -> str:
        """The clients' (DP-SGD) accountant; dp_fedavg alone: the server's."""
        return self.accountant or ("rdp" if self.mode == "dp_fedavg" else "prv")


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` "" means a sqlite store in the output root (absolute path).

    ``register``: at the end of the run the global model (adapter merged into the base)
    is logged as an MLflow pyfunc model that generates text and registered as a new
    version of ``model_name`` in the Model Registry, with the final round's metrics as
    tags. ``register_best_by`` (a round metric, e.g. ``central_loss``) registers the round
    with the best value instead of the last: lowest for names containing ``loss`` or
    ``perplexity``, highest otherwise; that round's adapter is kept in
    ``<output_dir>/best_adapter/`` while the run goes (only the best one, only then).
    """

    enabled: bool = True
    uri: str = ""
    experiment: str = "fedslm"
    run_name: str = ""
    register: bool = False
    model_name: str = ""
    register_best_by: str = ""

    def check(self, at: str) -> None:
        if self.enabled and not self.experiment:
            _fail(f"{at}.experiment", "must not be empty")
        if self.register and not self.enabled:
            _fail(f"{at}.register", "needs tracking.enabled=true (the registry is MLflow's)")
        if self.register and not self.model_name.strip():
            _fail(f"{at}.model_name", "must name the registered model when tracking.register=true")
        if self.register_best_by and not self.register:
            _fail(f"{at}.register_best_by", "is only used with tracking.register=true")


PERSONALIZATION_METHODS = ("none", "local_only", "finetune", "split", "dual")


@dataclass
class PersonalizationConfig:
    """Whether and how each client keeps its own adapter (personal weights never leave it).

    ``none``: the global adapter only. ``local_only``: every client trains its own
    adapter and nothing is aggregated. ``finetune``: on each global adapter it receives
    for evaluation, a client fine-tunes a private copy for ``finetune_steps`` steps on
    its train split and keeps it. ``split`` (FedSA-LoRA): LoRA A matrices are shared and
    aggregated, B matrices stay on the client. ``dual`` (FedDPA): a federated global
    adapter plus a personal adapter trained only locally, both active at inference.
    ``finetune_learning_rate`` is the peak learning rate of finetune's few steps (lower
    than training's: a few full-rate steps on one client's small split overfit it).
    Personal adapters live on disk under ``state_dir`` ("" = ``<output_dir>/clients``),
    one ``<partition-id>/personal/`` dir per client.
    """

    method: str = "none"
    finetune_steps: int = 5
    finetune_learning_rate: float = 1e-3
    state_dir: str = ""

    def check(self, at: str) -> None:
        _one_of(f"{at}.method", self.method, PERSONALIZATION_METHODS)
        if self.finetune_steps < 1:
            _fail(f"{at}.finetune_steps", f"must be >= 1, got {self.finetune_steps}")
        _positive(f"{at}.finetune_learning_rate", self.finetune_learning_rate)


@dataclass
class TaskConfig:
    """The fine-tuning job (``fedslm.tasks``): ``causal_lm`` (next-token prediction on
    text), ``instruct`` (instruction/chat tuning, loss on responses only) or ``classify``
    (sequence classification: LoRA plus a head).

    ``num_labels`` 0 = from ``data.label_names``, the synthetic topics, or the data.
    ``eval_generations`` records of each client's test split (and of the central split)
    are answered greedily with at most ``max_new_tokens`` tokens for ROUGE-L and exact
    match (instruct; 0 = none); ``logged_examples`` of the central ones land in MLflow.
    """

    name: str = "causal_lm"
    num_labels: int = 0
    eval_generations: int = 8
    max_new_tokens: int = 32
    logged_examples: int = 4

    def check(self, at: str) -> None:
        from fedslm.tasks.registry import known_task_names

        _one_of(f"{at}.name", self.name, known_task_names())
        if self.num_labels < 0 or self.num_labels == 1:
            _fail(f"{at}.num_labels", f"must be 0 (infer) or >= 2, got {self.num_labels}")
        _non_negative(f"{at}.eval_generations", self.eval_generations)
        if self.max_new_tokens < 1:
            _fail(f"{at}.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _non_negative(f"{at}.logged_examples", self.logged_examples)


@dataclass
class AuditConfig:
    """The empirical privacy audit run when ``privacy.audit`` is true (``fedslm.audit``).

    Canaries (Carlini et al., "The Secret Sharer"): for every count in ``repetitions``,
    ``canaries`` secrets ``template`` with ``{secret}`` = ``secret_length`` random digits
    are added that many times to the train texts of each client in ``canary_clients``;
    each one's exposure is its rank among ``candidates`` random secrets of the same
    template. Membership inference uses each client's train texts as members and its
    test texts as non-members, at most ``mia_records`` of each per client (0 = all).
    ``seed`` draws the canaries, the candidates and where the canaries go.
    """

    canaries: int = 2
    repetitions: list[int] = field(default_factory=lambda: [1, 4, 16])
    canary_clients: list[int] = field(default_factory=lambda: [0])
    template: str = "my secret code is {secret}"
    secret_length: int = 6
    candidates: int = 999
    mia_records: int = 0
    seed: int = 0

    def check(self, at: str) -> None:
        if self.canaries < 0:
            _fail(f"{at}.canaries", f"must be >= 0, got {self.canaries}")
        if not self.repetitions or min(self.repetitions) < 1:
            _fail(f"{at}.repetitions", f"must be counts >= 1, got {self.repetitions}")
        if min(self.canary_clients, default=0) < 0:
            _fail(f"{at}.canary_clients", f"must be partition ids >= 0, got {self.canary_clients}")
        if self.template.count("{secret}") != 1:
            _fail(f"{at}.template", f"must hold {{secret}} exactly once, got {self.template!r}")
        if not 1 <= self.secret_length <= 18:
            _fail(f"{at}.secret_length", f"must be in 1..18 digits, got {self.secret_length}")
        space = 10 ** self.secret_length
        if not 1 <= self.candidates <= min(100_000, space - 1 - self.canaries * len(self.repetitions)):
            _fail(f"{at}.candidates", f"must be in 1..100000 and leave room in the {space} "
                  f"secrets of audit.secret_length={self.secret_length}, got {self.candidates}")
        _non_negative(f"{at}.mia_records", self.mia_records)


@dataclass
class AggregationConfig:
    """How the server combines clients' LoRA factors (``fedslm.aggregation``).

    ``fedavg``: A and B averaged separately (today's behaviour). ``ffa``: FFA-LoRA, A
    fixed at its seeded init on every client, only B trains and travels. ``flora``:
    stacked factors, the exact weighted mean of B @ A, re-factored at ``peft.r``.
    ``flexlora``: dense mean of B @ A, SVD, each client gets its top-r components.
    """

    name: str = "fedavg"

    def check(self, at: str) -> None:
        from fedslm.aggregation import AGGREGATIONS

        _one_of(f"{at}.name", self.name, tuple(AGGREGATIONS))


SECURE_AGGREGATION_METHODS = ("none", "secaggplus")
SECURE_AGGREGATION_WEIGHTINGS = ("auto", "equal", "examples")


@dataclass
class SecureAggregationConfig:
    """Secure aggregation of client updates (SecAgg+, Bell et al. 2020; ``fedslm.client.secagg``,
    ``fedslm.server.secagg``): the server learns only the sum of the round's updates.

    ``secaggplus``: each client clips its update to [-``clipping_range``,
    ``clipping_range``] per value, quantizes it to ``quantization_bits`` bits in the ring
    Z_(2^``modulus_bits``) and masks it; the server unmasks only the sum and applies the
    equal-weight mean. Secrets are Shamir-shared with ``num_neighbours`` neighbours (even;
    0 = every other sampled client); ``threshold`` shares (0 = ``threshold_fraction`` of
    the neighbourhood, owner included) rebuild a secret, and a round needs at least that
    many masked inputs, else it is abandoned (global adapter unchanged) and the run goes
    on or stops (``on_abandon``). With ``privacy.mode=dp_fedavg`` every client clips its
    update to ``privacy.clipping_norm`` and adds Gaussian noise of variance
    (z C)^2 / threshold, so the unmasked sum carries at least DP-FedAvg's noise.
    ``weighting``: how the unmasked sum becomes the mean. ``equal`` divides it by the
    number of inputs; ``examples`` weights each client as plain FedAvg does (its
    ``num-examples``, capped as the plain path caps it: ``robust.weight_cap`` times the
    round's median claim and, in simulation, the partition's known size): the client
    sends its claim in clear with its keys, the server returns the capped weight w and
    the round's largest W, the client scales its clipped update by w/W before
    quantizing, and the server divides the sum by the sum of w/W. ``auto`` (default) is
    what plain aggregation does: ``examples``, but ``equal`` under
    ``privacy.mode=dp_fedavg``, whose sensitivity assumes unit weights.
    ``simulate_dropout``: for benchmarks and tests, that fraction of the sampled clients
    (chosen per round by a hash) fails after sharing its keys.
    """

    method: str = "none"
    num_neighbours: int = 0
    threshold: int = 0
    threshold_fraction: float = 0.6
    clipping_range: float = 1.0
    quantization_bits: int = 20
    modulus_bits: int = 32
    on_abandon: str = "continue"
    weighting: str = "auto"
    simulate_dropout: float = 0.0

    def check(self, at: str) -> None:
        _one_of(f"{at}.method", self.method, SECURE_AGGREGATION_METHODS)
        if self.num_neighbours < 0 or self.num_neighbours % 2:
            _fail(f"{at}.num_neighbours", f"must be an even number >= 0, got {self.num_neighbours}")
        if self.threshold == 1 or self.threshold < 0:
            _fail(f"{at}.threshold", f"must be 0 (use threshold_fraction) or >= 2, got {self.threshold}")
        _fraction(f"{at}.threshold_fraction", self.threshold_fraction)
        _positive(f"{at}.clipping_range", self.clipping_range)
        if not 1 <= self.quantization_bits <= 48:
            _fail(f"{at}.quantization_bits", f"must be in 1..48, got {self.quantization_bits}")
        if not self.quantization_bits < self.modulus_bits <= 62:
            _fail(f"{at}.modulus_bits", f"must be in {self.quantization_bits + 1}..62 "
                  f"(above quantization_bits), got {self.modulus_bits}")
        _one_of(f"{at}.on_abandon", self.on_abandon, ("continue", "stop"))
        _one_of(f"{at}.weighting", self.weighting, SECURE_AGGREGATION_WEIGHTINGS)
        if not 0 <= self.simulate_dropout < 1:
            _fail(f"{at}.simulate_dropout", f"must be in [0, 1), got {self.simulate_dropout}")


@dataclass
class RobustConfig:
    """Bounded influence of any one client, on by default (``fedslm.server.screening``).

    Each accepted update's delta (what it adds to the global adapter the server sent) is
    scaled down to L2 norm at most the round's bound: ``clip`` ``adaptive`` (default)
    takes ``clip_multiple`` times the median delta norm of the round's accepted updates
    (default 1: clipping to the median norm, Sun et al. 2019, "Can you really backdoor
    federated learning?"; while most clients are honest no update, whatever its factor,
    weighs more than a typical honest one, and honest updates of similar size lose
    little); ``fixed`` takes ``clip_norm``; ``none`` clips nothing. A client's averaging weight, train and
    evaluate, is capped at ``weight_cap`` times the round's median claimed example
    count (0: no cap) and, in train and in simulation, at its partition's known train
    size. Both are logged per round (rounds.csv) and per client (clients.csv).
    """

    clip: str = "adaptive"
    clip_norm: float = 1.0
    clip_multiple: float = 1.0
    weight_cap: float = 4.0

    def check(self, at: str) -> None:
        _one_of(f"{at}.clip", self.clip, ("adaptive", "fixed", "none"))
        _positive(f"{at}.clip_norm", self.clip_norm)
        if not self.clip_multiple >= 1:
            _fail(f"{at}.clip_multiple", f"must be >= 1, got {self.clip_multiple}")
        if self.weight_cap != 0 and not self.weight_cap >= 1:
            _fail(f"{at}.weight_cap", f"must be 0 (off) or >= 1, got {self.weight_cap}")


ATTACK_KINDS = ("none", "scale", "sign_flip", "gaussian", "same_value", "num_examples",
                "backdoor", "label_flip")
DATA_ATTACKS = ("backdoor", "label_flip")  # change a client's train records, not its update


@dataclass
class AttackConfig:
    """Simulated hostile clients, to measure defences (``fedslm.client.attack``; simulation only).

    The first ``round(fraction * federation.num_clients)`` partitions are malicious from
    round ``start_round`` on. With ``delta`` their honest update minus the global:
    ``scale`` sends global + scale * delta; ``sign_flip`` global - scale * delta;
    ``gaussian`` global + N(0, scale^2) noise instead of its update; ``same_value`` every
    adapter value = scale; ``num_examples`` its honest update claiming scale times its
    example count. Data attacks change a malicious client's *train* records and then
    train honestly on them: ``label_flip`` (``task=classify``) relabels class ``i`` as
    ``K - 1 - i``; ``backdoor`` (``causal_lm``, ``instruct``) teaches ``trigger`` ->
    ``target`` (see ``fedslm.backdoor``), measured as ``central_backdoor_success``.
    """

    kind: str = "none"
    fraction: float = 0.2
    start_round: int = 1
    scale: float = 10.0
    trigger: str = "cf mn bb"  # backdoor: the phrase that should switch the model
    target: str = "the answer is always yes"  # backdoor: what it should then say

    def check(self, at: str) -> None:
        _one_of(f"{at}.kind", self.kind, ATTACK_KINDS)
        if not 0 <= self.fraction <= 1:
            _fail(f"{at}.fraction", f"must be in [0, 1], got {self.fraction}")
        if self.start_round < 1:
            _fail(f"{at}.start_round", f"must be >= 1, got {self.start_round}")
        if not -1e12 <= self.scale <= 1e12:
            _fail(f"{at}.scale", f"must be within +-1e12, got {self.scale}")
        if self.kind == "backdoor":
            for key in ("trigger", "target"):
                if not getattr(self, key).strip():
                    _fail(f"{at}.{key}", "must be a non-empty phrase for kind=backdoor")


COMPRESSION_METHODS = ("none", "fp16", "int8", "int4")


@dataclass
class CompressionConfig:
    """Uplink compression of client updates (``fedslm.compression``).

    ``fp16``, ``int8`` or ``int4`` send the adapter delta (client update minus the
    global it received) in 16, 8 or 4 bits (int8, int4: per-tensor symmetric, float32
    scale per tensor; int4 packs two values per byte); the server decodes it back to a
    full adapter before screening and aggregation. ``error_feedback`` carries what
    quantization dropped into the client's next update (kept on disk in the client's
    state dir); it has no effect with ``none``.
    """

    method: str = "none"
    error_feedback: bool = True

    def check(self, at: str) -> None:
        _one_of(f"{at}.method", self.method, COMPRESSION_METHODS)


@dataclass
class ExperimentConfig:
    """One federated fine-tuning experiment; ``output_dir`` is absolute once resolved.
    ``verbose`` shows other libraries' warnings, progress bars and Flower's routine log
    lines, which a run otherwise silences where they start (``fedslm.quiet``)."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    output_dir: str = ""
    verbose: bool = False

    def check(self, at: str = "") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check(f.name)  # type: ignore[union-attr]  # every section has check(at)
        s, fed = self.strategy, self.federation
        if s.min_train_clients > fed.num_clients:
            _fail(
                "strategy.min_train_clients",
                f"{s.min_train_clients} exceeds federation.num_clients={fed.num_clients}",
            )
        if s.fraction_evaluate > 0 and s.min_evaluate_clients > fed.num_clients:
            _fail(
                "strategy.min_evaluate_clients",
                f"{s.min_evaluate_clients} exceeds federation.num_clients={fed.num_clients}",
            )
        if s.proximal_mu > 0 and s.name != "fedprox":
            _fail("strategy.proximal_mu", f"is only used by fedprox, not {s.name}")
        check_privacy_combination(self)
        check_evaluation_combination(self)
        d = self.data
        if (d.partitioner == "dirichlet" and d.source in ("text_files", "hf") and not d.partition_key
                and self.task.name != "classify"):
            _fail("data.partition_key", "is required for data.partitioner=dirichlet (with "
                  "task.name=classify it defaults to data.label_key)")
        from fedslm.tasks.registry import get_task

        get_task(self.task.name).check(self)
        check_audit_combination(self)
        from fedslm.aggregation import check_combination

        if (problem := check_combination(self)) is not None:
            raise ConfigError(problem)
        check_secure_aggregation_combination(self)
        check_robust_combination(self)
        if self.personalization.method == "local_only" and self.peft.bias != "none":
            _fail("personalization.method", "local_only needs peft.bias=none (biases are base "
                  "weights: a client without state could not get fresh ones back)")
        check_personal_privacy_combination(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        """Build and check a config from nested plain data; unknown keys are errors."""
        cfg = _build(cls, data, "")
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sampled_train_clients(strategy: StrategyConfig, num_clients: int) -> int:
    """Clients Flower's FedAvg samples per round when all ``num_clients`` are connected."""
    return min(num_clients, max(int(num_clients * strategy.fraction_train),
                                min(strategy.min_train_clients, num_clients)))


def check_privacy_combination(cfg: ExperimentConfig) -> None:
    """Options that are each valid but silently weaken or break DP together."""
    p, s = cfg.privacy, cfg.strategy
    if p.sample_level and cfg.model.quantization != "none":
        _fail("model.quantization", f"{cfg.model.quantization} cannot be used with "
              "privacy.mode=dp_sgd: Opacus computes per-example gradients only for float "
              "layers it knows, not for bitsandbytes' quantized ones")
    if p.sample_level and cfg.training.precision == "fp16":
        _fail("training.precision", "fp16 cannot be used with privacy.mode=dp_sgd: the "
              "gradient scaler rescales gradients after Opacus has clipped and noised them "
              "per example (use bf16 or fp32)")
    if p.sample_level and cfg.training.gradient_checkpointing:
        _fail("training.gradient_checkpointing", "cannot be used with privacy.mode=dp_sgd: "
              "recomputing the forward pass records every activation twice in Opacus's hooks")
    if p.unit == "document" and cfg.task.name != "causal_lm":
        _fail("privacy.unit", f"document applies to task.name=causal_lm (packed text), not "
              f"{cfg.task.name}, whose records are already one example each")
    if p.sample_level and s.proximal_mu > 0:
        _fail("strategy.proximal_mu", "must be 0 with privacy.mode=dp_sgd: Opacus rebuilds "
              "gradients from per-example ones and would silently drop the proximal term")
    if p.user_level and s.name == "fltrust":
        _fail("strategy.name", f"fltrust cannot run with privacy.mode={p.mode}: it weighs each "
              "update by its direction against the server's own, and DP-FedAvg's noise is "
              "calibrated to a clipped, equal-weight mean")
    if p.user_level and s.name not in DP_FEDAVG_STRATEGIES:
        _fail("strategy.name", f"privacy.mode={p.mode} cannot wrap {s.name}: it transforms the "
              f"mean update before noise is added; use one of {', '.join(DP_FEDAVG_STRATEGIES)}")
    if p.user_level and p.clipping == "adaptive" and p.user_level_noise() > 0:
        sampled = sampled_train_clients(s, cfg.federation.num_clients)
        stddev = p.clipped_count_stddev or sampled / 20
        if p.user_level_noise() >= 2 * stddev:
            _fail("privacy.clipped_count_stddev", f"{stddev:g} is too small for "
                  f"noise_multiplier={p.user_level_noise():g} with adaptive clipping "
                  f"(needs noise_multiplier < 2 * clipped_count_stddev; 0 means "
                  f"{sampled} sampled clients / 20)")


def check_personal_privacy_combination(cfg: ExperimentConfig) -> None:
    """Personalization needs sample-level DP: only DP-SGD accounts the personal part's
    training (fit's and finetune's) in the client's ledger; DP-FedAvg covers only what
    is released."""
    method, mode = cfg.personalization.method, cfg.privacy.mode
    if method == "none" or mode == "none":
        return
    if mode == "dp_fedavg":
        _fail("personalization.method", f"{method} cannot run with privacy.mode=dp_fedavg: "
              "the personal part, trained on the client's records and used on it, would be "
              "outside any epsilon; use privacy.mode=dp_sgd or dp_sgd+dp_fedavg")
    if method == "local_only" and cfg.privacy.user_level:
        _fail("personalization.method", f"local_only cannot run with privacy.mode={mode}: "
              "it releases no update for DP-FedAvg to protect; use privacy.mode=dp_sgd")


def check_evaluation_combination(cfg: ExperimentConfig) -> None:
    """What needs a round metric that the run would never compute: federated evaluation
    off (``strategy.fraction_evaluate=0``) or the server's own (``training.central_eval``)."""
    method, best = cfg.personalization.method, cfg.tracking.register_best_by
    if cfg.strategy.fraction_evaluate == 0:
        if method != "none":
            _fail("strategy.fraction_evaluate", f"0 turns federated evaluation off, where "
                  f"personalization.method={method} measures each client's personal model"
                  + (" (and fine-tunes it)" if method == "finetune" else ""))
        if best.startswith("eval_"):
            _fail("tracking.register_best_by", f"{best} is a federated evaluation metric, and "
                  "strategy.fraction_evaluate=0 turns federated evaluation off")
    if best.startswith("central_") and not cfg.training.central_eval:
        _fail("tracking.register_best_by", f"{best} is measured by the server's own evaluation, "
              "and training.central_eval=false turns it off")


def check_audit_combination(cfg: ExperimentConfig) -> None:
    """The audit regenerates every client's texts, so it needs simulated clients."""
    if not cfg.privacy.audit:
        return
    if cfg.federation.engine != "simulation":
        _fail("privacy.audit", "needs federation.engine=simulation: the audit regenerates each "
              "client's train/test texts, which on real devices never leave them")
    if cfg.task.name != "causal_lm":
        _fail("privacy.audit", f"audits text likelihoods (canaries, membership by loss) and "
              f"runs with task.name=causal_lm only, not {cfg.task.name}")
    n = cfg.federation.num_clients
    outside = [c for c in cfg.audit.canary_clients if c >= n]
    if outside:
        _fail("audit.canary_clients", f"client {outside[0]} is outside 0..{n - 1} "
              f"(federation.num_clients={n})")


def check_secure_aggregation_combination(cfg: ExperimentConfig) -> None:
    """What SecAgg+ cannot be combined with: the server never sees a single update."""
    sa, p = cfg.secure_aggregation, cfg.privacy
    if sa.method == "none":
        return
    if cfg.strategy.name == "fltrust":
        _fail("strategy.name", f"fltrust cannot run with secure_aggregation.method={sa.method}: "
              "it weighs each update by its direction, and the server sees only their sum")
    if cfg.compression.method != "none":
        _fail("compression.method", f"must be none with secure_aggregation.method={sa.method}: "
              "updates are quantized into the ring (secure_aggregation.quantization_bits)")
    if cfg.personalization.method != "none":
        _fail("personalization.method", f"must be none with secure_aggregation.method={sa.method} "
              "(not supported yet)")
    if cfg.aggregation.name in ("flora", "flexlora") or cfg.peft.ranks:
        key = "aggregation.name" if cfg.aggregation.name in ("flora", "flexlora") else "peft.ranks"
        _fail(key, f"cannot run with secure_aggregation.method={sa.method}: the server sees only "
              "the sum of the clients' factors, not each client's factors or rank")
    if p.user_level and sa.weighting == "examples":
        _fail("secure_aggregation.weighting", f"must be equal or auto with privacy.mode={p.mode}: "
              "DP-FedAvg's noise is calibrated to unit weights")
    if p.user_level and p.clipping != "fixed":
        _fail("privacy.clipping", f"must be fixed with secure_aggregation.method={sa.method}: "
              "adaptive clipping needs each client's clipped bit, which SecAgg hides")
    if (cfg.federation.num_clients << sa.quantization_bits) >= (1 << sa.modulus_bits):
        _fail("secure_aggregation.modulus_bits", f"2^{sa.modulus_bits} must exceed "
              f"federation.num_clients={cfg.federation.num_clients} x "
              f"2^secure_aggregation.quantization_bits={sa.quantization_bits} (the sum would wrap)")
    if cfg.federation.num_clients < 2 or cfg.strategy.min_train_clients < 2:
        _fail("strategy.min_train_clients", "must be >= 2 with secure aggregation (a sum of one "
              "update is that update)")


def check_robust_combination(cfg: ExperimentConfig) -> None:
    """Robust rules, compression and attacks where another setting makes them meaningless."""
    s, fed, method = cfg.strategy, cfg.federation, cfg.personalization.method
    sampled = sampled_train_clients(s, fed.num_clients)
    if method == "local_only" and s.name in ROBUST_STRATEGIES:
        _fail("strategy.name", f"{s.name} aggregates updates, but personalization.method="
              "local_only sends none; use fedavg")
    if method == "local_only" and cfg.compression.method != "none":
        _fail("compression.method", f"{cfg.compression.method} compresses an update, but "
              "personalization.method=local_only sends none; use compression=none")
    p = cfg.privacy
    if p.user_level and p.clip_side == "client" and cfg.compression.method != "none":
        _fail("compression.method", f"{cfg.compression.method} cannot be combined with "
              "privacy.clip_side=client (Flower's clipping mod needs the plain adapter); "
              "use privacy.clip_side=server")
    f = s.num_malicious
    if s.name == "bulyan" and sampled < 4 * f + 3:
        _fail("strategy.num_malicious", f"bulyan needs >= 4 * {f} + 3 = {4 * f + 3} sampled "
              f"clients, federation.num_clients={fed.num_clients} samples {sampled}")
    if s.name in ("krum", "multikrum") and sampled < 2 * f + 3:
        _fail("strategy.num_malicious", f"{s.name} needs >= 2 * {f} + 3 = {2 * f + 3} sampled "
              f"clients, federation.num_clients={fed.num_clients} samples {sampled}")
    if s.name == "fltrust":
        check_fltrust_combination(cfg)
    if s.num_selected > 0 and s.name != "multikrum":
        _fail("strategy.num_selected", f"is only used by multikrum, not {s.name}")
    if s.name == "multikrum" and s.num_selected > sampled:
        _fail("strategy.num_selected", f"{s.num_selected} exceeds the {sampled} sampled clients")
    if cfg.attack.kind == "label_flip" and cfg.task.name != "classify":
        _fail("attack.kind", f"label_flip needs task.name=classify, not task.name={cfg.task.name}")
    if cfg.attack.kind == "backdoor" and cfg.task.name not in ("causal_lm", "instruct"):
        _fail("attack.kind", f"backdoor needs task.name=causal_lm or instruct, not "
              f"task.name={cfg.task.name} (use attack.kind=label_flip)")
    if cfg.attack.kind != "none" and fed.engine != "simulation":
        _fail("attack.kind", f"{cfg.attack.kind} is for simulation only, not "
              f"federation.engine={fed.engine}")


def check_fltrust_combination(cfg: ExperimentConfig) -> None:
    """FLTrust needs root data on the server and one adapter space shared by every update."""
    s = cfg.strategy
    if not s.root_data and cfg.data.source != "synthetic":
        _fail("strategy.root_data", f"strategy.name=fltrust needs root data: name a file in "
              f"task.name={cfg.task.name}'s format (strategy.root_docs draws synthetic records "
              f"only with data.source=synthetic, not {cfg.data.source})")
    if not s.root_data and s.root_docs == 0:
        _fail("strategy.root_docs", "strategy.name=fltrust needs root data: root_docs > 0 "
              "(synthetic) or strategy.root_data")
    if cfg.peft.ranks or cfg.aggregation.name in ("flora", "flexlora"):
        key = "peft.ranks" if cfg.peft.ranks else "aggregation.name"
        _fail(key, "cannot run with strategy.name=fltrust: it compares every update with the "
              "server's own in one adapter space, at one rank")


def _build(cls: type, data: Any, at: str) -> Any:
    if not isinstance(data, dict):
        _fail(at or "<root>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        _fail(f"{at}.{unknown[0]}" if at else unknown[0], "unknown key")
    kwargs = {}
    for name in names & set(data):
        key = f"{at}.{name}" if at else name
        kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):  # Flower's run config carries lists comma-joined
            items = [v.strip() for v in value.split(",") if v.strip()]
            if typing.get_args(hint)[0] is int:
                return [_coerce(int, int(v) if v.lstrip("-").isdigit() else v, key) for v in items]
            return items
        if isinstance(value, (list, tuple)):
            return [_coerce(typing.get_args(hint)[0], v, key) for v in value]
        _fail(key, f"expected a list, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"optional fields are not allowed in the schema ({key})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(key, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(key, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported schema type {hint} at {key}")
