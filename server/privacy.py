"""The server's privacy state for user-level DP: a small serializable object, its
accountant, and an atomic file next to the run's outputs.

State = configured noise, current clip norm (adaptive clipping moves it), rounds done
and the ledger of private releases. A restarted server loads it and continues the
ledger instead of resetting it (``load_server_privacy`` / ``save_server_privacy``; the
general checkpoint/resume code calls the same two functions).

Accounting (why not Flower's own accountant): Flower's ``RdpAccountant`` attached to its
DP wrappers only accepts no-amplification accounting, equal weights and fixed clipping.
Here clients are sampled per round, so each release is accounted with Google's
``dp-accounting`` RDP accountant as a *sampled-without-replacement* Gaussian (Flower's
FedAvg samples a fixed number m of the N connected nodes). Amplification for that
sampling is proven for the *replace-one* relation (Wang, Balle, Kasiviswanathan 2019):
neighbouring federations differ in one client's data, whose clipped update can move the
sum by up to 2C, so noise of stddev z*C on the sum is a Gaussian with noise multiplier
z/2 relative to that sensitivity. With adaptive clipping, z is the effective multiplier
of the update and the noised clipped-count released together (Andrew et al. 2021).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedslm.atomic import atomic_write
from fedslm.config import ExperimentConfig, sampled_train_clients

STATE_FILE = "server_privacy.json"
STATE_VERSION = 2  # 2: the file carries a sha256 of its own content
DIGEST_KEY = "sha256"


class PrivacyStateError(RuntimeError):
    """The saved privacy state cannot be used with this run; the message says why."""


@dataclass(frozen=True)
class Release:
    """One noised aggregate: ``sample_size`` of ``population`` clients, multiplier ``noise_multiplier``."""

    server_round: int
    noise_multiplier: float  # z of the combined mechanism, relative to C (add/remove scale)
    sample_size: int
    population: int


@dataclass
class ServerPrivacyState:
    noise_multiplier: float
    clipping: str
    clip_side: str
    clipping_norm: float  # the norm the next round clips to
    delta: float
    accountant: str = "rdp"
    rounds_done: int = 0
    releases: list[Release] = field(default_factory=list)
    version: int = STATE_VERSION

    def epsilon(self, extra: Release | None = None) -> float:
        """Cumulative user-level epsilon at ``delta`` (with one ``extra`` release, for a projection)."""
        releases = [*self.releases, extra] if extra is not None else self.releases
        return user_level_epsilon(releases, delta=self.delta)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["epsilon"] = self.epsilon()
        return data

    def digest(self) -> str:
        """sha256 of the ledger's canonical JSON: what the file and the checkpoint compare."""
        return content_digest(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "ServerPrivacyState":
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        fields = {k: data[k] for k in ("noise_multiplier", "clipping", "clip_side", "clipping_norm",
                                       "delta", "accountant", "rounds_done")}
        releases = [Release(**r) for r in data["releases"]]
        return cls(**fields, releases=releases)


def content_digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def user_level_epsilon(releases: list[Release], *, delta: float) -> float:
    """Epsilon of the composed releases, replace-one relation, amplified by sampling."""
    groups: list[tuple[float, int, int, int]] = []  # (z, m, N, count): identical releases folded
    for r in releases:
        key = (float(r.noise_multiplier), int(r.sample_size), int(r.population))
        if groups and groups[-1][:3] == key:
            groups[-1] = (*key, groups[-1][3] + 1)
        else:
            groups.append((*key, 1))
    return _epsilon(tuple(groups), float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon(groups: tuple[tuple[float, int, int, int], ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    if not groups:
        return 0.0
    if any(z <= 0 for z, _, _, _ in groups):
        return math.inf
    acc = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for z, m, n, count in groups:
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=n, sample_size=m, event=dp_accounting.GaussianDpEvent(z / 2)), count)
    return float(acc.get_epsilon(delta))


def user_level_delta(cfg: ExperimentConfig) -> float:
    """``privacy.delta``, or 1/(10 N) for a population of N clients."""
    return cfg.privacy.delta if cfg.privacy.delta > 0 else 1.0 / (10 * cfg.federation.num_clients)


def expected_release(cfg: ExperimentConfig, server_round: int, *, population: int | None = None) -> Release:
    """The release a round will make when ``population`` (default: all) clients are connected."""
    n = population or cfg.federation.num_clients
    m = sampled_train_clients(cfg.strategy, n)
    return Release(server_round, cfg.privacy.user_level_noise(), m, n)


def new_server_state(cfg: ExperimentConfig) -> ServerPrivacyState:
    p = cfg.privacy
    return ServerPrivacyState(noise_multiplier=p.user_level_noise(), clipping=p.clipping,
                              clip_side=p.clip_side, clipping_norm=p.clipping_norm,
                              delta=user_level_delta(cfg), accountant="rdp")


def server_privacy_path(output_dir: Path) -> Path:
    return Path(output_dir) / STATE_FILE


def load_server_privacy(path: Path) -> ServerPrivacyState | None:
    """The saved state, or None if there is none; an unreadable file is an error."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        state = ServerPrivacyState.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PrivacyStateError(f"{path}: unreadable privacy state ({exc}); refusing to reset "
                                "the privacy ledger") from exc
    if data.get(DIGEST_KEY) != state.digest():
        raise PrivacyStateError(f"{path}: privacy state does not match its sha256 (edited or "
                                "partly written); refusing to continue the ledger from it")
    return state


def save_server_privacy(state: ServerPrivacyState, path: Path) -> Path:
    """Atomic write (temp file, fsync, rename): a crash leaves the previous state intact."""
    text = json.dumps({**state.to_dict(), DIGEST_KEY: state.digest()}, indent=1)
    return atomic_write(Path(path), lambda fh: fh.write(text.encode()))


def resumed_state(current: ServerPrivacyState, saved: dict, *, path: Path) -> ServerPrivacyState:
    """The ledger to continue when resuming: ``current`` was read from ``path`` (or is
    fresh when there is none), ``saved`` is the one in the checkpoint.

    The file is written at every release, the checkpoint after the round, so the file
    holds the checkpoint's releases plus at most the one of the round that was cut
    short. Anything else (a missing file, fewer releases, different ones) means the pair
    was edited or copied from different moments: refused, never resumed.
    """
    have, had = current.releases, ServerPrivacyState.from_dict(saved).releases
    if have[:len(had)] != had or len(have) > len(had) + 1:
        raise PrivacyStateError(
            f"{path}: holds {len(have)} releases that do not continue the checkpoint's "
            f"{len(had)} (missing, edited, or from another moment of the run); refusing to resume")
    return current


def restore_or_new(cfg: ExperimentConfig, path: Path) -> ServerPrivacyState:
    """Continue the saved ledger when there is one (same noise and clipping scheme), else start one."""
    state = load_server_privacy(path)
    if state is None:
        return new_server_state(cfg)
    p = cfg.privacy
    if (state.noise_multiplier, state.clipping, state.clip_side) != (p.user_level_noise(), p.clipping, p.clip_side):
        # The ledger itself would still be valid, but a silent change of mechanism
        # mid-run is more likely a mistake than a plan.
        raise PrivacyStateError(
            f"{path}: saved privacy state has noise_multiplier={state.noise_multiplier}, "
            f"clipping={state.clipping}, clip_side={state.clip_side}; the config asks for "
            f"{p.user_level_noise()}, {p.clipping}, {p.clip_side}")
    state.delta = user_level_delta(cfg)
    return state
