"""Task data in one shape for every source: labelled examples, train/validation/test splits, unlabeled views.

Splits are plain sequences of ``TextExample`` / ``ImageExample``. Vision datasets use a lazy
``DatasetView`` (a sequence that reads one image per access) so a 50k-image dataset is not decoded up front.
Every subsample is seeded and returns items in their original order, so it is reproducible and stable.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class TextExample:
    """One sentence (``text_b`` None) or sentence pair; ``label`` None when unlabeled."""

    text_a: str
    text_b: str | None
    label: int | None


@dataclass(frozen=True)
class ImageExample:
    """One image (a PIL image, or a [C, H, W] tensor of raw pixels); ``label`` None when unlabeled."""

    image: Any
    label: int | None


Example = TextExample | ImageExample


def strip_label(example: Example) -> Example:
    if isinstance(example, TextExample):
        return TextExample(example.text_a, example.text_b, None)
    return ImageExample(example.image, None)


def unlabeled(examples: Sequence[Example]) -> list[Example]:
    """The same examples with every label set to None (what DisTaC may see)."""
    return [strip_label(example) for example in examples]


class DatasetView(Sequence):
    """A lazy sequence of ``ImageExample`` over chosen indices of a map-style ``(image, label)`` dataset."""

    def __init__(self, dataset: Any, indices: Sequence[int] | None = None):
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return DatasetView(self.dataset, self.indices[item])
        image, label = self.dataset[self.indices[item]]
        return ImageExample(image, int(label))

    def __iter__(self) -> Iterator[ImageExample]:
        for position in range(len(self)):
            yield self[position]

    def select(self, positions: Sequence[int]) -> "DatasetView":
        return DatasetView(self.dataset, [self.indices[p] for p in positions])


def take(items: Sequence[Example], positions: Sequence[int]) -> Sequence[Example]:
    """``items`` at ``positions``; a DatasetView stays lazy, anything else becomes a list."""
    if isinstance(items, DatasetView):
        return items.select(positions)
    return [items[p] for p in positions]


def sample_positions(count: int, size: int | None, seed: int | str) -> list[int]:
    """``size`` distinct positions out of ``count`` (all when size is None or ≥ count), seeded, in order."""
    if size is None or size >= count:
        return list(range(count))
    if size < 0:
        raise ValueError(f"sample size must be ≥ 0, got {size}")
    return sorted(random.Random(seed).sample(range(count), size))


def subsample(items: Sequence[Example], size: int | None, seed: int | str) -> Sequence[Example]:
    """A seeded subsample of ``size`` items, kept in their original order."""
    if size is None or size >= len(items):
        return items
    return take(items, sample_positions(len(items), size, seed))


def split_off(items: Sequence[Example], fraction: float, seed: int | str
              ) -> tuple[Sequence[Example], Sequence[Example]]:
    """Hold out ``round(fraction · n)`` items (seeded): returns (rest, held_out), each in original order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    held = set(sample_positions(len(items), round(fraction * len(items)), seed))
    rest = [p for p in range(len(items)) if p not in held]
    return take(items, rest), take(items, sorted(held))


@dataclass(frozen=True)
class RowCounts:
    """Per split, the rows read (before ``max_train`` / ``max_eval``; train's after the validation hold-out)
    and the rows used; ``held_out``: validation was held out of the training rows (no validation file)."""

    read: dict[str, int]
    used: dict[str, int]
    held_out: bool = False

    def describe(self) -> str:
        """'train 900 → 32, validation 100 (held out of train) → 32, test 500 → 32'."""
        def one(split: str) -> str:
            note = " (held out of train)" if split == "validation" and self.held_out else ""
            return f"{split} {self.read[split]}{note} → {self.used[split]}"
        return ", ".join(one(split) for split in SPLIT_NAMES)

    def metrics(self) -> dict[str, int]:
        """Flat numbers for metrics files and MLflow: ``train_rows_read``, ``train_rows_used``, …"""
        return {f"{split}_rows_{kind}": counts[split] for split in SPLIT_NAMES
                for kind, counts in (("read", self.read), ("used", self.used))}


@dataclass
class TaskData:
    """A classification task: its splits, class count and class names (index = label).

    ``unlabeled_pool``: the inputs DisTaC conditions on when they are not this task's training inputs (a
    file of unlabeled inputs, or another task's inputs as surrogate data; any labels there are dropped when
    drawn); None means the training inputs. ``rows``: how many rows each split read and used.
    """

    name: str
    train: Sequence[Example]
    validation: Sequence[Example]
    test: Sequence[Example]
    num_classes: int
    class_names: list[str]
    unlabeled_pool: Sequence[Example] | None = None
    rows: RowCounts | None = None

    def unlabeled(self, n: int | None = None, seed: int = 0) -> list[Example]:
        """Up to ``n`` unlabeled inputs (seeded choice, all when None): the pool, else the training inputs."""
        source = self.train if self.unlabeled_pool is None else self.unlabeled_pool
        return unlabeled(subsample(source, n, f"unlabeled-{seed}"))

    def __repr__(self) -> str:
        return (f"TaskData({self.name!r}, train={len(self.train)}, validation={len(self.validation)}, "
                f"test={len(self.test)}, classes={self.class_names}"
                + ("" if self.unlabeled_pool is None else f", unlabeled={len(self.unlabeled_pool)}") + ")")


def subsampled_task(name: str, splits: dict[str, Sequence[Example]], class_names: list[str], *,
                    max_train: int | None, max_eval: int | None, seed: int, held_out: bool) -> TaskData:
    """A TaskData of seeded subsamples of ``splits`` (train ≤ ``max_train``, validation and test ≤ ``max_eval``)
    with the rows read and used per split; what every loader ends with, so all subsample alike."""
    sizes = {"train": max_train, "validation": max_eval, "test": max_eval}
    seeds = {"train": f"{name}-train-{seed}", "validation": f"{name}-validation-sample-{seed}",
             "test": f"{name}-test-{seed}"}
    used = {split: subsample(splits[split], sizes[split], seeds[split]) for split in SPLIT_NAMES}
    rows = RowCounts({split: len(splits[split]) for split in SPLIT_NAMES},
                     {split: len(used[split]) for split in SPLIT_NAMES}, held_out)
    return TaskData(name=name, **used, num_classes=len(class_names), class_names=list(class_names), rows=rows)
