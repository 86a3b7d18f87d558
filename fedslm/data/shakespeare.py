"""Shakespeare by speaker, the LEAF federated language-modelling benchmark.

tinyshakespeare.txt is blocks of a ``SPEAKER:`` line and the speech, with a blank line
between blocks (a block that does not start with a speaker line continues the previous
speech). Every speaker with at least ``data.min_lines`` speech lines is a candidate
client; client i is the i-th of them by line count (ties by name). As in LEAF, each
speaker's lines in play order are cut once: the first ``1 - test_fraction`` are train,
the rest test. A record is one speech block (its lines joined by newlines), or the part
of it on one side of the cut. Speaker names are not unique across plays
("First Citizen"); like the file, we merge them.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import datasets

from fedslm.config import DataConfig
from fedslm.data.core import (
    ClientSplit,
    DataError,
    FederatedTexts,
    check_client_split,
    num_test,
    sample_central_test,
)
from fedslm.data.partition import natural_partitions
from fedslm.shared_data import missing_path_hint

Speech = tuple[str, tuple[str, ...]]  # (speaker, non-empty lines)


def parse_speeches(path: str | Path) -> list[Speech]:
    """Speech blocks in file order; a speaker line with no speech gives an empty block."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist{missing_path_hint(path)}")
    speeches: list[Speech] = []
    for block in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if lines[0].endswith(":"):
            speeches.append((lines[0][:-1].strip(), tuple(lines[1:])))
        elif speeches:
            speaker, previous = speeches[-1]
            speeches[-1] = (speaker, previous + tuple(lines))
    if not speeches:
        raise DataError(f"data.path: {path} has no 'SPEAKER:' lines")
    return speeches


def _line_counts(speeches: list[Speech]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for speaker, lines in speeches:
        counts[speaker] += len(lines)
    return dict(counts)


def _eligible(counts: dict[str, int], min_lines: int) -> list[str]:
    return sorted((s for s, n in counts.items() if n >= min_lines), key=lambda s: (-counts[s], s))


def speaker_line_counts(path: str | Path) -> dict[str, int]:
    """Speech lines per speaker (speakers in order of first appearance)."""
    return _line_counts(parse_speeches(path))


def eligible_speakers(path: str | Path, min_lines: int) -> list[str]:
    """Speakers with at least ``min_lines`` lines, most lines first, ties by name."""
    return _eligible(speaker_line_counts(path), min_lines)


def speaker_records(
    speeches: list[Speech], speakers: list[str], test_fraction: float
) -> datasets.Dataset:
    """Records (text, speaker, split) for ``speakers``, cut per speaker into train | test."""
    wanted = set(speakers)
    lines_of: dict[str, list[tuple[int, str]]] = {s: [] for s in speakers}
    for block, (speaker, lines) in enumerate(speeches):
        if speaker in wanted:
            lines_of[speaker] += [(block, line) for line in lines]
    rows: dict[str, list[str]] = {"text": [], "speaker": [], "split": []}
    for speaker, numbered in lines_of.items():
        cut = len(numbered) - num_test(len(numbered), test_fraction)
        for start, stop, split in ((0, cut, "train"), (cut, len(numbered), "test")):
            groups: dict[int, list[str]] = {}
            for block, line in numbered[start:stop]:
                groups.setdefault(block, []).append(line)
            for group in groups.values():
                rows["text"].append("\n".join(group))
                rows["speaker"].append(speaker)
                rows["split"].append(split)
    return datasets.Dataset.from_dict(rows)


def build_shakespeare(cfg: DataConfig, *, num_clients: int) -> FederatedTexts:
    """The ``num_clients`` speakers with most lines; central test = round-robin test sample."""
    speeches = parse_speeches(cfg.path)
    speakers = _eligible(_line_counts(speeches), cfg.min_lines)
    if num_clients > len(speakers):
        raise DataError(
            f"federation.num_clients: {num_clients} clients but only {len(speakers)} speakers "
            f"have >= {cfg.min_lines} lines (data.min_lines) in {cfg.path}"
        )
    records = speaker_records(speeches, speakers, cfg.test_fraction)
    clients = []
    for i, part in enumerate(natural_partitions(records, "speaker", speakers[:num_clients])):
        texts, splits = part["text"], part["split"]
        split = ClientSplit(
            train=tuple(t for t, s in zip(texts, splits) if s == "train"),
            test=tuple(t for t, s in zip(texts, splits) if s == "test"),
        )
        hint = "raise data.min_lines or use fewer clients (federation.num_clients)"
        clients.append(check_client_split(i, split, hint=hint))
    central_test = sample_central_test(clients)
    return FederatedTexts(clients=tuple(clients), public=(), central_test=central_test)
