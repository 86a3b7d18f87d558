"""Content checks on local text files before anything trains on them, each failure one
line naming the file and the line: a file that is mostly control characters (a binary
file with a text extension, a wrong encoding), and a CSV whose quoting is broken.

pandas reads both without complaint in the cases that matter: control bytes are valid
UTF-8, and an unterminated quote that a later quote happens to close swallows the rows
in between into one field (``"abc,1`` / ``def,2`` / ``ghi",3`` is one row).
"""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

from fedslm.data.core import DataError

MAX_CONTROL_FRACTION = 0.3  # of the non-whitespace characters
TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")


def _control_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    control = sum(1 for c in chars if unicodedata.category(c) == "Cc" or c == "\ufffd")
    return control / len(chars) if chars else 0.0


def check_control_characters(file: Path, text: str) -> None:
    if _control_fraction(text) <= MAX_CONTROL_FRACTION:
        return
    line = next((n for n, ln in enumerate(text.splitlines(), start=1)
                 if _control_fraction(ln) > MAX_CONTROL_FRACTION), 1)
    raise DataError(f"data.path: {file}:{line}: mostly control characters "
                    f"({_control_fraction(text):.0%} of the file); not text")


def check_csv_quoting(file: Path) -> None:
    """Strict CSV parsing, plus: a quoted field spanning lines that look like rows of
    their own (as many delimiters as the header) is an unterminated quote."""
    with file.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, strict=True)
        start = 0
        try:
            header = next(reader, None) or []
            start = reader.line_num
            for row in reader:
                if reader.line_num - start > 1 and len(header) > 1:
                    inner = [ln for field in row for ln in field.splitlines()[1:]]
                    if any(ln.count(",") >= len(header) - 1 for ln in inner):
                        raise DataError(f"data.path: {file}:{start + 1}: a quote opened here "
                                        f"runs to line {reader.line_num} over lines that look "
                                        "like rows (unterminated quote?)")
                start = reader.line_num
        except csv.Error as err:
            what = "unterminated quote" if "end of data" in str(err) else str(err)
            raise DataError(f"data.path: {file}:{start + 1}: malformed CSV ({what})") from err


def check_text_file(file: Path) -> None:
    """Both checks for a .txt/.jsonl/.csv file; undecodable files are left to the reader."""
    if file.suffix.lower() not in TEXT_SUFFIXES:
        return
    try:
        text = file.read_text("utf-8")
    except (UnicodeDecodeError, OSError):
        return  # the reader reports it, with its own wording
    check_control_characters(file, text)
    if file.suffix.lower() == ".csv":
        check_csv_quoting(file)
