"""Tiny real TaskModels for the conditioning / diagnostics / evaluation tests: an MLP backbone and a linear
head over feature vectors, an adapter for them, and a quick genuine fine-tune so task vectors mean something."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distac.models.base import ModelAdapter, TaskModel

IN_DIM, HIDDEN = 8, 16


def one_torch_thread() -> Iterator[None]:
    """For a module-scoped fixture: tiny models run faster on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Point:
    x: torch.Tensor
    label: int | None = None


class MLPTaskModel(TaskModel):
    def features(self, inputs):
        return self.backbone(inputs["x"])


def collate(examples: Sequence[Point]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([e.x for e in examples])}


class MLPAdapter(ModelAdapter):
    kind = "mlp"

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self._backbone = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh())

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def pretrained_backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._backbone.state_dict().items()}

    def build(self, num_classes: int, class_names=None, seed: int = 0) -> MLPTaskModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = nn.Linear(HIDDEN, num_classes)
        return MLPTaskModel(copy.deepcopy(self._backbone), head).eval()

    def collate(self, examples):
        return collate(examples)


@dataclass
class Task:
    """Fits distac.evaluation's task protocol (like distac.data.TaskData)."""

    name: str
    train: list[Point]
    validation: list[Point]
    test: list[Point]
    num_classes: int
    class_names: list[str]


def make_task(name: str, seed: int, num_classes: int = 3, n: int = 240) -> Task:
    """Points labelled by a random nonlinear rule, split 160/40/40 (for n = 240)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=g)
    rule = torch.randn(IN_DIM, num_classes, generator=g)
    labels = (torch.sin(2 * x) @ rule).argmax(1)
    points = [Point(x[i], int(labels[i])) for i in range(n)]
    a, b = n * 2 // 3, n * 5 // 6
    return Task(name, points[:a], points[a:b], points[b:], num_classes, [str(c) for c in range(num_classes)])


def finetune(adapter: MLPAdapter, task: Task, steps: int = 150, lr: float = 1e-2, label_smoothing: float = 0.0,
             seed: int = 0) -> MLPTaskModel:
    """Full-batch Adam on cross-entropy over backbone and head."""
    model = adapter.build(task.num_classes, seed=seed).train()
    inputs, labels = collate(task.train), torch.tensor([p.label for p in task.train])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels, label_smoothing=label_smoothing).backward()
        optimizer.step()
    return model.eval()
