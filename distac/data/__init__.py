"""Task data: ``load_task(name)`` for GLUE tasks, torchvision datasets and image folders;
``load_task_data(name, DataSpec(...))`` for any task from .csv/.tsv/.jsonl/.parquet files or ``datasets``.

Splits: validation is a seeded hold-out of train; test is GLUE's dev file (its test labels are hidden) or
the vision dataset's test split. ``max_train`` / ``max_eval`` take seeded subsamples, so the same
arguments always give the same examples.
"""

from __future__ import annotations

import os

from distac.data.examples import (DatasetView, ImageExample, RowCounts, TaskData, TextExample, split_off,
                                  subsampled_task, unlabeled)
from distac.data.files import DataError, read_rows
from distac.data.spec import (DataSpec, UnlabeledSpec, load_task_data, load_tasks, parse_data_spec, read_unlabeled,
                              with_unlabeled)
from distac.data.glue import GLUE_TASKS, find_glue_root, glue_task_name, read_glue_from_hub, read_glue_splits
from distac.data.vision import read_image_folder, read_torchvision
from distac.errors import DistacError

__all__ = ["DataError", "DataSpec", "DatasetView", "ImageExample", "RowCounts", "TaskData", "TextExample",
           "GLUE_TASKS", "UnlabeledSpec", "load_task", "load_task_data", "load_tasks", "parse_data_spec", "read_rows",
           "read_unlabeled", "unlabeled", "with_unlabeled"]

VISION_PREFIX = "vision:"
IMAGE_FOLDER_PREFIX = "imagefolder:"


def load_task(name: str, *, root: str | os.PathLike | None = None, max_train: int | None = None,
              max_eval: int | None = None, validation_fraction: float = 0.1, seed: int = 0) -> TaskData:
    """Load a task's train / validation / test splits.

    ``name``: a GLUE task (cola, mrpc, rte, sst2 / sst-2, any case), ``vision:<torchvision class>`` (read
    from ``root``), or ``imagefolder:<folder>`` (``root``/folder, or a path when ``root`` is None). ``root`` is
    the GLUE directory or the torchvision / image-folder data root.
    """
    for field, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise DistacError(f"{field} must be ≥ 1 (or None for all), got {value}")
    if not 0.0 <= validation_fraction < 1.0:
        raise DistacError(f"validation_fraction must be in [0, 1), got {validation_fraction}")

    if name.startswith(VISION_PREFIX):
        train, test, class_names = read_torchvision(name[len(VISION_PREFIX):], root)
    elif name.startswith(IMAGE_FOLDER_PREFIX):
        folder = name[len(IMAGE_FOLDER_PREFIX):]
        train, test, class_names = read_image_folder(os.path.join(root, folder) if root else folder)
    elif (task := glue_task_name(name)) is not None:
        glue_root = find_glue_root(root)
        train, test = read_glue_splits(task, glue_root) if glue_root else read_glue_from_hub(task)
        class_names = list(GLUE_TASKS[task].class_names)
        name = task
    else:
        raise DistacError(f"unknown task {name!r}: expected one of {sorted(GLUE_TASKS)}, "
                          f"'{VISION_PREFIX}<torchvision dataset>' or '{IMAGE_FOLDER_PREFIX}<path>'")

    train, validation = split_off(train, validation_fraction, f"{name}-validation-{seed}")
    return subsampled_task(name, {"train": train, "validation": validation, "test": test}, class_names,
                           max_train=max_train, max_eval=max_eval, seed=seed, held_out=True)
