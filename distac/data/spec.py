"""A task's data described by files or a ``datasets`` dataset instead of a built-in name: ``DataSpec``.

```python
spec = DataSpec(train="data/reviews_train.csv", test="data/reviews_test.csv", text="review", label="stars")
task = load_task_data("reviews", spec)          # a TaskData, like load_task("sst2")
```

Labels may be strings or integers (a CSV column whose every value is an integer is read as integers). Class
names are ``class_names`` when given (a fine-tuned checkpoint's ``id2label`` is passed the same way), else
the sorted distinct training labels; class i is the i-th name. Every label of the validation and test
splits must be one of them. ``unlabeled`` replaces the training inputs DisTaC conditions on: a file of
inputs (labels not needed) or ``{from_task: other}``, another task's training inputs (surrogate data).

``quoting`` says how .csv/.tsv files are read (``distac.data.files``): ``standard`` (fields may be enclosed in
``"``; the default for .csv) or ``none`` (every ``"`` is text; the default for .tsv). For a causal LM's
prompt/completion pairs, ``prompt`` and ``completion`` are other names of ``text`` and ``label``.
``TaskData.rows`` records, per split, the rows read and the rows used after ``max_train``/``max_eval``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distac.data.examples import DatasetView, TaskData, TextExample, split_off, subsampled_task
from distac.data.files import (DataError, Quoting, check_columns, class_label_names, is_dataset_dir,
                               open_dataset_dir, open_hub_split, read_rows)

SPLITS = ("train", "validation", "test")
ALIASES = {"prompt": "text", "completion": "label"}
"""Other names of a spec's columns: a causal LM's prompt is its ``text``, the completion its ``label``."""
DELIMITED = (".csv", ".tsv")


def _renamed(values: Any, aliases: Mapping[str, str]) -> Any:
    """``values`` with each alias key renamed to its field; giving both names is an error."""
    if not isinstance(values, Mapping):
        return values
    for alias, name in aliases.items():
        if alias in values:
            if name in values:
                raise ValueError(f"give `{name}` or `{alias}` (another name of it), not both")
            values = {**{k: v for k, v in values.items() if k != alias}, name: values[alias]}
    return values


def _is_delimited(uri: str | None) -> bool:
    return uri is not None and str(uri).lower().rstrip("/").endswith(DELIMITED)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnlabeledSpec(_Spec):
    """Inputs without labels for DisTaC: a file (``path``) or another task's training inputs (``from_task``)."""

    path: str | None = None
    from_task: str | None = None
    text: str | None = Field(None, description="text column of `path` (default: the task's `text`)")
    text_pair: str | None = Field(None, description="second-sentence column of `path` (default: the task's)")
    quoting: Quoting | None = Field(None, description="of a .csv/.tsv `path` (default: the task's, else the "
                                                      "format's)")

    @model_validator(mode="after")
    def _one_source(self) -> "UnlabeledSpec":
        if (self.path is None) == (self.from_task is None):
            raise ValueError("unlabeled: give exactly one of `path` and `from_task`")
        if self.from_task is not None and (self.text or self.text_pair or self.quoting):
            raise ValueError("unlabeled: `text`/`text_pair`/`quoting` apply to `path` only, not to `from_task`")
        if self.quoting is not None and not _is_delimited(self.path):
            raise ValueError(f"unlabeled: `quoting` applies to .csv/.tsv files, not to {self.path}")
        return self


class DataSpec(_Spec):
    """Where a task's examples are and which columns hold them.

    Files: ``train``/``test`` (required) and ``validation`` (optional: otherwise a seeded hold-out of train),
    each a .csv/.tsv/.jsonl/.parquet file (local or s3://) or a ``save_to_disk`` directory of one split.
    Or ``dataset``: a ``save_to_disk`` DatasetDict directory or a Hugging Face hub id (read from the local
    cache), with ``config`` and the split names in ``splits``. ``quoting``: how the .csv/.tsv files (the
    unlabeled one too) are read: ``standard`` or ``none``; default ``standard`` for .csv, ``none`` for .tsv.
    ``prompt``/``completion`` are accepted for ``text``/``label``.
    """

    train: str | None = None
    test: str | None = None
    validation: str | None = None
    dataset: str | None = None
    config: str | None = None
    splits: dict[str, str] = Field(default_factory=lambda: {"train": "train", "test": "test"})
    text: str = "text"
    text_pair: str | None = None
    image: str | None = Field(None, description="image column (an image task): `datasets` Image features, or "
                                                "paths relative to the table file")
    label: str = "label"
    class_names: list[str] | None = None
    unlabeled: UnlabeledSpec | None = None
    quoting: Quoting | None = Field(None, description="of .csv/.tsv files: standard (default for .csv) or none "
                                                      "(default for .tsv)")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        values = _renamed(values, ALIASES)
        if isinstance(values, Mapping) and isinstance(values.get("unlabeled"), (str, os.PathLike)):
            values = {**values, "unlabeled": {"path": str(values["unlabeled"])}}
        return values

    @model_validator(mode="after")
    def _sources(self) -> "DataSpec":
        if self.dataset is None:
            missing = [name for name in ("train", "test") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"data: {' and '.join(missing)} missing (give the files, or `dataset`)")
        else:
            given = [name for name in SPLITS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"data: give `dataset` with `splits`, or files, not both (got {given})")
            unknown = sorted(set(self.splits) - set(SPLITS))
            if unknown or not {"train", "test"} <= set(self.splits):
                raise ValueError(f"data.splits needs 'train' and 'test' (and optionally 'validation'), "
                                 f"got {sorted(self.splits)}")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"data.class_names has duplicates: {self.class_names}")
        files = [getattr(self, name) for name in SPLITS] + [self.unlabeled.path if self.unlabeled else None]
        if self.quoting is not None and not any(map(_is_delimited, files)):
            raise ValueError(f"data.quoting applies to .csv/.tsv files; this spec reads none "
                             f"({self.dataset or ', '.join(f for f in files if f)})")
        return self


def parse_data_spec(raw: Any, where: str = "data") -> DataSpec:
    """A DataSpec from a mapping (params.yaml's ``data:``, a spec file); errors name ``where`` and the field."""
    if isinstance(raw, DataSpec):
        return raw
    try:
        return DataSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'data'}: {e['msg']}" for e in exc.errors())
        raise DataError(f"{where}: invalid data spec ({problems})") from None


# --------------------------------------------------------------------------------------------- rows → examples


def _split_table(spec: DataSpec, split: str) -> tuple[Any, str] | None:
    """(rows or a lazy ``datasets.Dataset``, source name) of one split, or None when the spec does not give it."""
    if spec.dataset is None:
        uri = getattr(spec, split)
        return None if uri is None else (read_rows(uri, lazy=True, quoting=spec.quoting), uri)
    name = spec.splits.get(split)
    if name is None:
        return None
    if is_dataset_dir(spec.dataset):
        return open_dataset_dir(spec.dataset, name), f"{spec.dataset} (split {name!r})"
    source = f"hub dataset {spec.dataset}" + (f"/{spec.config}" if spec.config else "") + f" (split {name!r})"
    return open_hub_split(spec.dataset, spec.config, name), source


def _rows(table: Any) -> list[dict[str, Any]]:
    return table.to_list() if hasattr(table, "to_list") else table


class _ImageTable:
    """(image, label) per row, the image decoded (or opened from its path) only on access: what a lazy
    ``DatasetView`` reads, so a large image set is never decoded up front."""

    def __init__(self, table: Any, column: str, labels: list[int], base: str | None):
        self.table, self.column, self.labels, self.base = table, column, labels, base

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        value = self.table[index][self.column]
        if isinstance(value, dict) and value.get("bytes"):  # an encoded datasets Image in a plain table
            from io import BytesIO

            from PIL import Image

            value = Image.open(BytesIO(value["bytes"]))
        elif isinstance(value, str):
            from PIL import Image

            from distac import io

            uri = value if self.base is None or "://" in value or os.path.isabs(value) else \
                io.join_uri(self.base, value)
            fs, path = io.url_to_fs(uri)
            with fs.open(path, "rb") as handle:
                value = Image.open(handle)
                value.load()
        if hasattr(value, "convert"):
            value = value.convert("RGB")
        return value, self.labels[index]


def _text(row: Mapping[str, Any], column: str, field: str, source: str, number: int) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, str) and value == "" and field == "text_pair"):
        return None
    if not isinstance(value, str):
        raise DataError(f"{source}, row {number}: column {column!r} (the {field} column) holds "
                        f"{type(value).__name__} {value!r}, not text")
    return value


def rows_to_inputs(rows: Sequence[Mapping[str, Any]], source: str, text: str, text_pair: str | None
                   ) -> list[tuple[str, str | None]]:
    """(text_a, text_b) per row; every row is a single sentence, or every row a pair."""
    if not rows:
        raise DataError(f"{source} has no rows (an empty split)")
    check_columns(rows, {"text": text, "text_pair": text_pair}, source)
    inputs = []
    for number, row in enumerate(rows, start=1):
        text_a = _text(row, text, "text", source, number)
        if text_a is None:
            raise DataError(f"{source}, row {number}: column {text!r} (the text column) is empty")
        text_b = _text(row, text_pair, "text_pair", source, number) if text_pair else None
        if text_pair and text_b is None:
            raise DataError(f"{source}, row {number}: column {text_pair!r} (the text_pair column) is empty, "
                            "but the other rows are sentence pairs (rows may not mix single sentences and pairs)")
        inputs.append((text_a, text_b))
    return inputs


def _raw_label(row: Mapping[str, Any], column: str, source: str, number: int) -> int | str:
    value = row.get(column)
    if isinstance(value, bool) or value is None or value == "":
        raise DataError(f"{source}, row {number}: column {column!r} (the label column) is "
                        f"{'empty' if value in (None, '') else repr(value)}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, (int, str)):
        raise DataError(f"{source}, row {number}: label {value!r} in column {column!r} is neither text nor "
                        "an integer")
    return value


def _as_integers(labels: list[int | str]) -> list[int | str]:
    """Integer labels when every label is an integer or spells one (CSV reads everything as text)."""
    try:
        return [label if isinstance(label, int) else int(label.strip()) for label in labels]
    except ValueError:
        return [str(label) for label in labels]


def class_order(train_labels: Sequence[int | str], given: Sequence[str] | None) -> tuple[list[str], dict]:
    """Class names and the map raw label → class index: ``given`` names, else the sorted distinct labels.

    With given names, integer labels are class indices and text labels are names.
    """
    if given is not None:
        names = [str(name) for name in given]
        index: dict = {name: i for i, name in enumerate(names)}
        index.update({i: i for i in range(len(names))})
        return names, index
    distinct = sorted(set(train_labels))
    return [str(label) for label in distinct], {label: i for i, label in enumerate(distinct)}


def _labels(table: Any, column: str, source: str) -> list[int | str]:
    """The raw label of every row; a ``datasets.Dataset`` column is read without decoding other columns."""
    if not len(table):
        raise DataError(f"{source} has no rows (an empty split)")
    check_columns(table, {"label": column}, source)
    values = list(table[column]) if hasattr(table, "column_names") else [row.get(column) for row in table]
    return [_raw_label({column: value}, column, source, number) for number, value in enumerate(values, start=1)]


def _to_examples(inputs: list[tuple[str, str | None]], labels: list[int | str], index: Mapping, names: list[str],
                 source: str, column: str, reference: str) -> list[TextExample]:
    examples = []
    for number, ((text_a, text_b), label) in enumerate(zip(inputs, labels), start=1):
        if label not in index:
            raise DataError(f"{source}, row {number}: label {label!r} in column {column!r} is not one of the "
                            f"{len(names)} classes of {reference} ({names})")
        examples.append(TextExample(text_a, text_b, index[label]))
    return examples


def read_unlabeled(spec: UnlabeledSpec, text: str, text_pair: str | None, quoting: Quoting | None = None
                   ) -> list[TextExample]:
    """The inputs of an unlabeled file (a label column, if any, is ignored); ``quoting``: the task's, unless
    the unlabeled spec gives its own."""
    rows = read_rows(spec.path, quoting=spec.quoting or quoting)
    inputs = rows_to_inputs(rows, spec.path, spec.text or text, spec.text_pair or (None if spec.text else text_pair))
    return [TextExample(a, b, None) for a, b in inputs]


def _examples(spec: DataSpec, table: Any, source: str, labels: list[int | str], index: Mapping, names: list[str],
              reference: str) -> Sequence:
    """Labelled examples of one split: TextExamples, or a lazy view of ImageExamples for an image column."""
    if spec.image is None:
        inputs = rows_to_inputs(_rows(table), source, spec.text, spec.text_pair)
        return _to_examples(inputs, labels, index, names, source, spec.label, reference)
    check_columns(table, {"image": spec.image}, source)
    indices = [example.label for example in _to_examples([("", None)] * len(labels), labels, index, names, source,
                                                         spec.label, reference)]
    base = None if hasattr(table, "column_names") or spec.dataset else os.path.dirname(source)
    return DatasetView(_ImageTable(table, spec.image, indices, base or None))


def load_task_data(name: str, spec: DataSpec | Mapping[str, Any], *, class_names: Sequence[str] | None = None,
                   max_train: int | None = None, max_eval: int | None = None, validation_fraction: float = 0.1,
                   seed: int = 0, other_tasks: Mapping[str, TaskData] | None = None) -> TaskData:
    """A task's splits from the files or dataset of ``spec`` (subsampling and hold-out as ``load_task``).

    ``class_names`` (e.g. a checkpoint's ``id2label`` names) override ``spec.class_names``, which override
    the names of a ``datasets`` ClassLabel column. ``other_tasks`` resolves ``unlabeled: {from_task: ...}``.
    """
    spec = parse_data_spec(spec, f"task {name!r}")
    for field, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise DataError(f"{field} must be ≥ 1 (or None for all), got {value}")
    loaded = {split: _split_table(spec, split) for split in SPLITS}
    train_table, train_source = loaded["train"]
    train_labels = _as_integers(_labels(train_table, spec.label, train_source))
    given = next((g for g in (class_names, spec.class_names, class_label_names(train_table, spec.label))
                  if g is not None), None)
    names, index = class_order(train_labels, given)
    reference = "the class names given" if given is not None else f"the training split ({train_source})"
    splits = {"train": _examples(spec, train_table, train_source, train_labels, index, names, reference)}
    for split in ("validation", "test"):
        if loaded[split] is None:
            continue
        table, source = loaded[split]
        labels = _labels(table, spec.label, source)
        labels = _as_integers(labels) if all(isinstance(x, int) for x in train_labels) else [str(x) for x in labels]
        splits[split] = _examples(spec, table, source, labels, index, names, reference)
    held_out = "validation" not in splits
    if held_out:
        splits["train"], splits["validation"] = split_off(splits["train"], validation_fraction,
                                                          f"{name}-validation-{seed}")
    if spec.image is not None and spec.unlabeled is not None and spec.unlabeled.path is not None:
        raise DataError(f"task {name!r}: an unlabeled file is for text tasks; an image task takes "
                        "`unlabeled: {from_task: ...}` or its own training images")
    data = subsampled_task(name, splits, names, max_train=max_train, max_eval=max_eval, seed=seed,
                           held_out=held_out)
    if spec.unlabeled is not None:
        data = with_unlabeled(data, spec.unlabeled, text=spec.text, text_pair=spec.text_pair, quoting=spec.quoting,
                              other_tasks=other_tasks)
    return data


def with_unlabeled(data: TaskData, spec: UnlabeledSpec | Mapping[str, Any], *, text: str = "text",
                   text_pair: str | None = None, quoting: Quoting | None = None,
                   other_tasks: Mapping[str, TaskData] | None = None) -> TaskData:
    """``data`` whose unlabeled inputs (what DisTaC conditions on) come from ``spec``: a file, read with the
    ``text``/``text_pair`` columns and ``quoting`` unless the spec names its own, or another task's training
    inputs."""
    spec = spec if isinstance(spec, UnlabeledSpec) else UnlabeledSpec.model_validate(dict(spec))
    if spec.path is not None:
        pool = read_unlabeled(spec, text, text_pair, quoting)
    else:
        source_task = (other_tasks or {}).get(spec.from_task)
        if source_task is None:
            raise DataError(f"task {data.name!r}: unlabeled.from_task names {spec.from_task!r}, which is not "
                            f"among the loaded tasks {sorted(other_tasks or {})}")
        pool = source_task.train  # labels are dropped when drawn (TaskData.unlabeled); images stay lazy
    return dataclasses.replace(data, unlabeled_pool=pool)


def load_tasks(specs: Mapping[str, DataSpec | Mapping[str, Any] | None], **options: Any) -> dict[str, TaskData]:
    """Several tasks at once, so ``unlabeled: {from_task: other}`` can name any of them.

    A None spec means a built-in task (``load_task(name)``). ``options`` go to both loaders; per-task
    class names go in ``class_names={task: [...]}``.
    """
    from distac.data import load_task

    class_names = options.pop("class_names", None) or {}
    parsed = {name: None if spec is None else parse_data_spec(spec, f"task {name!r}") for name, spec in specs.items()}
    tasks: dict[str, TaskData] = {}
    deferred = []
    for name, spec in parsed.items():
        if spec is None:
            tasks[name] = load_task(name, **options)
        elif spec.unlabeled is not None and spec.unlabeled.from_task is not None:
            deferred.append(name)
        else:
            tasks[name] = load_task_data(name, spec, class_names=class_names.get(name), **options)
    for name in deferred:  # surrogate data comes from a task loaded above (its training inputs)
        tasks[name] = load_task_data(name, parsed[name], class_names=class_names.get(name), other_tasks=tasks,
                                     **options)
    return {name: tasks[name] for name in specs}
