"""Local-file and Hugging Face loaders: exact records, kept columns, one-line errors by key."""

from __future__ import annotations

import datasets
import pandas as pd
import pytest

from fedslm.config import DataConfig
from fedslm.data import DataError
from fedslm.data.sources import load_source


def files_cfg(path, **overrides) -> DataConfig:
    return DataConfig(source="text_files", path=str(path), **overrides)


def hf_cfg(name, **overrides) -> DataConfig:
    return DataConfig(source="hf", hf_name=str(name), **overrides)


def test_txt_gives_one_record_per_non_empty_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\n\n  \nnext para\n\n")
    ds = load_source(files_cfg(tmp_path / "a.txt"))
    assert ds.to_list() == [
        {"text": "first line\nsecond line", "source_file": "a.txt"},
        {"text": "next para", "source_file": "a.txt"},
    ]


def test_jsonl_reads_text_key_and_keeps_other_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one", "user": "u1"}\n\n{"body": "two", "user": "u2"}\n')
    ds = load_source(files_cfg(tmp_path / "a.jsonl", text_key="body"))
    assert ds["text"][:] == ["one", "two"] and ds["user"][:] == ["u1", "u2"]
    assert "body" not in ds.column_names


def test_csv_and_parquet_read_the_text_column_and_drop_blank_texts(tmp_path):
    pd.DataFrame({"body": ["c1", "", "c3"], "label": [0, 1, 1]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"body": ["p1", "  ", "p3"], "label": [2, 2, 3]}).to_parquet(tmp_path / "b.parquet")
    csv = load_source(files_cfg(tmp_path / "a.csv", text_key="body"))
    assert csv.to_list() == [
        {"text": "c1", "label": 0, "source_file": "a.csv"},
        {"text": "c3", "label": 1, "source_file": "a.csv"},
    ]
    parquet = load_source(files_cfg(tmp_path / "b.parquet", text_key="body"))
    assert parquet["text"][:] == ["p1", "p3"] and parquet["label"][:] == [2, 3]


def test_directory_is_read_recursively_in_sorted_path_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("t1\n\nt2")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "j1", "user": "u"}\n')
    (tmp_path / "a.csv").write_text("text,user\nc1,v\n")
    (tmp_path / "notes.md").write_text("ignored: not a supported extension")
    ds = load_source(files_cfg(tmp_path))
    assert ds["text"][:] == ["c1", "t1", "t2", "j1"]
    assert ds["source_file"][:] == ["a.csv", "b.txt", "b.txt", "sub/a.jsonl"]
    assert ds["user"][:] == ["v", None, None, "u"]


@pytest.mark.parametrize(
    ("make", "text_key", "message"),
    [
        (lambda p: p / "missing", "text", r"^data\.path: .*missing does not exist$"),
        (lambda p: p, "text", r"^data\.path: no \.txt/\.jsonl/\.json/\.csv/\.tsv/\.parquet files under "),
        (lambda p: write(p / "a.md", "x"), "text", r"^data\.path: .*a\.md has unsupported extension '\.md'"),
        (lambda p: write(p / "a.jsonl", '{"text": "ok"}\n{"text": oops}\n'), "text",
         r"^data\.path: .*a\.jsonl:2: malformed JSON"),
        (lambda p: write(p / "a.jsonl", '{"text": "ok"}\n{"body": "x"}\n'), "text",
         r"^data\.text_key: .*a\.jsonl:2 has no key 'text'$"),
        (lambda p: write(p / "a.csv", "body,user\nx,y\n"), "text",
         r"^data\.text_key: no column 'text' in .*a\.csv \(columns: body, user\)$"),
        (lambda p: write(p / "a.csv", "body\n\n"), "body",
         r"^data\.text_key: column 'body' in .* has no non-empty texts$"),
    ],
    ids=["path-missing", "no-supported-files", "unsupported-extension", "malformed-jsonl",
         "jsonl-record-without-key", "missing-text-column", "no-texts"],
)
def test_file_errors_name_the_key_and_file(tmp_path, make, text_key, message):
    (tmp_path / "empty").mkdir()
    target = make(tmp_path / "empty")
    with pytest.raises(DataError, match=message) as err:
        load_source(files_cfg(target, text_key=text_key))
    assert "\n" not in str(err.value)


def write(path, text: str):
    path.write_text(text)
    return path


def test_hf_reads_a_saved_dataset_and_a_dataset_dict_split(tmp_path):
    datasets.Dataset.from_dict({"body": ["a", "b"], "k": [1, 2]}).save_to_disk(tmp_path / "one")
    ds = load_source(hf_cfg(tmp_path / "one", text_key="body"))
    assert ds.to_list() == [{"k": 1, "text": "a"}, {"k": 2, "text": "b"}]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["tr"]}),
         "test": datasets.Dataset.from_dict({"text": ["te"]})}
    )
    splits.save_to_disk(tmp_path / "dict")
    assert load_source(hf_cfg(tmp_path / "dict", hf_split="test"))["text"][:] == ["te"]
    with pytest.raises(DataError, match=r"^data\.hf_split: 'dev' not in .*\(splits: train, test\)$"):
        load_source(hf_cfg(tmp_path / "dict", hf_split="dev"))


def test_hf_goes_through_load_dataset_for_a_folder_of_data_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "folder").mkdir()
    lines = '{"body": "x1", "user": "a"}\n{"body": "x2", "user": "b"}\n'
    (tmp_path / "folder" / "train.jsonl").write_text(lines)
    ds = load_source(hf_cfg(tmp_path / "folder", text_key="body"))
    assert ds.to_list() == [{"text": "x1", "user": "a"}, {"text": "x2", "user": "b"}]
    with pytest.raises(DataError, match=r"^data\.hf_split: cannot load .*Unknown split \"validation\""):
        load_source(hf_cfg(tmp_path / "folder", text_key="body", hf_split="validation"))
    message = r"^data\.text_key: no column 'text' in .*folder \(columns: body, user\)$"
    with pytest.raises(DataError, match=message):
        load_source(hf_cfg(tmp_path / "folder"))
