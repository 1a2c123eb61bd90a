"""Tables of text examples from files: .csv, .tsv, .jsonl, .parquet (local or any fsspec URI such as s3://),
a ``datasets`` ``save_to_disk`` directory, or a Hugging Face ``datasets`` split read from the local cache.

Every source becomes a list of row dicts, so column checks and error messages are the same for all of them.
Rows are numbered from 1 in the order of the file (a CSV's header line is not a row).
"""

from __future__ import annotations

import csv
import io as _stdio
import json
from typing import Any

from distac import io
from distac.errors import DistacError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


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


def _read_delimited(uri: str, delimiter: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(_stdio.StringIO(_read_text(uri), newline=""), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as exc:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{uri}, line {reader.line_num}: not valid {kind} ({exc})") from None
    if reader.fieldnames is None:
        raise DataError(f"{uri} is empty (no header line)")
    for number, row in enumerate(rows, start=1):
        if None in row:  # more fields than the header names
            raise DataError(f"{uri}, row {number}: {len(reader.fieldnames) + len(row[None])} fields but the header "
                            f"names {len(reader.fieldnames)}")
    return rows


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


def read_rows(uri: str, split: str | None = None, lazy: bool = False) -> Any:
    """The rows of one table file or ``save_to_disk`` directory, each a dict of column → value.

    ``lazy``: a ``save_to_disk`` directory stays a ``datasets.Dataset`` (rows decoded on access, e.g. images).
    """
    uri = str(uri)
    lowered = uri.lower().rstrip("/")
    if lowered.endswith(".csv"):
        return _read_delimited(uri, ",")
    if lowered.endswith(".tsv"):
        return _read_delimited(uri, "\t")
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
