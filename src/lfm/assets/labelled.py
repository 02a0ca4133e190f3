"""Your own labelled texts: a JSON-lines file, or a CSV file (by its `.csv` suffix) with a header
row, one example per line.

    texts, labels = read_labelled("mine.jsonl", text_field="text", label_field="label")

Every problem (an unreadable file, a line that is not JSON or has the wrong number of CSV fields,
a missing field, no example at all) is one `ConfigError` line naming the file and line, raised
before any model loads. `lfm tuning` and `lfm reuse ensemble` read `--data` files with it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lfm.errors import ConfigError


def read_labelled(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> tuple[list[str], list[str]]:
    """The texts and labels (as strings) of a JSON-lines file, or of a CSV file (by its `.csv`
    suffix) with a header row; a bad line, a missing field or an empty file is a one-line
    `ConfigError` naming the line."""
    path = Path(path)
    texts, labels = [], []
    for line, row in _rows(path):
        for name in (text_field, label_field):
            _need(path, line, row, name)
        texts.append(str(row[text_field]))
        labels.append(str(row[label_field]).strip())
    return texts, labels


def read_texts(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> tuple[list[str], list[str] | None]:
    """The texts of a JSON-lines or CSV file (as `read_labelled` reads them) and their labels
    when the first line has `label_field` (then every line needs it), else None."""
    path = Path(path)
    rows = _rows(path)
    labelled = _filled(rows[0][1], label_field)
    texts, labels = [], []
    for line, row in rows:
        _need(path, line, row, text_field)
        texts.append(str(row[text_field]))
        if labelled:
            _need(path, line, row, label_field)
            labels.append(str(row[label_field]).strip())
    return texts, labels if labelled else None


def _rows(path: Path) -> list[tuple[int, dict]]:
    """The (line number, fields) of each example of a JSON-lines or CSV file; at least one."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the data file {path}: {e}") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else json_lines(path, text)
    if not rows:
        raise ConfigError(f"{path} holds no examples")
    return rows


def _filled(row: dict, name: str) -> bool:
    return name in row and row[name] is not None and str(row[name]).strip() != ""


def _need(path: Path, line: int, row: dict, name: str) -> None:
    if not _filled(row, name):
        raise ConfigError(f"{path}, line {line}: no {name!r} field (fields: {sorted(row)})")


def json_lines(path: str | Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines text read from `path`; a line
    that is not a JSON object is a one-line `ConfigError` naming it."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{path}, line {i}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {i}: not a JSON object")
        rows.append((i, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    try:
        for row in reader:
            # a short row fills its missing fields with None; a long one puts the rest under None
            if None in row or None in row.values():
                n = sum(v is not None for k, v in row.items() if k is not None)
                raise ConfigError(
                    f"{path}, line {reader.line_num}: {n + len(row.get(None) or ())} fields "
                    f"where the header has {len(reader.fieldnames or ())}"
                )
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise ConfigError(f"{path}, line {reader.line_num}: not CSV ({e})") from None
    return rows
