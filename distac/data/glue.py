"""GLUE tasks (CoLA, MRPC, RTE, SST-2) from the original tsv layout ``<root>/<TASK>/{train,dev}.tsv``.

The files are split on tabs by hand, with no quote handling (some texts hold a literal ``"``), read as
``utf-8-sig`` (MRPC starts with a BOM). CoLA has no header. GLUE's test labels are hidden, so the dev file
serves as our test split and validation is held out of train.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from distac.data.examples import TextExample
from distac.errors import DistacError

logger = logging.getLogger(__name__)

GLUE_DIR_ENV = "DISTAC_GLUE_DIR"


@dataclass(frozen=True)
class GlueFormat:
    """Where a task's columns are in its tsv files and how its labels are spelled."""

    directory: str
    has_header: bool
    num_columns: int
    text_a_column: int
    text_b_column: int | None
    label_column: int
    labels: tuple[str, ...]  # the spelling of label i in the file
    class_names: tuple[str, ...]
    hub_name: str  # the config name of the "glue" dataset on the Hugging Face hub


GLUE_TASKS: dict[str, GlueFormat] = {
    "cola": GlueFormat("CoLA", False, 4, 3, None, 1, ("0", "1"), ("unacceptable", "acceptable"), "cola"),
    "mrpc": GlueFormat("MRPC", True, 5, 3, 4, 0, ("0", "1"), ("not_equivalent", "equivalent"), "mrpc"),
    "rte": GlueFormat("RTE", True, 4, 1, 2, 3, ("entailment", "not_entailment"),
                      ("entailment", "not_entailment"), "rte"),
    "sst2": GlueFormat("SST-2", True, 2, 0, None, 1, ("0", "1"), ("negative", "positive"), "sst2"),
}


def glue_task_name(name: str) -> str | None:
    """The canonical GLUE task name ('sst-2', 'SST2' → 'sst2'), or None if ``name`` is not one."""
    key = name.lower().replace("-", "").replace("_", "")
    return key if key in GLUE_TASKS else None


def find_glue_root(root: str | os.PathLike | None = None) -> Path | None:
    """The GLUE directory: ``root`` > $DISTAC_GLUE_DIR > ``../shared/data/glue`` from the cwd or the repo."""
    if root is not None:
        path = Path(root)
        if not path.is_dir():
            raise DistacError(f"GLUE directory not found: {path}")
        return path
    if os.environ.get(GLUE_DIR_ENV):
        path = Path(os.environ[GLUE_DIR_ENV])
        if not path.is_dir():
            raise DistacError(f"GLUE directory not found: {path} (from ${GLUE_DIR_ENV})")
        return path
    import distac

    repo = Path(distac.__file__).resolve().parents[1]
    for candidate in (Path.cwd() / "../shared/data/glue", repo / "../shared/data/glue"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def read_glue_file(path: Path, fmt: GlueFormat) -> list[TextExample]:
    """Parse one tsv file; a missing file or a malformed row raises DistacError naming file and line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except FileNotFoundError:
        raise DistacError(f"GLUE file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise DistacError(f"{path} is not UTF-8 text ({exc})") from None
    first_data_line = 2 if fmt.has_header else 1
    examples = []
    for line_number, line in enumerate(lines[first_data_line - 1:], start=first_data_line):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != fmt.num_columns:
            raise DistacError(f"{path}, line {line_number}: expected {fmt.num_columns} tab-separated columns, "
                              f"found {len(fields)}")
        raw_label = fields[fmt.label_column].strip()
        if raw_label not in fmt.labels:
            raise DistacError(f"{path}, line {line_number}: unknown label {raw_label!r} "
                              f"(expected one of {list(fmt.labels)})")
        text_b = fields[fmt.text_b_column] if fmt.text_b_column is not None else None
        examples.append(TextExample(fields[fmt.text_a_column], text_b, fmt.labels.index(raw_label)))
    return examples


def read_glue_splits(task: str, root: Path) -> tuple[list[TextExample], list[TextExample]]:
    """(train, dev) examples of a GLUE task from ``root``."""
    fmt = GLUE_TASKS[task]
    task_dir = root / fmt.directory
    if not task_dir.is_dir():
        raise DistacError(f"GLUE task directory not found: {task_dir}")
    return read_glue_file(task_dir / "train.tsv", fmt), read_glue_file(task_dir / "dev.tsv", fmt)


def read_glue_from_hub(task: str) -> tuple[list[TextExample], list[TextExample]]:
    """(train, validation) of a GLUE task from the Hugging Face hub, when ``datasets`` is installed."""
    try:
        import datasets
    except ImportError:
        raise DistacError(f"no local GLUE directory found (pass root=, set ${GLUE_DIR_ENV}, or place it at "
                          "../shared/data/glue), and the `datasets` package is not installed to fetch "
                          f"{task!r} from the hub") from None
    fmt = GLUE_TASKS[task]
    logger.info("loading GLUE %s from the Hugging Face hub", task)
    dataset = datasets.load_dataset("glue", fmt.hub_name)
    columns = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
               "rte": ("sentence1", "sentence2")}[task]

    def convert(split) -> list[TextExample]:
        return [TextExample(row[columns[0]], row[columns[1]] if columns[1] else None, int(row["label"]))
                for row in split]

    return convert(dataset["train"]), convert(dataset["validation"])
