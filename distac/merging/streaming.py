"""Streaming merge: checkpoints in, sharded safetensors out, one tensor at a time.

``merge_checkpoints`` reads the pretrained and fine-tuned checkpoints lazily, runs the same engine as the
in-memory ``merge`` (``iter_merged``) and writes, under OUT::

    vector/            τ_m (EMR: the unified vector τ_uni), sharded safetensors in the inputs' dtype
    masks/task-<i>/    EMR only: task i's boolean mask
    model/             θ_pre + τ_m over every pretrained key (other keys passed through); not for EMR
    merge.json         method, hyperparameters, inputs, number of tasks, EMR scales, path and device

Memory holds the T input tensors of two keys (the one being merged and the next, read ahead in a
background thread) plus one shard buffer: ``max_shard_bytes`` for the vector, and
for EMR that budget split evenly between the vector and its T mask writers (masks take one byte per
entry). The model is written in a second pass that reads the staged vector back, so the two outputs never
buffer at the same time. Everything is staged in a temporary directory and
appears at OUT only when the whole merge succeeded (S3: uploaded with merge.json last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from distac import io
from distac.errors import CheckpointError, ConfigError, MismatchError
from distac.device import resolve_device
from distac.merging import Merged, MergeMethod, get_method
from distac.merging.base import READ_AHEAD_BYTES, iter_merged
from distac.outputs import guard_output
from distac.vectors import LastKeyCache, LazyTaskVector, TaskVector

log = logging.getLogger(__name__)

RECORD_NAME = "merge.json"
VECTOR_DIR = "vector"
MODEL_DIR = "model"


def mask_dir(task_index: int) -> str:
    return f"masks/task-{task_index}"


@contextlib.contextmanager
def staged_directory(out_uri: str, overwrite: bool = False, inputs: Sequence[str] = ()) -> Iterator[str]:
    """A local directory to build OUT in; moved (or uploaded, merge.json last) to OUT only on success.

    OUT must not be or contain one of ``inputs``; it may hold an earlier merge (it is replaced), anything else
    only with ``overwrite``."""
    guard_output(out_uri, kind="merge", inputs=inputs, overwrite=overwrite)
    local = io.is_local(out_uri)
    final = io.url_to_fs(out_uri)[1] if local else None
    parent = os.path.dirname(os.path.abspath(final)) if final else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".distac-merge-", dir=parent)
    try:
        yield staging
        if local:
            _move_into_place(staging, final)
        else:
            _upload(staging, out_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: str, final: str) -> None:
    if not os.path.exists(final):
        os.replace(staging, final)
        return
    old = f"{final}.old-{uuid.uuid4().hex[:8]}"
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _upload(staging: str, out_uri: str) -> None:
    fs, path = io.url_to_fs(out_uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    files = sorted(os.path.relpath(os.path.join(root, name), staging)
                   for root, _, names in os.walk(staging) for name in names)
    files.sort(key=lambda name: name == RECORD_NAME)  # the record marks a complete merge: upload it last
    for name in files:
        fs.put_file(os.path.join(staging, name), f"{path}/{name}")


def write_served_model(pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], out_uri: str,
                       mask: Mapping[str, torch.Tensor] | None = None, scale: float = 1.0,
                       max_shard_bytes: int = io.DEFAULT_SHARD_BYTES, progress: bool = False,
                       overwrite: bool = False) -> None:
    """Write θ_pre + scale · mask ⊙ vector over every pretrained key, one tensor at a time."""
    missing = [key for key in vector if key not in pretrained]
    if missing:
        raise MismatchError(f"the pretrained model lacks merged tensors: {', '.join(missing[:5])}")
    single_file = str(out_uri).endswith((io.SAFETENSORS_SUFFIX, *io.TORCH_SUFFIXES))
    collected: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        writer = None if single_file else stack.enter_context(
            io.ShardedSafetensorsWriter(out_uri, max_shard_bytes, overwrite=overwrite))
        for key in tqdm(list(pretrained), desc="write model", unit="tensor", disable=not progress):
            tensor = pretrained[key]
            if key in vector:
                delta = vector[key]
                if delta.shape != tensor.shape:
                    raise MismatchError(f"tensor {key!r}: shape {tuple(delta.shape)} in the merge, "
                                        f"{tuple(tensor.shape)} in the pretrained model")
                if mask is not None:
                    delta = scale * mask[key].to(delta.dtype) * delta
                tensor = (tensor + delta.to(tensor.dtype)).to(tensor.dtype)
            if writer is None:
                collected[key] = tensor
            else:
                writer.add(key, tensor)
    if single_file:
        io.save_state_dict(collected, out_uri, metadata={"distac": "model"})


def merge_checkpoints(method: MergeMethod | str, pretrained_uri: str, finetuned_uris: Sequence[str], out_uri: str,
                      include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                      device: torch.device | str | None = None, max_shard_bytes: int = io.DEFAULT_SHARD_BYTES,
                      progress: bool = True, write_model: bool = True, overwrite: bool = False,
                      read_ahead_bytes: int = READ_AHEAD_BYTES) -> dict[str, Any]:
    """Merge fine-tuned checkpoints tensor by tensor into OUT (layout in the module docstring).

    OUT must not be or contain an input; it may hold an earlier merge, anything else only with ``overwrite``.
    ``read_ahead_bytes`` bounds the next key's inputs read while the current key merges (0: no reading ahead).
    Inputs may also be lazy mappings (``distac.models.resolve.backbone_checkpoint`` views of any model form).
    Returns the record written to OUT/merge.json.
    """
    method = get_method(method) if isinstance(method, str) else method
    if not finetuned_uris:
        raise ConfigError("merging needs at least one fine-tuned checkpoint")
    device = resolve_device(device)
    out_uri = str(out_uri).rstrip("/")
    pretrained = pretrained_uri if isinstance(pretrained_uri, Mapping) else io.open_checkpoint(pretrained_uri)
    shared_pretrained = LastKeyCache(pretrained)  # the engine visits key by key: θ_pre is read once per key
    vectors = [LazyTaskVector(shared_pretrained, uri if isinstance(uri, Mapping) else io.open_checkpoint(uri),
                              include, exclude, name=str(uri))
               for uri in finetuned_uris]
    num_tasks = len(vectors)
    log.info("merging %d checkpoints with %s over %d tensors on %s", num_tasks, method.name, len(vectors[0]), device)

    # EMR writes T + 1 outputs side by side: they share one shard's budget, so memory does not grow with T
    shard_bytes = max(1, max_shard_bytes // (num_tasks + 1)) if method.per_task else max_shard_bytes
    sources = [str(source) for source in (pretrained_uri, *finetuned_uris)]  # a view's str() is its file
    with staged_directory(out_uri, overwrite, inputs=sources) as staging:
        with contextlib.ExitStack() as writers:
            vector_writer = writers.enter_context(
                io.ShardedSafetensorsWriter(os.path.join(staging, VECTOR_DIR), shard_bytes))
            mask_writers = [writers.enter_context(io.ShardedSafetensorsWriter(os.path.join(staging, mask_dir(i)),
                                                                              shard_bytes))
                            for i in range(num_tasks)] if method.per_task else []
            for key, result in iter_merged(method, vectors, device=device, progress=progress,
                                           read_ahead_bytes=read_ahead_bytes):
                if isinstance(result, torch.Tensor):
                    vector_writer.add(key, result)
                    continue
                vector_writer.add(key, result.vector)
                for writer, mask in zip(mask_writers, result.masks):
                    writer.add(key, mask)
        info = method.finish()
        scales = info.pop("scales", None)
        model_written = write_model and not method.per_task
        if model_written:
            write_served_model(pretrained, io.open_checkpoint(os.path.join(staging, VECTOR_DIR)),
                               os.path.join(staging, MODEL_DIR), max_shard_bytes=max_shard_bytes, progress=progress)
        record = {
            "method": method.name,
            "hyperparameters": dataclasses.asdict(method),
            "inputs": {"pretrained": str(pretrained_uri), "finetuned": [str(u) for u in finetuned_uris],
                       "include": list(include or []), "exclude": list(exclude or [])},
            "num_tasks": num_tasks,
            "num_tensors": len(vectors[0]),
            "per_task": method.per_task,
            "scales": scales,
            "alpha": method.alpha if method.has_alpha else None,
            "outputs": {"vector": VECTOR_DIR, "model": MODEL_DIR if model_written else None,
                        "masks": [mask_dir(i) for i in range(num_tasks)] if method.per_task else None},
            "path": "streaming",
            "device": str(device),
            "info": info,
        }
        io.write_json(record, os.path.join(staging, RECORD_NAME))
    log.info("wrote %s", out_uri)
    return record


def read_record(out_uri: str) -> dict[str, Any]:
    record = io.read_json(io.join_uri(out_uri, RECORD_NAME))
    if not isinstance(record, dict) or "method" not in record or "num_tasks" not in record:
        raise CheckpointError(f"{io.join_uri(out_uri, RECORD_NAME)} is not a distac merge record")
    return record


def save_merged(merged: Merged, out_uri: str, record: dict[str, Any] | None = None,
                 max_shard_bytes: int = io.DEFAULT_SHARD_BYTES, overwrite: bool = False) -> dict[str, Any]:
    """Write an in-memory merge in the same format as ``merge_checkpoints`` (without the served model), so
    ``load_merged``, ``materialize`` and the evaluator read either; ``record`` adds entries to merge.json."""
    out_uri = str(out_uri).rstrip("/")
    per_task = merged.masks is not None
    with staged_directory(out_uri, overwrite) as staging:
        io.save_state_dict(dict(merged.vector.items()), os.path.join(staging, VECTOR_DIR), max_shard_bytes)
        for i, mask in enumerate(merged.masks or ()):
            io.save_state_dict(mask, os.path.join(staging, mask_dir(i)), max_shard_bytes)
        written = {
            "method": merged.method,
            "num_tasks": merged.num_tasks,
            "num_tensors": len(merged.vector),
            "per_task": per_task,
            "scales": list(merged.scales) if per_task else None,
            "alpha": merged.alpha,
            "outputs": {"vector": VECTOR_DIR, "model": None,
                        "masks": [mask_dir(i) for i in range(merged.num_tasks)] if per_task else None},
            "path": "in-memory",
            "info": merged.info,
            **(record or {}),
        }
        io.write_json(written, os.path.join(staging, RECORD_NAME))
    return written


def load_merged(out_uri: str) -> Merged:
    """Read a merge's output (``merge_checkpoints`` or ``save_merged``) back into memory as a ``Merged``."""
    record = read_record(out_uri)
    vector = TaskVector(io.load_state_dict(io.join_uri(out_uri, VECTOR_DIR)))
    masks = scales = None
    if record["per_task"]:
        masks = tuple(io.load_state_dict(io.join_uri(out_uri, mask_dir(i))) for i in range(record["num_tasks"]))
        scales = tuple(record["scales"])
    alpha = record.get("alpha", (record.get("hyperparameters") or {}).get("alpha"))
    return Merged(method=record["method"], vector=vector, num_tasks=record["num_tasks"], masks=masks,
                  scales=scales, info=record, alpha=alpha)


def materialize(out_uri: str, pretrained_uri: str, task_index: int, model_uri: str,
                max_shard_bytes: int = io.DEFAULT_SHARD_BYTES, progress: bool = False,
                overwrite: bool = False) -> None:
    """Write the model task ``task_index`` is served with: θ_pre + τ_m (EMR: θ_pre + λ_i M_i ⊙ τ_uni)."""
    guard_output(model_uri, kind="checkpoint", inputs=[out_uri, pretrained_uri], overwrite=overwrite)
    record = read_record(out_uri)
    if not 0 <= task_index < record["num_tasks"]:
        raise ConfigError(f"task index {task_index} is out of range: {out_uri} merged {record['num_tasks']} tasks")
    vector = io.open_checkpoint(io.join_uri(out_uri, VECTOR_DIR))
    mask, scale = None, 1.0
    if record["per_task"]:
        mask = io.open_checkpoint(io.join_uri(out_uri, mask_dir(task_index)))
        scale = float(record["scales"][task_index])
    pretrained = pretrained_uri if isinstance(pretrained_uri, Mapping) else io.open_checkpoint(pretrained_uri)
    write_served_model(pretrained, vector, model_uri, mask=mask, scale=scale,
                       max_shard_bytes=max_shard_bytes, progress=progress, overwrite=overwrite)
