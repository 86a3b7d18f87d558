"""Load client texts from local files or a Hugging Face dataset into one ``Dataset``.

Every loader returns a ``datasets.Dataset`` whose ``text`` column holds the texts (read
from ``data.text_key``) and which keeps all other columns, so ``data.partition_key`` is
there for the partitioner. Local files also get a ``source_file`` column (path relative
to ``data.path``) unless they carry one, so a directory of files can be partitioned
naturally by file. Rows with a missing or blank text are dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa

from fedslm.config import DataConfig
from fedslm.data.core import DataError
from fedslm.data.validate import check_text_file
from fedslm.shared_data import missing_path_hint

SUPPORTED = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
FILE_COLUMN = "source_file"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def load_source(cfg: DataConfig, task: str = "causal_lm") -> datasets.Dataset:
    """The dataset for ``data.source`` text_files or hf, its ``text`` column holding
    ``task``'s records (``fedslm.tasks``)."""
    if cfg.source == "text_files":
        return load_text_files(cfg, task)
    if cfg.source == "hf":
        return load_hf(cfg, task)
    raise DataError(f"data.source: {cfg.source!r} is not a text_files or hf source")


def load_text_files(cfg: DataConfig, task: str = "causal_lm") -> datasets.Dataset:
    """Read ``data.path``: one supported file, or every supported file under a directory."""
    root = Path(cfg.path)
    if not root.exists():
        raise DataError(f"data.path: {root} does not exist{missing_path_hint(root)}")
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED:
            raise DataError(
                f"data.path: {root} has unsupported extension {root.suffix or '(none)'!r}; "
                f"expected one of {', '.join(SUPPORTED)}"
            )
        files = [root]
    else:
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in SUPPORTED and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"data.path: no {'/'.join(SUPPORTED)} files under {root}")
    frames = []
    for file in files:
        if file.suffix.lower() == ".txt" and task != "causal_lm":
            raise DataError(f"data.path: {file} is plain text; task.name={task} needs rows with "
                            "columns (csv, tsv, jsonl, json, parquet)")
        frame = _read_file(file, cfg.text_key if task == "causal_lm" else None)
        if FILE_COLUMN not in frame.columns:
            name = file.name if file == root else file.relative_to(root).as_posix()
            frame[FILE_COLUMN] = name
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    try:
        dataset = datasets.Dataset.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"data.path: files under {root} disagree on column types ({err})") from err
    return _task_records(dataset, cfg, task, where=str(root))


def _task_records(dataset: datasets.Dataset, cfg: DataConfig, task: str, *, where: str) -> datasets.Dataset:
    from fedslm.tasks import get_task

    return get_task(task).dataset_records(dataset, cfg, where=where)


def _read_file(file: Path, text_key: str | None) -> pd.DataFrame:
    """One file as a frame; ``text_key`` (plain-text tasks) must be a column of it."""
    suffix = file.suffix.lower()
    check_text_file(file)
    try:
        if suffix == ".txt":
            paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(file.read_text("utf-8"))]
            return pd.DataFrame({text_key: [p for p in paragraphs if p]}, dtype=object)
        if suffix == ".jsonl":
            frame = pd.DataFrame(_read_jsonl(file, text_key))
        elif suffix == ".json":
            frame = pd.DataFrame(_read_json_array(file, text_key))
        elif suffix in (".csv", ".tsv"):
            frame = pd.read_csv(file, sep="\t" if suffix == ".tsv" else ",",
                                quoting=3 if suffix == ".tsv" else 0)
        else:
            frame = pd.read_parquet(file)
    except UnicodeDecodeError as err:
        raise DataError(f"data.path: {file} is not UTF-8 text ({err.reason})") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, pa.ArrowException, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.path: cannot read {file}: {first_line}") from err
    if text_key is not None and text_key not in frame.columns:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise DataError(f"data.text_key: no column {text_key!r} in {file} (columns: {found})")
    return frame


def _read_json_array(file: Path, text_key: str | None) -> list[dict]:
    """A .json file holding one array of objects (Alpaca's layout)."""
    try:
        records = json.loads(file.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"data.path: {file}:{err.lineno}: malformed JSON ({err.msg})") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"data.path: {file} must hold a JSON array of objects")
    if text_key is not None:
        for number, record in enumerate(records, start=1):
            if text_key not in record:
                raise DataError(f"data.text_key: {file} record {number} has no key {text_key!r}")
    return records


def _read_jsonl(file: Path, text_key: str | None) -> list[dict]:
    records = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"data.path: {file}:{number}: malformed JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DataError(f"data.path: {file}:{number}: expected a JSON object")
            if text_key is not None and text_key not in record:
                raise DataError(f"data.text_key: {file}:{number} has no key {text_key!r}")
            records.append(record)
    return records


def load_hf(cfg: DataConfig, task: str = "causal_lm") -> datasets.Dataset:
    """``load_dataset(hf_name, hf_config or None, split=hf_split)``.

    A local directory written by ``save_to_disk`` is read with ``load_from_disk``
    instead (``load_dataset`` refuses those); any other local directory of data files
    goes through ``load_dataset``'s packaged builders like a hub name.
    """
    local = Path(cfg.hf_name)
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=cfg.hf_split)
    except (OSError, ValueError, ConnectionError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        key = "data.hf_split" if "split" in first_line.lower() else "data.hf_name"
        raise DataError(f"{key}: cannot load {cfg.hf_name!r}: {first_line}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.hf_split not in loaded:
            splits = ", ".join(loaded)
            raise DataError(f"data.hf_split: {cfg.hf_split!r} not in {local} (splits: {splits})")
        loaded = loaded[cfg.hf_split]
    return _task_records(loaded, cfg, task, where=cfg.hf_name)


def text_column(dataset: datasets.Dataset, text_key: str, *, where: str) -> datasets.Dataset:
    """Move ``text_key`` to ``text`` (as strings) and drop rows without text."""
    if text_key not in dataset.column_names:
        found = ", ".join(dataset.column_names) or "none"
        raise DataError(f"data.text_key: no column {text_key!r} in {where} (columns: {found})")
    feature = dataset.features[text_key]
    if getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
        if isinstance(feature, (list, datasets.Sequence)) or type(feature).__name__ in ("List", "LargeList"):
            raise DataError(f"data.text_key: column {text_key!r} in {where} holds lists (chat "
                            "messages?), not text; use task=instruct with data.messages_key")
    if text_key != "text":
        if "text" in dataset.column_names:
            dataset = dataset.remove_columns("text")
        dataset = dataset.rename_column(text_key, "text")
    if getattr(dataset.features["text"], "dtype", None) not in ("string", "large_string"):
        dataset = dataset.cast_column("text", datasets.Value("string"))
    keep = [i for i, text in enumerate(dataset["text"]) if text and text.strip()]
    if len(keep) < len(dataset):  # select() adds an index mapping; writes no cache files
        dataset = dataset.select(keep)
    if len(dataset) == 0:
        raise DataError(f"data.text_key: column {text_key!r} in {where} has no non-empty texts")
    return dataset
