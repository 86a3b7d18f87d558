"""A device's own texts: the files under its ``data-path``, split into train and test.

On a real device the ClientApp trains on local files instead of a partition of a
simulated corpus. The files are read by the same loader as ``data.source=text_files``
(.txt paragraphs, .jsonl/.csv/.parquet rows with ``data.text_key``), so a directory
that works in simulation works on a device, and the agent checks it the same way before
it connects.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fedslm.data.core import ClientSplit, DataError, split_train_test

SUPPORTED = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")  # = sources.SUPPORTED


def fingerprint(path: str) -> tuple:
    """Names, sizes and mtimes of the supported files: changes when the data changes."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def local_split(path: str, *, text_key: str = "text", test_fraction: float, seed: int,
                task: str = "causal_lm", data=None) -> ClientSplit:
    """Train/test split of every record under ``path`` in ``task``'s format (columns named
    by ``data``, a DataConfig, when given); DataError names what is wrong."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data-path: {root} does not exist")
    from fedslm.config import DataConfig
    from fedslm.data.federated import config_key

    data = data or DataConfig(text_key=text_key)
    return _cached(str(root), config_key(data), task, test_fraction, seed, fingerprint(str(root)))


@functools.lru_cache(maxsize=2)
def _cached(path: str, data_key: tuple, task: str, test_fraction: float, seed: int,
            _stamp: tuple) -> ClientSplit:
    import dataclasses

    from fedslm.config import DataConfig
    from fedslm.data.sources import load_text_files

    data = DataConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in data_key})
    try:
        dataset = load_text_files(dataclasses.replace(data, source="text_files", path=path), task)
    except DataError as err:  # same checks as data.source=text_files, named for a device
        raise DataError(str(err).replace("data.path: ", "data-path: ", 1)) from err
    except OSError as err:
        raise DataError(f"data-path: cannot read {err.filename or path} ({err.strerror})") from err
    texts = list(dataset["text"])
    if len(texts) < 2:
        raise DataError(f"data-path: {path} holds {len(texts)} text(s); need at least 2 "
                        "(some to train on, at least one to evaluate)")
    return split_train_test(texts, test_fraction, seed=seed)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedslm.data.local PATH [--task T]``: print how many records PATH holds, or the problem.

    The device agent runs this check in a child process: reading files pulls in pandas and
    datasets, memory the long-lived agent should not keep while the device trains.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    task = "causal_lm"
    if len(args) == 3 and args[1] == "--task":
        args, task = args[:1], args[2]
    if len(args) != 1:
        print("usage: python -m fedslm.data.local PATH [--task causal_lm|instruct|classify]",
              file=sys.stderr)
        return 2
    try:
        split = local_split(args[0], text_key="text", test_fraction=0.2, seed=0, task=task)
    except DataError as err:
        print(str(err), file=sys.stderr)
        return 2
    print(len(split.train) + len(split.test))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
