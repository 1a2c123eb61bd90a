"""transformers CLIP as a distac model: the vision tower (``vision_model`` + ``visual_projection``) is the
backbone, a frozen zero-shot head built from ``CLIPModel``'s text tower is the task head (as for open_clip).

θ_pre is a ``CLIPModel`` directory or hub id (both towers). Fine-tuned models are ``CLIPVisionModel`` or
``CLIPVisionModelWithProjection`` checkpoints of the same architecture (or a CLIPModel); a tensor a
fine-tune does not hold (a ``CLIPVisionModel`` has no projection) keeps θ_pre's value.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distac.data.examples import ImageExample
from distac.errors import CheckpointError, ConfigError, DistacError
from distac.models.base import ModelAdapter
from distac.models.hf_seqcls import local_files_only, quiet_transformers
from distac.models.vision import DEFAULT_TEMPLATES, VisionTaskModel, ZeroShotHead, zero_shot_head

BACKBONE_PREFIXES = ("vision_model.", "visual_projection.")


class CLIPImageTower(nn.Module):
    """Projected image embeddings: ``visual_projection(vision_model(pixels).pooler_output)``."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class HFCLIPAdapter(ModelAdapter):
    """Spec: ``{"kind": "hf_clip", "name_or_path": CLIPModel dir or hub id, "templates": [..] | None}``."""

    kind = "hf_clip"

    def __init__(self, name_or_path: str, templates: Sequence[str] | None = None):
        templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        if not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ConfigError(f"hf_clip: every template needs a '{{}}' for the class name, got {templates}")
        self.name_or_path = str(name_or_path)
        self.templates = templates
        self.clip, self.tokenizer, self.processor = self._load()
        self._tower = CLIPImageTower(self.clip.vision_model, self.clip.visual_projection).eval()
        self._pretrained_state = {k: v.detach().clone() for k, v in self._tower.state_dict().items()
                                  if v.is_floating_point()}

    def _load(self) -> tuple[nn.Module, Any, Any]:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = self.name_or_path
        quiet_transformers()
        options = {"local_files_only": local_files_only(path)}
        try:
            from distac.models.text import TRANSFORMERS_LOADING

            with TRANSFORMERS_LOADING:
                clip = CLIPModel.from_pretrained(path, **options)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot load {path} as a transformers CLIPModel (both towers): {exc}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **options)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} holds no usable tokenizer for the zero-shot head ({exc})") from None
        try:
            processor = AutoImageProcessor.from_pretrained(path, **options)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} holds no image processor (preprocessor_config.json): {exc}") from None
        return clip.eval(), tokenizer, processor

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "templates": list(self.templates)}

    def pretrained_backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._pretrained_state.items()}

    @torch.no_grad()
    def zero_shot_head(self, class_names: Sequence[str]) -> ZeroShotHead:
        """The zero-shot head of ``class_names`` from ``CLIPModel``'s text tower."""
        def embed_texts(texts: list[str]) -> torch.Tensor:
            output = self.clip.get_text_features(**self.tokenizer(texts, padding=True, return_tensors="pt"))
            return output.pooler_output if hasattr(output, "pooler_output") else output

        return zero_shot_head(class_names, self.templates, embed_texts, self.clip.logit_scale.exp())

    def build(self, num_classes: int, class_names: Sequence[str] | None = None, seed: int = 0) -> VisionTaskModel:
        if not class_names or len(class_names) != num_classes:
            raise ConfigError(f"hf_clip needs one class name per class for its zero-shot head: "
                              f"num_classes={num_classes}, class_names={class_names}")
        return VisionTaskModel(copy.deepcopy(self._tower), self.zero_shot_head(class_names)).eval()

    def collate(self, examples: Sequence[ImageExample]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DistacError("cannot collate an empty batch")
        from torchvision.transforms.functional import to_pil_image

        images = [to_pil_image(e.image) if isinstance(e.image, torch.Tensor) else e.image for e in examples]
        return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"]}
