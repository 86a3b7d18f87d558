"""A client's privacy ledger: every (noise multiplier, sample rate, steps) its records
were trained under, kept on the client's own disk, turned into a cumulative epsilon.

The ledger is state, not a per-round number: it is read before training, extended by
exactly what the optimizer did, and written (atomically) before the update leaves the
client, so the epsilon a client reports covers every round it ever took part in, across
process restarts and across the many virtual clients one simulation process serves.
A ledger that cannot be read is an error, never a fresh start.

The history holds no data and does not depend on the accountant: epsilon is recomputed
from it with Opacus's ``prv`` or ``rdp`` accountant at the requested delta.
"""

from __future__ import annotations

from fedslm.atomic import atomic_write
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LEDGER_FILE = "privacy.json"
LEDGER_VERSION = 1
# A reply that carries this record instead of arrays is a refusal, not a failure.

Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


class LedgerError(RuntimeError):
    """The ledger file exists but cannot be used; the message names the file."""


class BudgetExhausted(RuntimeError):
    """The next round would take this client past ``privacy.max_epsilon``; it does not train.

    ``metrics`` is what the client tells the server instead of an update.
    """

    def __init__(self, message: str, metrics: dict[str, int | float]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass
class PrivacyLedger:
    history: list[Entry] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # server rounds this client trained in

    def with_round(self, entry: Entry) -> list[Entry]:
        """The history as it would be after one more round under ``entry``."""
        return merged([*self.history, entry])

    def to_dict(self, *, accountant: str, delta: float) -> dict:
        return {"version": LEDGER_VERSION, "history": [list(e) for e in merged(self.history)],
                "rounds": list(self.rounds), "accountant": accountant, "delta": delta,
                "epsilon": epsilon_of(self.history, accountant=accountant, delta=delta)}


def merged(history: Iterable[Sequence[float]]) -> list[Entry]:
    """Consecutive entries with the same (noise, rate) folded into one, as Opacus does.

    Canonical form: the same steps give the same epsilon however they were split into rounds.
    """
    out: list[Entry] = []
    for noise, rate, steps in history:
        entry = (float(noise), float(rate), int(steps))
        if entry[2] <= 0:
            continue
        if out and out[-1][:2] == entry[:2]:
            out[-1] = (entry[0], entry[1], out[-1][2] + entry[2])
        else:
            out.append(entry)
    return out


def epsilon_of(history: Iterable[Sequence[float]], *, accountant: str, delta: float) -> float:
    """Cumulative epsilon of ``history`` at ``delta`` with Opacus's ``accountant``.

    0 for an empty history; infinite once any step ran without noise.
    """
    from opacus.accountants import create_accountant

    entries = merged(history)
    if not entries:
        return 0.0
    if any(noise <= 0 for noise, _, _ in entries):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


def load_ledger(state_dir: Path) -> PrivacyLedger:
    """This client's ledger from ``state_dir``; an empty one if it has none yet."""
    path = ledger_path(state_dir)
    if not path.exists():
        return PrivacyLedger()
    try:
        data = json.loads(path.read_text())
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        history = merged(tuple(e) for e in data["history"])
        rounds = [int(r) for r in data["rounds"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{path}: unreadable privacy ledger ({exc}); refusing to start "
                          "a new one, which would silently reset this client's budget") from exc
    return PrivacyLedger(history=history, rounds=rounds)


def save_ledger(ledger: PrivacyLedger, state_dir: Path, *, accountant: str, delta: float) -> Path:
    """Write the ledger atomically (temp file, fsync, rename): a crash leaves the old one."""
    text = json.dumps(ledger.to_dict(accountant=accountant, delta=delta), indent=1)
    return atomic_write(ledger_path(state_dir), lambda fh: fh.write(text.encode()))


def client_delta(configured: float, num_records: int) -> float:
    """``privacy.delta``, or 1/(10 n) for a client holding n records."""
    return configured if configured > 0 else 1.0 / (10 * max(1, num_records))
