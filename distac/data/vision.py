"""Image classification tasks from local files: torchvision datasets (never downloaded) and image folders.

``vision:<Class>`` names a ``torchvision.datasets`` class read from ``root`` with ``download=False``;
``imagefolder:<path>`` reads ``<path>/train/<class>/*`` and ``<path>/test/<class>/*``. Splits are lazy
``DatasetView`` sequences; class names come from the dataset.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from distac.data.examples import DatasetView
from distac.errors import DistacError


def _split_kwargs(dataset_class: type, train: bool) -> dict[str, Any]:
    """How this dataset class selects its train or test split: ``train=bool`` or ``split='train'|'test'``."""
    parameters = inspect.signature(dataset_class.__init__).parameters
    if "train" in parameters:
        return {"train": train}
    if "split" in parameters:
        return {"split": "train" if train else "test"}
    raise DistacError(f"torchvision dataset {dataset_class.__name__} has neither a `train` nor a `split` "
                      "argument; use imagefolder:<path> instead")


def _class_names(dataset: Any, source: str) -> list[str]:
    names = getattr(dataset, "classes", None)
    if not names:
        raise DistacError(f"{source} does not list its class names (no `.classes`)")
    return [str(name) for name in names]


def read_torchvision(class_name: str, root: str | os.PathLike | None) -> tuple[DatasetView, DatasetView, list[str]]:
    """(train, test, class names) of ``torchvision.datasets.<class_name>`` stored under ``root``."""
    import torchvision.datasets

    if root is None:
        raise DistacError(f"vision:{class_name} needs root= (the local directory holding the dataset)")
    dataset_class = getattr(torchvision.datasets, class_name, None)
    if not isinstance(dataset_class, type):
        raise DistacError(f"torchvision.datasets has no dataset class {class_name!r}")
    splits = []
    for train in (True, False):
        try:
            splits.append(dataset_class(root=str(root), download=False, **_split_kwargs(dataset_class, train)))
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise DistacError(f"cannot read torchvision dataset {class_name} from {root}: {exc}") from None
    return DatasetView(splits[0]), DatasetView(splits[1]), _class_names(splits[0], f"vision:{class_name}")


def read_image_folder(path: str | os.PathLike) -> tuple[DatasetView, DatasetView, list[str]]:
    """(train, test, class names) of an image folder with ``train/`` and ``test/`` subfolders."""
    from torchvision.datasets import ImageFolder

    base = Path(path)
    splits = []
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DistacError(f"image folder split not found: {base / split}")
        try:
            splits.append(ImageFolder(str(base / split)))
        except (FileNotFoundError, OSError) as exc:
            raise DistacError(f"cannot read image folder {base / split}: {exc}") from None
    train, test = splits
    if train.classes != test.classes:
        raise DistacError(f"{base}: train/ has classes {train.classes} but test/ has {test.classes}")
    return DatasetView(train), DatasetView(test), _class_names(train, f"imagefolder:{base}")
