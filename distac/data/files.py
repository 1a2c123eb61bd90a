"""Tables of text examples from files: .csv, .tsv, .jsonl, .parquet (local or any fsspec URI such as s3://),
a ``datasets`` ``save_to_disk`` directory, or a Hugging Face ``datasets`` split read from the local cache.

Every source becomes a list of row dicts, so column checks and error messages are the same for all of them.
Rows are numbered from 1 in the order of the file (a CSV's header line is not a row).

Quoting of .csv/.tsv files (``quoting``): ``standard`` (a field may be enclosed in ``"``, a ``"`` inside it
doubled: what spreadsheet and pandas CSV writers produce) or ``none`` (every ``"`` is text). The default is
``standard`` for .csv and ``none`` for .tsv: tab-separated text needs no quotes, and quote marks at the start of
a text are common there (GLUE's own files are read the same way). Where standard quoting meets a field that
starts with ``"`` but is not a quoted field (``"Great," she said.``: the text itself starts with a quote mark),
it drops those quote marks (and may join lines up to the next one) with a warning naming the line.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import logging
from typing import Any, Literal, get_args

from distac import io
from distac.errors import DistacError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
Quoting = Literal["standard", "none"]
QUOTING: tuple[str, ...] = get_args(Quoting)
DEFAULT_QUOTING: dict[str, Quoting] = {".csv": "standard", ".tsv": "none"}
"""The quoting a delimited file is read with when its data spec gives none."""


class DataError(DistacError):
    """A data file is missing, unreadable, or its rows do not fit the task's columns."""


def is_dataset_dir(uri: str) -> bool:
    """Whether ``uri`` is a directory written by ``datasets`` ``save_to_disk`` (one split or a DatasetDict)."""
    fs, path = io.url_to_fs(uri)
    return fs.isdir(path) and (fs.exists(f"{path}/state.json") or fs.exists(f"{path}/dataset_dict.json"))


def _read_text(uri: str) -> str:
    fs, path = io.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise DataError(f"data file not found: {uri}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri} is not UTF-8 text ({exc})") from None


class _StrayQuote(Exception):
    """Strict standard quoting stopped at ``line``: a quote mark that does not enclose a whole field."""

    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


def _parse_delimited(uri: str, text: str, delimiter: str, quoting: Quoting, strict: bool
                     ) -> tuple[csv.DictReader, list[dict[str, Any]]]:
    """The header reader and the rows; ``strict`` raises _StrayQuote where a quote mark does not enclose a
    whole field, otherwise a malformed file is a DataError naming the line."""
    reader = csv.DictReader(_stdio.StringIO(text, newline=""), delimiter=delimiter, strict=strict,
                            quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
    try:
        return reader, list(reader)
    except csv.Error as exc:
        if strict:
            raise _StrayQuote(reader.reader.line_num) from None
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{uri}, line {reader.reader.line_num}: not valid {kind} ({exc})") from None


def _read_delimited(uri: str, delimiter: str, quoting: Quoting | None) -> list[dict[str, Any]]:
    suffix = ".tsv" if delimiter == "\t" else ".csv"
    quoting = quoting or DEFAULT_QUOTING[suffix]
    if quoting not in QUOTING:
        raise DataError(f"{uri}: unknown quoting {quoting!r} (expected one of {', '.join(QUOTING)})")
    text = _read_text(uri)
    try:  # strict first: it stops where a quote mark does not enclose a whole field (a text starting with ")
        reader, rows = _parse_delimited(uri, text, delimiter, quoting, strict=quoting == "standard")
    except _StrayQuote as stray:
        log.warning("%s, line %d: a field starts with a quote mark (\") that does not enclose the whole field; "
                    "standard quoting drops such quote marks and may join lines up to the next one. If the quote "
                    "marks are part of the text, give the task's data spec `quoting: none`", uri, stray.line)
        reader, rows = _parse_delimited(uri, text, delimiter, quoting, strict=False)
    if reader.fieldnames is None:
        raise DataError(f"{uri} is empty (no header line)")
    for number, row in enumerate(rows, start=1):
        if None in row:  # more fields than the header names
            fields = [value for key, value in row.items() if key is not None] + row[None]
            hint = " (quoted fields? give the data spec `quoting: standard`)" if quoting == "none" and \
                any('"' in str(value) for value in fields) else ""
            raise DataError(f"{uri}, row {number}: {len(reader.fieldnames) + len(row[None])} fields but the header "
                            f"names {len(reader.fieldnames)}{hint}")
    if quoting == "none":
        _warn_if_quoted(uri, rows)
    return rows


def _warn_if_quoted(uri: str, rows: list[dict[str, Any]]) -> None:
    """Warn when a field read with ``quoting: none`` looks written by a CSV writer (``"…""…"``: enclosed in
    quote marks, a quote mark inside doubled): its quote marks are then kept as text."""
    for number, row in enumerate(rows, start=1):
        if any(len(v) > 2 and v[0] == v[-1] == '"' and '""' in v[1:-1] for v in row.values() if isinstance(v, str)):
            log.warning("%s, row %d: a field looks quoted by a CSV writer (\"…\"\"…\"); with quoting none its "
                        "quote marks stay in the text. If the file was written with standard quoting, give the task's "
                        "data spec `quoting: standard`", uri, number)
            return


def _read_jsonl(uri: str) -> list[dict[str, Any]]:
    rows = []
    for line_number, line in enumerate(_read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{uri}, line {line_number}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{uri}, line {line_number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_parquet(uri: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    fs, path = io.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle).to_pylist()
    except FileNotFoundError:
        raise DataError(f"data file not found: {uri}") from None
    except Exception as exc:  # pyarrow raises its own error types for a broken file
        raise DataError(f"{uri} is not a readable Parquet file ({exc})") from None


def _datasets_module():
    try:
        import datasets
    except ImportError:
        raise DataError("reading a `datasets` directory or hub dataset needs the `datasets` package "
                        "(pip install 'distac[data]')") from None
    datasets.disable_progress_bars()
    return datasets


def open_dataset_dir(uri: str, split: str | None = None) -> Any:
    """A ``datasets.Dataset`` from a ``save_to_disk`` directory; a DatasetDict needs ``split``."""
    datasets = _datasets_module()
    try:
        loaded = datasets.load_from_disk(uri)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"cannot read the datasets directory {uri} ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise DataError(f"{uri} is a DatasetDict with splits {sorted(loaded)}; name one of them "
                            f"(got {split!r})")
        loaded = loaded[split]
    elif split is not None and split != "train" and split != loaded.split:
        raise DataError(f"{uri} holds a single split; it has no split {split!r}")
    return loaded


def open_hub_split(dataset: str, config: str | None, split: str) -> Any:
    """One split of a Hugging Face hub dataset, from the local ``datasets`` cache when the hub is offline."""
    datasets = _datasets_module()
    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        where = f"{dataset}" + (f" (config {config!r})" if config else "")
        raise DataError(f"cannot load split {split!r} of the hub dataset {where}: {exc}") from None


def read_dataset_dir(uri: str, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a ``save_to_disk`` directory."""
    return open_dataset_dir(uri, split).to_list()


def class_label_names(table: Any, column: str) -> list[str] | None:
    """The names of a ``datasets`` ClassLabel column (None for plain rows or another feature type)."""
    names = getattr(getattr(table, "features", {}).get(column), "names", None)
    return [str(name) for name in names] if names else None


def column_names(table: Any) -> list[str]:
    if hasattr(table, "column_names"):
        return list(table.column_names)
    return list(table[0]) if table else []


def read_rows(uri: str, split: str | None = None, lazy: bool = False, quoting: Quoting | None = None) -> Any:
    """The rows of one table file or ``save_to_disk`` directory, each a dict of column → value.

    ``lazy``: a ``save_to_disk`` directory stays a ``datasets.Dataset`` (rows decoded on access, e.g. images).
    ``quoting``: of a .csv/.tsv file (``standard`` or ``none``; default ``DEFAULT_QUOTING``); other formats
    ignore it.
    """
    uri = str(uri)
    lowered = uri.lower().rstrip("/")
    if lowered.endswith(".csv"):
        return _read_delimited(uri, ",", quoting)
    if lowered.endswith(".tsv"):
        return _read_delimited(uri, "\t", quoting)
    if lowered.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(uri)
    if lowered.endswith(".parquet"):
        return _read_parquet(uri)
    if is_dataset_dir(uri):
        return open_dataset_dir(uri, split) if lazy else read_dataset_dir(uri, split)
    fs, path = io.url_to_fs(uri)
    if not fs.exists(path):
        raise DataError(f"data file not found: {uri}")
    raise DataError(f"{uri}: unknown data format (expected {', '.join(TABLE_SUFFIXES)} or a `datasets` "
                    "save_to_disk directory)")


def check_columns(rows: Any, columns: dict[str, str | None], source: str) -> None:
    """Every named column (field → column) exists; the error lists the columns there are."""
    if not len(rows):
        return
    present = column_names(rows)
    for field, column in columns.items():
        if column is not None and column not in present:
            raise DataError(f"{source}: no column {column!r} (the {field} column); it has {present}")
