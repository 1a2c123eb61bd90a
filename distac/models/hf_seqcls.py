"""Hugging Face sequence-classification checkpoints (``AutoModelForSequenceClassification``) as distac models.

The encoder (the model's base model, without a pooler) is the backbone that task vectors cover; everything
that maps its hidden states to logits is the head, taken from the checkpoint itself so a loaded model
predicts exactly what transformers predicts:

- BERT-like (the base model has a pooler): head = classifier(dropout(pooler(first token)));
- DeBERTa (pooler on the classification model): the same with the model's own ``pooler``;
- RoBERTa-like (``classifier`` takes the hidden sequence): head = classifier(first token);
- Llama-style decoders (``score``): head = score(hidden state of the rightmost non-padding token).

The adapter (kind ``hf_seqcls``) holds θ_pre: a base model or a classification checkpoint of the same
architecture; ``build`` gives θ_pre's encoder with a seeded fresh classifier, like ``hf_text``.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distac.data.examples import TextExample
from distac.errors import CheckpointError, ConfigError
from distac.models.base import ModelAdapter, TaskModel
from distac.models.text import TRANSFORMERS_LOADING, resolve_model_path, set_padding, tokenize_batch

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spm.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
GENERIC_LABEL = "LABEL_{}"
RANDOM_HEAD_SEED = 0


def quiet_transformers(progress: bool = False) -> None:
    """Silence transformers' weight-loading progress bars and its info/warning chatter unless ``progress``."""
    from transformers.utils import logging as hf_logging

    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def local_files_only(path: str) -> bool:
    return Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")


def has_tokenizer(path: str) -> bool:
    """Whether a local directory holds tokenizer files (a hub id is assumed to)."""
    return not Path(path).is_dir() or any((Path(path) / name).exists() for name in TOKENIZER_FILES)


def class_names_from_config(config: Any) -> list[str] | None:
    """Label names in index order from a config's ``id2label``; None when they are transformers' defaults."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    if not names or names == [GENERIC_LABEL.format(i) for i in range(len(names))]:
        return None
    return names


# --------------------------------------------------------------------------------------------- the split


class SequenceClassifierHead(nn.Module):
    """The non-encoder part of a transformers classification model, applied to the pooled token."""

    def __init__(self, family: str, modules: Mapping[str, nn.Module]):
        super().__init__()
        self.family = family
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.family == "decoder":
            return self.score(features)
        if self.family == "sequence_head":  # RoBERTa's classifier reads the first token of a sequence itself
            return self.classifier(features.unsqueeze(1))
        pooled = self.pooler(features.unsqueeze(1))  # BertPooler / ContextPooler take hidden[:, 0]
        return self.classifier(self.dropout(pooled))


class SequenceClassifierModel(TaskModel):
    """Encoder + ``SequenceClassifierHead``; features are the first token's (or, for decoders, the rightmost
    non-padding token's) last hidden state."""

    def __init__(self, backbone: nn.Module, head: SequenceClassifierHead, pad_token_id: int | None):
        super().__init__(backbone, head)
        self.pad_token_id = pad_token_id

    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.backbone(**inputs).last_hidden_state
        if self.head.family != "decoder":
            return hidden[:, 0]
        input_ids = inputs["input_ids"]
        if self.pad_token_id is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=hidden.device)
        else:  # transformers' rule: the rightmost token that is not the padding token
            not_pad = (input_ids != self.pad_token_id).to(torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
            last = (positions * not_pad).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def split_sequence_classifier(full: nn.Module) -> tuple[nn.Module, SequenceClassifierHead]:
    """(encoder, head) of a transformers ``*ForSequenceClassification`` model; the encoder loses its pooler."""
    base = full.base_model
    if hasattr(full, "score") and isinstance(full.score, nn.Linear):
        return base, SequenceClassifierHead("decoder", {"score": full.score})
    classifier = getattr(full, "classifier", None)
    if classifier is None:
        raise CheckpointError(f"{type(full).__name__} has neither a `classifier` nor a `score` layer; "
                              "supported: BERT-, RoBERTa-, DeBERTa- and Llama-style sequence classifiers")
    dropout = getattr(full, "dropout", None) or nn.Identity()
    if getattr(full, "pooler", None) is not None:  # DeBERTa
        return base, SequenceClassifierHead("pooled", {"pooler": full.pooler, "dropout": dropout,
                                                       "classifier": classifier})
    if getattr(base, "pooler", None) is not None:  # BERT: the pooler moves from the encoder to the head
        pooler = base.pooler
        base.pooler = None
        return base, SequenceClassifierHead("pooled", {"pooler": pooler, "dropout": dropout,
                                                       "classifier": classifier})
    if isinstance(classifier, nn.Linear):
        raise CheckpointError(f"{type(full).__name__}: a linear classifier without a pooler is not supported")
    return base, SequenceClassifierHead("sequence_head", {"classifier": classifier})


def final_layer(head: SequenceClassifierHead) -> tuple[nn.Module, str]:
    """The module holding the layer that outputs one logit per class, and that layer's attribute name."""
    if head.family == "decoder":
        return head, "score"
    if isinstance(head.classifier, nn.Linear):
        return head, "classifier"
    for name in ("out_proj", "dense_out", "classifier"):
        if isinstance(getattr(head.classifier, name, None), nn.Linear):
            return head.classifier, name
    raise CheckpointError(f"cannot find the output layer of {type(head.classifier).__name__}")


# --------------------------------------------------------------------------------------------- the adapter


class HFSequenceClassificationAdapter(ModelAdapter):
    """Spec: ``{"kind": "hf_seqcls", "name_or_path": θ_pre (HF dir or hub id), "tokenizer": dir | id | None,
    "max_length": int | None}``. ``max_length`` None: the tokenizer's own limit (as transformers truncates)."""

    kind = "hf_seqcls"

    def __init__(self, name_or_path: str, tokenizer: str | None = None, max_length: int | None = None):
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ConfigError(f"hf_seqcls: max_length must be a positive integer or None, got {max_length!r}")
        self.name_or_path = str(name_or_path)
        self.tokenizer_path = str(tokenizer) if tokenizer else None
        self.max_length = max_length
        self._full, self.tokenizer = self._load()
        encoder, _ = split_sequence_classifier(copy.deepcopy(self._full))
        self._input_names = set(inspect.signature(encoder.forward).parameters)
        self._pretrained_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()
                                  if v.is_floating_point()}

    def _load(self) -> tuple[nn.Module, Any]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(self.name_or_path)
        tokenizer_path = self.tokenizer_path or path
        if not has_tokenizer(tokenizer_path):
            raise CheckpointError(f"{tokenizer_path} holds no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); "
                                  "save one beside the weights (tokenizer.save_pretrained) or name it with "
                                  "`tokenizer`")
        quiet_transformers()
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=local_files_only(tokenizer_path))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the tokenizer from {tokenizer_path}: {exc}") from None
        with torch.random.fork_rng(devices=[]):  # a base checkpoint's new head is the same in every process
            torch.manual_seed(RANDOM_HEAD_SEED)
            try:
                with TRANSFORMERS_LOADING:
                    full = AutoModelForSequenceClassification.from_pretrained(path,
                                                                              local_files_only=local_files_only(path))
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"cannot load {path} as a sequence-classification model: {exc}") from None
        set_padding(tokenizer, full.config)
        return full.eval(), tokenizer

    @property
    def config(self) -> Any:
        return self._full.config

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "tokenizer": self.tokenizer_path,
                "max_length": self.max_length}

    def pretrained_backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._pretrained_state.items()}

    def wrap(self, full: nn.Module) -> SequenceClassifierModel:
        """A TaskModel around a loaded transformers classification model (its modules are reused, not copied)."""
        encoder, head = split_sequence_classifier(full)
        pad = getattr(full.config, "pad_token_id", None)
        return SequenceClassifierModel(encoder, head, pad if pad is not None else self.tokenizer.pad_token_id).eval()

    def build(self, num_classes: int, class_names: Sequence[str] | None = None, seed: int = 0) -> TaskModel:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be ≥ 1, got {num_classes}")
        model = self.wrap(copy.deepcopy(self._full))
        owner, name = final_layer(model.head)
        old = getattr(owner, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            setattr(owner, name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        return model

    def collate(self, examples: Sequence[TextExample]) -> dict[str, torch.Tensor]:
        return tokenize_batch(self.tokenizer, examples, self._input_names, self.max_length)


def load_sequence_classifier(path: str, adapter: HFSequenceClassificationAdapter) -> SequenceClassifierModel:
    """A fine-tuned checkpoint as a TaskModel of ``adapter``'s family, weights exactly as transformers loads them."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    try:
        with TRANSFORMERS_LOADING:
            full = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=local_files_only(path))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load {path} as a sequence-classification model: {exc}") from None
    if type(full) is not type(adapter._full):
        raise CheckpointError(f"{path} is a {type(full).__name__}, but the pretrained model "
                              f"{adapter.name_or_path} is a {type(adapter._full).__name__}")
    if getattr(full.config, "pad_token_id", None) is None:
        full.config.pad_token_id = adapter.tokenizer.pad_token_id
    return adapter.wrap(full.eval())
