"""open_clip CLIP models: the image tower is the shared backbone, a frozen zero-shot head is the task head.

The head holds one normalized text embedding per class (the mean over prompt templates of the text tower's
normalized embeddings, renormalized) and CLIP's logit scale: logits = scale · normalize(image features) · Wᵀ.
It has no parameters, so fine-tuning trains the image tower only, as in the task-vector literature.

Models come from an open_clip name (+ pretrained tag or local weights file) or from a JSON model config (tiny
models for tests). The CLIP model is loaded once per adapter; ``build`` deep-copies the image tower.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distac.data.examples import ImageExample
from distac.errors import ConfigError, DistacError
from distac.models.base import ModelAdapter, TaskModel

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
RANDOM_INIT_SEED = 0  # a model without pretrained weights must still have the same θ_pre in every process

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def zero_shot_head(class_names: Sequence[str], templates: Sequence[str],
                   embed_texts: Callable[[list[str]], torch.Tensor], logit_scale: torch.Tensor) -> "ZeroShotHead":
    """The head whose row c is the mean normalized text embedding of class c over the templates, renormalized
    (the task-vector literature's zero-shot classifier); ``embed_texts`` is the model's text tower."""
    rows = []
    for name in class_names:
        embeddings = F.normalize(embed_texts([template.format(name) for template in templates]).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return ZeroShotHead(torch.stack(rows), logit_scale)


class ZeroShotHead(nn.Module):
    """Frozen classifier from class text embeddings: ``scale · normalize(x) @ class_embeddings.T``."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float | torch.Tensor):
        super().__init__()
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embeddings = self.class_embeddings.to(features.dtype)
        return self.logit_scale.to(features.dtype) * F.normalize(features, dim=-1) @ embeddings.T


class VisionTaskModel(TaskModel):
    """CLIP image tower + zero-shot head; inputs are ``{"pixel_values": [batch, 3, H, W]}``."""

    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(inputs["pixel_values"])


class OpenCLIPAdapter(ModelAdapter):
    """Spec: ``{"kind": "open_clip", "model_name": "ViT-B-32", "pretrained": tag | path | None,
    "model_config": path to a JSON model config | None, "templates": [..] | None}``."""

    kind = "open_clip"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, model_config: str | None = None,
                 templates: Sequence[str] | None = None):
        templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        if not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ConfigError(f"open_clip: every template needs a '{{}}' for the class name, got {templates}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.model_config = str(model_config) if model_config else None
        self.templates = templates
        self.clip, self.preprocess, self.tokenizer = self._load()
        self._pretrained_state = {k: v.detach().clone() for k, v in self.clip.visual.state_dict().items()
                                  if v.is_floating_point()}

    def _load(self) -> tuple[nn.Module, Any, Any]:
        """The whole CLIP model (both towers), its eval image transform and its tokenizer."""
        import open_clip

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            try:
                if self.model_config:
                    clip, preprocess, tokenizer = self._load_from_config(open_clip)
                else:
                    clip, _, preprocess = open_clip.create_model_and_transforms(self.model_name,
                                                                                pretrained=self.pretrained)
                    tokenizer = open_clip.get_tokenizer(self.model_name)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                raise DistacError(f"cannot load open_clip model {self.model_name!r} "
                                  f"(pretrained={self.pretrained!r}, config={self.model_config!r}): {exc}") from None
        return clip.eval(), preprocess, tokenizer

    def _load_from_config(self, open_clip) -> tuple[nn.Module, Any, Any]:
        try:
            config = json.loads(Path(self.model_config).read_text())
        except FileNotFoundError:
            raise DistacError(f"open_clip model config not found: {self.model_config}") from None
        except ValueError as exc:
            raise DistacError(f"{self.model_config} is not valid JSON ({exc})") from None
        config = config.get("model_cfg", config)
        config.pop("custom_text", None)
        text_cfg = config.get("text_cfg", {})
        model_class = open_clip.CustomTextCLIP if text_cfg.get("hf_model_name") else open_clip.CLIP
        clip = model_class(**config)
        if self.pretrained:
            open_clip.load_checkpoint(clip, self.pretrained)
        preprocess = open_clip.image_transform(clip.visual.image_size, is_train=False)
        context_length = text_cfg.get("context_length", 77)
        if text_cfg.get("hf_tokenizer_name"):
            tokenizer = open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
        else:
            tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        return clip, preprocess, tokenizer

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_name": self.model_name, "pretrained": self.pretrained,
                "model_config": self.model_config, "templates": list(self.templates)}

    def pretrained_backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._pretrained_state.items()}

    @torch.no_grad()
    def zero_shot_head(self, class_names: Sequence[str]) -> ZeroShotHead:
        """The zero-shot head of ``class_names`` from open_clip's text tower."""
        return zero_shot_head(class_names, self.templates, lambda texts: self.clip.encode_text(self.tokenizer(texts)),
                              self.clip.logit_scale.exp())

    def build(self, num_classes: int, class_names: Sequence[str] | None = None, seed: int = 0) -> VisionTaskModel:
        if not class_names or len(class_names) != num_classes:
            raise ConfigError(f"open_clip needs one class name per class for its zero-shot head: "
                              f"num_classes={num_classes}, class_names={class_names}")
        return VisionTaskModel(copy.deepcopy(self.clip.visual), self.zero_shot_head(class_names)).eval()

    def collate(self, examples: Sequence[ImageExample]) -> dict[str, torch.Tensor]:
        """Stack the preprocessed images. Tensor images are raw [C, H, W] pixels (uint8, or floats in [0, 1])."""
        if not examples:
            raise DistacError("cannot collate an empty batch")
        from torchvision.transforms.functional import to_pil_image

        images = [to_pil_image(e.image) if isinstance(e.image, torch.Tensor) else e.image for e in examples]
        return {"pixel_values": torch.stack([self.preprocess(image) for image in images])}


def create_random_clip_config(path: str | os.PathLike, **overrides: Any) -> str:
    """Write a tiny open_clip model config (32-px images, 2-layer towers) as JSON; returns its path."""
    config = copy.deepcopy(TINY_CLIP_CONFIG)
    config.update(overrides)
    out = Path(path)
    if out.suffix != ".json":
        out = out / "tiny_clip.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config, indent=2))
    return str(out)
