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


@dataclass
class ModelConfig:
    """The frozen base model.

    ``name_or_path`` is a Hugging Face hub name, a local directory written by
    ``save_pretrained``, or ``builtin:tiny-llama``: a 2-layer Llama the project trains
    once from the synthetic corpus and caches under ``cache_dir``.
    """

    name_or_path: str = BUILTIN_MODEL
    dtype: str = "float32"
    cache_dir: str = ""  # "" -> ~/.cache/fedslm ($FEDSLM_CACHE_DIR if set)

    def check(self, at: str) -> None:
        if not self.name_or_path.strip():
            _fail(f"{at}.name_or_path", "must not be empty")
        _one_of(f"{at}.dtype", self.dtype, ("float32", "float16", "bfloat16"))


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
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    bias: str = "none"

    def check(self, at: str) -> None:
        if self.r <= 0:
            _fail(f"{at}.r", f"must be > 0, got {self.r}")
        _positive(f"{at}.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            _fail(f"{at}.dropout", f"must be in [0, 1), got {self.dropout}")
        if len(self.target_modules) > 1 and {"auto", "all-linear"} & set(self.target_modules):
            _fail(f"{at}.target_modules", "auto and all-linear stand alone, not in a list")
        _one_of(f"{at}.bias", self.bias, ("none", "lora_only", "all"))


STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")


@dataclass
class StrategyConfig:
    """Flower strategy and its server-side hyper-parameters.

    ``proximal_mu`` is sent to clients by FedProx; ``server_learning_rate`` and
    ``server_momentum`` drive FedAvgM; ``eta``, ``beta_1``, ``beta_2``, ``tau`` drive the
    adaptive FedOpt family (FedAdam, FedYogi, FedAdagrad).
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

    def check(self, at: str) -> None:
        _one_of(f"{at}.name", self.name, STRATEGIES)
        _fraction(f"{at}.fraction_train", self.fraction_train)
        _fraction(f"{at}.fraction_evaluate", self.fraction_evaluate)
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
        _positive(f"{at}.round_timeout", self.round_timeout)
        if self.client_num_cpus < 1:
            _fail(f"{at}.client_num_cpus", f"must be >= 1, got {self.client_num_cpus}")
        _non_negative(f"{at}.client_num_gpus", self.client_num_gpus)


@dataclass
class TrainingConfig:
    """Local training on each client and evaluation settings.

    ``local_steps`` > 0 fixes the optimizer steps per round; 0 trains ``local_epochs``
    passes over the client's train split instead. Learning rate warms up linearly over
    ``warmup_ratio`` of the steps, then decays linearly to zero.
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

    def check(self, at: str) -> None:
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


PRIVACY_MODES = ("none", "dp_sgd", "dp_fedavg")
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

    def check(self, at: str) -> None:
        _one_of(f"{at}.mode", self.mode, PRIVACY_MODES)
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
        if self.target_epsilon > 0 and self.mode != "dp_sgd":
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
        return self.accountant or ("rdp" if self.mode == "dp_fedavg" else "prv")


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` "" means a sqlite store in the output root (absolute path)."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "fedslm"
    run_name: str = ""

    def check(self, at: str) -> None:
        if self.enabled and not self.experiment:
            _fail(f"{at}.experiment", "must not be empty")


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
        if s.min_evaluate_clients > fed.num_clients:
            _fail(
                "strategy.min_evaluate_clients",
                f"{s.min_evaluate_clients} exceeds federation.num_clients={fed.num_clients}",
            )
        if s.proximal_mu > 0 and s.name != "fedprox":
            _fail("strategy.proximal_mu", f"is only used by fedprox, not {s.name}")
        check_privacy_combination(self)
        d = self.data
        if (d.partitioner == "dirichlet" and d.source in ("text_files", "hf") and not d.partition_key
                and self.task.name != "classify"):
            _fail("data.partition_key", "is required for data.partitioner=dirichlet (with "
                  "task.name=classify it defaults to data.label_key)")
        from fedslm.tasks.registry import get_task

        get_task(self.task.name).check(self)
        if self.personalization.method == "local_only" and self.peft.bias != "none":
            _fail("personalization.method", "local_only needs peft.bias=none (biases are base "
                  "weights: a client without state could not get fresh ones back)")
        if self.privacy.mode != "none" and self.personalization.method != "none":
            _fail("personalization.method", f"{self.personalization.method} is not supported "
                  f"together with privacy.mode={self.privacy.mode} yet (the personal training "
                  "path has no DP accounting); use personalization=none")

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
    if p.mode == "dp_sgd" and s.proximal_mu > 0:
        _fail("strategy.proximal_mu", "must be 0 with privacy.mode=dp_sgd: Opacus rebuilds "
              "gradients from per-example ones and would silently drop the proximal term")
    if p.mode == "dp_fedavg" and s.name not in DP_FEDAVG_STRATEGIES:
        _fail("strategy.name", f"privacy.mode=dp_fedavg cannot wrap {s.name}: it transforms the "
              f"mean update before noise is added; use one of {', '.join(DP_FEDAVG_STRATEGIES)}")
    if p.mode == "dp_fedavg" and p.clipping == "adaptive" and p.noise_multiplier > 0:
        sampled = sampled_train_clients(s, cfg.federation.num_clients)
        stddev = p.clipped_count_stddev or sampled / 20
        if p.noise_multiplier >= 2 * stddev:
            _fail("privacy.clipped_count_stddev", f"{stddev:g} is too small for "
                  f"noise_multiplier={p.noise_multiplier:g} with adaptive clipping "
                  f"(needs noise_multiplier < 2 * clipped_count_stddev; 0 means "
                  f"{sampled} sampled clients / 20)")


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
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
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
