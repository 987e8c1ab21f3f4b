"""Reading user data sets from local CSV and JSON Lines files.

Both forms hold one example per row with a ``text`` and a ``label`` field and optionally a
``client`` field (used by the ``natural`` partitioner). Labels may be strings or integers:
``label_names`` are the sorted distinct values as strings, sorted numerically when every
label is an integer (``"2" < "10"``). Every problem with the file raises
:class:`~fedlora.errors.FedLoraError` naming the file and, where it applies, the line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedlora.data.catalog import TextDataset
from fedlora.data.instruct import read_instruct_jsonl
from fedlora.errors import FedLoraError

__all__ = ["MISSING_LABEL_VALUES", "read_csv", "read_jsonl"]

MISSING_LABEL_VALUES = frozenset({"", "nan", "na", "n/a", "null", "<na>", "#n/a"})
"""Label values (compared case-insensitively, after stripping whitespace) that count as missing."""

_REQUIRED = ("text", "label")


@dataclass
class _Records:
    """Rows collected from a file before labels are encoded."""

    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    columns: dict[str, list[str]] = field(default_factory=dict)


def _read_utf8(path: Path, kind: str) -> str:
    """Read a whole user file as UTF-8 (a byte-order mark is allowed).

    Parameters
    ----------
    path : pathlib.Path
        The file.
    kind : str
        ``"CSV"`` or ``"JSONL"`` (for messages).

    Returns
    -------
    str
        The decoded contents.

    Raises
    ------
    FedLoraError
        If the file is missing, is a directory, cannot be read, is not UTF-8 or is empty.
    """
    if not path.exists():
        raise FedLoraError(f"{kind} file not found: {path.resolve()}; check the path after '{kind.lower()}:'")
    if path.is_dir():
        raise FedLoraError(f"{path} is a directory, not a {kind} file; give the path of the file itself")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FedLoraError(f"cannot read {kind} file {path}: {exc.strerror or exc}") from exc
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FedLoraError(
            f"{path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} cannot be decoded; "
            "save the file as UTF-8 (for example with your editor's 'save with encoding' or iconv)"
        ) from exc
    if not content.strip():
        raise FedLoraError(f"{kind} file {path} is empty; it needs a row per example with a text and a label")
    return content


def _canonical_label(value: object) -> str | None:
    """Turn a raw label into its canonical string, or ``None`` when it is missing.

    Parameters
    ----------
    value : object
        A CSV cell (str) or a JSON value.

    Returns
    -------
    str or None
        ``None`` for a missing value (null, NaN, empty or one of :data:`MISSING_LABEL_VALUES`).

    Raises
    ------
    ValueError
        For a JSON list or object (the caller adds the location).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = value.strip()
        return None if text.lower() in MISSING_LABEL_VALUES else text
    raise ValueError(f"a label must be a string or a number, not a JSON {type(value).__name__}")


def _as_int(label: str) -> int | None:
    """Parse a canonical label as an integer (``"3"``, ``"-1"``, ``"3.0"``), else ``None``."""
    try:
        return int(label)
    except ValueError:
        pass
    try:
        number = float(label)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _build(path: Path, name: str, records: _Records) -> TextDataset:
    """Encode collected rows into a :class:`TextDataset`.

    Parameters
    ----------
    path : pathlib.Path
        The file (for messages).
    name : str
        The spec the data set came from.
    records : _Records
        The rows.

    Returns
    -------
    TextDataset
        The data set.

    Raises
    ------
    FedLoraError
        If there are no rows or fewer than two distinct labels.
    """
    if not records.texts:
        raise FedLoraError(f"{path} has a header but no examples; add rows with a text and a label")
    distinct = sorted(set(records.labels))
    if len(distinct) < 2:
        raise FedLoraError(
            f"{path}: every example has the label {distinct[0]!r}; classification needs at least 2 distinct labels"
        )
    as_ints = {label: _as_int(label) for label in distinct}
    if all(v is not None for v in as_ints.values()):
        values = sorted({v for v in as_ints.values() if v is not None})
        label_names = [str(v) for v in values]
        index_of_value = {v: i for i, v in enumerate(values)}
        index_of = {label: index_of_value[v] for label, v in as_ints.items() if v is not None}
    else:
        label_names = distinct
        index_of = {label: i for i, label in enumerate(distinct)}
    labels = np.fromiter((index_of[label] for label in records.labels), dtype=np.int64, count=len(records.labels))
    return TextDataset(name=name, texts=records.texts, labels=labels, label_names=label_names, columns=records.columns)


def _missing_columns_error(path: Path, found: list[str], what: str, *, jsonl: bool = False) -> FedLoraError:
    missing = [c for c in _REQUIRED if c not in found]
    hints = [f"rename {f!r} to {c!r}" for c in missing for f in found if f.strip().lower() == c]
    hint = f" ({'; '.join(hints)})" if hints else ""
    found_text = ", ".join(repr(f) for f in found) if found else "none"
    return FedLoraError(
        f"{path}: {what} has no {' or '.join(repr(c) for c in missing)} column{hint}; {what} found: {found_text}. "
        "A data file needs a 'text' and a 'label' column (and optionally 'client')"
        + ("; an instruction-tuning JSONL file needs 'instruction' and 'output' (optionally 'input')" if jsonl else "")
    )


def read_csv(path: Path, *, name: str | None = None) -> TextDataset:
    """Read a user data set from a CSV file.

    The file must be UTF-8 (a byte-order mark is allowed), comma-separated, with a header
    row naming the columns; ``text`` and ``label`` are required and ``client`` is optional.
    Fields containing commas, quotes or newlines must be quoted (standard CSV). Blank lines
    are skipped. Texts are kept as written (an empty text is allowed); labels are stripped
    of surrounding whitespace. Every column other than ``text`` and ``label`` is kept in
    ``columns`` as strings. The field size limit of Python's :mod:`csv` module is raised
    so that long texts load.

    Parameters
    ----------
    path : pathlib.Path
        The CSV file.
    name : str, optional
        Name for the data set; defaults to ``"csv:<path>"``.

    Returns
    -------
    TextDataset
        The data set.

    Raises
    ------
    FedLoraError
        If the file is missing, not UTF-8, empty or malformed, lacks a ``text`` or ``label``
        column, has a row with a missing label (``""``, ``NaN``, ``NA``, ``null`` ...) or an
        empty ``client``, or has fewer than two distinct labels.
    """
    path = Path(path)
    content = _read_utf8(path, "CSV")
    _raise_csv_field_limit()
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    header: list[str] | None = None
    records = _Records()
    text_col = label_col = -1
    extra: list[tuple[int, str]] = []
    data_row = 0
    line = 1  # line on which the next record starts
    try:
        for row in reader:
            start, line = line, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                _check_header(path, header)
                text_col, label_col = header.index("text"), header.index("label")
                extra = [(i, col) for i, col in enumerate(header) if col not in _REQUIRED]
                records.columns = {col: [] for _, col in extra}
                continue
            data_row += 1
            where = f"line {start} (data row {data_row})"
            if len(row) != len(header):
                raise FedLoraError(
                    f"{path}, {where}: {len(row)} fields but the header has {len(header)}; "
                    "quote fields that contain commas, quotes or line breaks"
                )
            label = _canonical_label(row[label_col])
            if label is None:
                raise FedLoraError(
                    f"{path}, {where}: the label is empty or NaN ({row[label_col]!r}); "
                    "give every example a label or remove the row"
                )
            records.texts.append(row[text_col])
            records.labels.append(label)
            for i, col in extra:
                value = row[i]
                if col == "client" and not value.strip():
                    raise FedLoraError(
                        f"{path}, {where}: the client is empty; give every row a client id or drop the column"
                    )
                records.columns[col].append(value.strip() if col == "client" else value)
    except csv.Error as exc:
        raise FedLoraError(
            f"{path}: malformed CSV at line {reader.line_num}: {exc}; check the quoting of that line"
        ) from exc
    if header is None:
        raise FedLoraError(f"CSV file {path} is empty; it needs a header row and a row per example")
    return _build(path, name or f"csv:{path}", records)


def _raise_csv_field_limit() -> None:
    """Let :mod:`csv` read fields longer than its default 128 KiB limit."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _check_header(path: Path, header: list[str]) -> None:
    """Check a CSV header for the required and duplicate columns.

    Parameters
    ----------
    path : pathlib.Path
        The file (for messages).
    header : list of str
        Column names, stripped.

    Raises
    ------
    FedLoraError
        If ``text`` or ``label`` is missing or a column name appears twice.
    """
    if any(c not in header for c in _REQUIRED):
        error = _missing_columns_error(path, header, "the header row")
        if len(header) == 1 and any(sep in header[0] for sep in ("\t", ";", "|")):
            raise FedLoraError(f"{error} (the file looks like it is not comma-separated; use commas)")
        raise error
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise FedLoraError(f"{path}: the header names column(s) {duplicates} more than once; rename them")


INSTRUCTION_KEYS = ("instruction", "output")
"""Keys that mark a JSONL file as instruction data (see :func:`fedlora.data.instruct.read_instruct_jsonl`)."""


def _parse_jsonl(path: Path) -> list[tuple[int, dict[str, object]]]:
    """Parse every non-blank line of a JSON Lines file into ``(line number, object)``.

    Raises
    ------
    FedLoraError
        If the file is missing, not UTF-8 or empty, or a line is not one JSON object.
    """
    content = _read_utf8(path, "JSONL")
    objects: list[tuple[int, dict[str, object]]] = []
    for number, raw_line in enumerate(content.split("\n"), start=1):
        text_line = raw_line.strip()
        if not text_line:
            continue
        where = f"line {number}"
        try:
            obj = json.loads(text_line)
        except json.JSONDecodeError as exc:
            hint = (
                "; the file looks like one JSON array: write one object per line instead"
                if number == 1 and text_line.startswith("[")
                else ""
            )
            raise FedLoraError(
                f"{path}, {where}: not valid JSON ({exc.msg} at column {exc.colno}){hint}; "
                'each line must be one JSON object such as {"text": "...", "label": "..."}'
            ) from exc
        if not isinstance(obj, dict):
            raise FedLoraError(
                f"{path}, {where}: a JSON {type(obj).__name__} is not an object; "
                'each line must be one JSON object such as {"text": "...", "label": "..."}'
            )
        objects.append((number, obj))
    return objects


def read_jsonl(path: Path, *, name: str | None = None) -> TextDataset:
    """Read a user data set from a JSON Lines file.

    The file must be UTF-8 with one JSON object per line (blank lines are skipped), each
    with a string ``"text"`` and a ``"label"`` (string or number; integral floats such as
    ``1.0`` count as integers), and optionally ``"client"`` (string or number). If any line
    has a ``"client"``, every line must. Other keys that every line has with a string,
    number or boolean value are kept in ``columns`` as strings; other keys are ignored.

    A file whose first object has ``"instruction"`` or ``"output"`` and neither ``"text"``
    nor ``"label"`` is instruction data: it is read by
    :func:`fedlora.data.instruct.read_instruct_jsonl` instead.

    Parameters
    ----------
    path : pathlib.Path
        The JSONL file.
    name : str, optional
        Name for the data set; defaults to ``"jsonl:<path>"``.

    Returns
    -------
    TextDataset
        The data set.

    Raises
    ------
    FedLoraError
        If the file is missing, not UTF-8 or empty, a line is not valid JSON or not an
        object, an object lacks ``"text"`` or ``"label"``, a text is not a string, a label is
        null, NaN or empty, the ``"client"`` key is missing on some lines, or there are fewer
        than two distinct labels.
    """
    path = Path(path)
    objects = _parse_jsonl(path)
    first = objects[0][1]
    if "text" not in first and "label" not in first and any(key in first for key in INSTRUCTION_KEYS):
        return read_instruct_jsonl(path, objects, name=name or f"jsonl:{path}")
    records = _Records()
    extras: list[dict[str, str]] = []
    common_keys: set[str] | None = None
    client_lines: list[int] = []
    lines_seen: list[int] = []
    for number, obj in objects:
        where = f"line {number}"
        if any(key not in obj for key in _REQUIRED):
            raise _missing_columns_error(path, list(obj), f"the object on {where}", jsonl=True)
        text = obj["text"]
        if not isinstance(text, str):
            raise FedLoraError(
                f'{path}, {where}: "text" must be a string, got {json.dumps(text)[:40]}; quote it or remove the line'
            )
        try:
            label = _canonical_label(obj["label"])
        except ValueError as exc:
            raise FedLoraError(f"{path}, {where}: {exc}") from exc
        if label is None:
            raise FedLoraError(
                f"{path}, {where}: the label is empty, null or NaN ({json.dumps(obj['label'])}); "
                "give every example a label or remove the line"
            )
        lines_seen.append(number)
        records.texts.append(text)
        records.labels.append(label)
        row_extra: dict[str, str] = {}
        for key, value in obj.items():
            if key in _REQUIRED:
                continue
            if key == "client":
                client_lines.append(number)
                client = _canonical_label(value) if isinstance(value, (str, int, float)) else None
                if client is None:
                    raise FedLoraError(
                        f'{path}, {where}: "client" must be a non-empty string or number, got '
                        f"{json.dumps(value)[:40]}; give every line a client id or drop the key"
                    )
                row_extra[key] = client
            elif isinstance(value, (str, int, float)) and not (isinstance(value, float) and math.isnan(value)):
                row_extra[key] = value if isinstance(value, str) else json.dumps(value)
        extras.append(row_extra)
        common_keys = set(row_extra) if common_keys is None else common_keys & set(row_extra)
    if client_lines and len(client_lines) != len(lines_seen):
        have = set(client_lines)
        first_missing = next(n for n in lines_seen if n not in have)
        raise FedLoraError(
            f'{path}, line {first_missing}: no "client" key, but other lines have one; '
            "give every line a client id or none"
        )
    for key in sorted(common_keys or set()):
        records.columns[key] = [row[key] for row in extras]
    return _build(path, name or f"jsonl:{path}", records)
