"""The on-disk (or s3://) layout of a fine-tuned task model, and of θ_pre.

```
<uri>/backbone/          the shared parameters, sharded safetensors (what task vectors are made of)
<uri>/head.safetensors   the task head (fine-tuned models only; never merged)
<uri>/meta.json          {format, role, adapter spec, task, num_classes, class_names, extra}
```
``meta.json`` is written last and removed first when a directory is overwritten, so a directory without
it is an incomplete save and refuses to load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distac import io
from distac.errors import CheckpointError
from distac.models import build_adapter
from distac.models.base import ModelAdapter, TaskModel

FORMAT = "distac-task-model/1"
BACKBONE_DIR = "backbone"
HEAD_FILE = "head.safetensors"
META_FILE = "meta.json"


@dataclass
class LoadedModel:
    adapter: ModelAdapter
    model: TaskModel
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        """The label names in class-index order ([] when the model does not know them)."""
        return list(self.meta.get("class_names") or [])

    @property
    def task(self) -> str | None:
        return self.meta.get("task") or None


def backbone_uri(uri: str | os.PathLike) -> str:
    """Where a stored model's backbone lives (the path ``TaskVector.from_checkpoints`` takes)."""
    return io.join_uri(uri, BACKBONE_DIR)


def head_uri(uri: str | os.PathLike) -> str:
    return io.join_uri(uri, HEAD_FILE)


def meta_uri(uri: str | os.PathLike) -> str:
    return io.join_uri(uri, META_FILE)


def _remove_meta(uri: str | os.PathLike) -> None:
    """Mark a directory incomplete before overwriting it."""
    fs, path = io.url_to_fs(meta_uri(uri))
    if fs.exists(path):
        fs.rm(path)


def _write_meta(uri: str | os.PathLike, meta: dict[str, Any]) -> None:
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save {meta_uri(uri)}: `extra` must be JSON-serializable ({exc})") from None
    io.write_json(meta, meta_uri(uri))


def save_task_model(uri: str | os.PathLike, model: TaskModel, adapter: ModelAdapter, task: str, num_classes: int,
                    class_names: Sequence[str] | None, extra: Mapping[str, Any] | None = None) -> str:
    """Save backbone, head and meta (last); returns the URI."""
    uri = str(uri).rstrip("/")
    _remove_meta(uri)
    io.save_state_dict(model.backbone_state(), backbone_uri(uri))
    io.save_state_dict(model.head_state(), head_uri(uri))
    _write_meta(uri, {"format": FORMAT, "role": "finetuned", "adapter": adapter.spec(), "task": task,
                      "num_classes": int(num_classes), "class_names": list(class_names or []),
                      "extra": dict(extra or {})})
    return uri


def save_pretrained(adapter: ModelAdapter, uri: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> str:
    """Save θ_pre (the adapter's pretrained backbone) and its meta; returns the URI."""
    uri = str(uri).rstrip("/")
    _remove_meta(uri)
    io.save_state_dict(adapter.pretrained_backbone_state(), backbone_uri(uri))
    _write_meta(uri, {"format": FORMAT, "role": "pretrained", "adapter": adapter.spec(), "task": None,
                      "num_classes": None, "class_names": [], "extra": dict(extra or {})})
    return uri


def load_meta(uri: str | os.PathLike) -> dict[str, Any]:
    """A stored model's meta.json; a missing one means the save never completed."""
    fs, path = io.url_to_fs(meta_uri(uri))
    if not fs.exists(path):
        raise CheckpointError(f"{meta_uri(uri)} not found: {uri} is not a distac model directory, "
                              "or its save did not complete")
    meta = io.read_json(meta_uri(uri))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "adapter" not in meta:
        raise CheckpointError(f"{meta_uri(uri)} is not a {FORMAT} meta file")
    return meta


def load_head(uri: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The task head's tensors."""
    return io.load_state_dict(head_uri(uri))


def load_task_model(uri: str | os.PathLike) -> LoadedModel:
    """Rebuild a fine-tuned TaskModel (in eval mode) with its adapter and meta."""
    meta = load_meta(uri)
    if meta.get("role") != "finetuned":
        raise CheckpointError(f"{uri} holds a {meta.get('role')} backbone without a task head; "
                              "load its weights with distac.io.load_state_dict(backbone_uri(uri))")
    adapter = build_adapter(meta["adapter"])
    model = adapter.build(meta["num_classes"], meta["class_names"] or None)
    model.load_backbone(io.load_state_dict(backbone_uri(uri)))
    try:
        model.load_head(load_head(uri))
    except RuntimeError as exc:
        raise CheckpointError(f"{head_uri(uri)} does not fit the {meta['adapter']['kind']} head: {exc}") from None
    return LoadedModel(adapter, model.eval(), meta)
