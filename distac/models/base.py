"""The model contract every adapter fulfils: a shared backbone (merged) and a per-task head (never merged).

A task vector covers exactly ``TaskModel.backbone_state()``'s keys; heads are saved beside it and task t is
always served with its own head (METHODS.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


class TaskModel(nn.Module):
    """Backbone + one task's head. ``forward(inputs)`` returns logits of shape [batch, num_classes]."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's pooled representation of a batch; adapters override."""
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(inputs))

    def distillation_outputs(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What DisTaC matches between teacher and student: class logits [batch, C] and no mask here; a causal
        LM returns next-token logits [batch, length, vocab] and its non-padding mask [batch, length]."""
        return self(inputs), None

    def confidence_logits(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits whose max softmax probability is the model's confidence (a causal LM: the next token's)."""
        return self(inputs)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's floating parameters and buffers (the keys a task vector covers), detached."""
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items() if v.is_floating_point()}

    def load_backbone(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load backbone weights; every floating backbone key must be present."""
        own = self.backbone.state_dict()
        missing = [k for k, v in own.items() if v.is_floating_point() and k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            from distac.errors import MismatchError

            raise MismatchError(f"backbone weights do not fit the model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value.to(own[key].dtype))

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def load_head(self, state: Mapping[str, torch.Tensor]) -> None:
        self.head.load_state_dict(dict(state))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]


class ModelAdapter(ABC):
    """Builds TaskModels of one family (HF text encoder, open_clip CLIP) and turns examples into inputs."""

    kind: str

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """A JSON-able description from which ``build_adapter(spec)`` rebuilds this adapter."""

    @abstractmethod
    def pretrained_backbone_state(self) -> dict[str, torch.Tensor]:
        """θ_pre: the pretrained backbone's floating tensors."""

    @abstractmethod
    def build(self, num_classes: int, class_names: Sequence[str] | None = None, seed: int = 0) -> TaskModel:
        """A TaskModel with the pretrained backbone and a fresh head for this task (vision: zero-shot head)."""

    @abstractmethod
    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Model inputs for a list of examples (labels are not part of the inputs)."""
