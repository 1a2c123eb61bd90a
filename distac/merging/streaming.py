"""Streaming merge: checkpoints in, sharded safetensors out, one tensor at a time.

``merge_checkpoints`` reads the pretrained and fine-tuned checkpoints lazily, runs the same engine as the
in-memory ``merge`` (``iter_merged``) and writes, under OUT::

    vector/            τ_m (EMR: the unified vector τ_uni), sharded safetensors in the inputs' dtype
    masks/task-<i>/    EMR only: task i's boolean mask
    merge.json         method, hyperparameters, inputs (and their sha256 for exports), number of tasks, EMR
                       scales, outputs, path and device

and the served model θ_pre + τ_m:

- transformers causal LMs (``paired_backbones`` views): OUT itself is a directory ``from_pretrained`` loads
  (config, tokenizer, weights, README.md model card; ``distac.export``); EMR: one such directory per task,
  OUT/task-<i>/;
- transformers sequence classifiers: OUT/task-<i>/ per task, each with task i's own head and pooler;
- anything else: model/, θ_pre + τ_m over every pretrained key (other keys passed through); not for EMR;
- with ``lora_rank``: instead, τ_m as a peft LoRA adapter (``distac.models.lora.write_adapter``): OUT itself
  (classifiers: OUT/task-<i>/ with each task's head) and OUT/lora_report.json.

Memory holds the T input tensors of two keys (the one being merged and the next, read ahead in a
background thread) plus one shard buffer: ``max_shard_bytes`` for the vector, and
for EMR that budget split evenly between the vector and its T mask writers (masks take one byte per
entry). The models are written in later passes that read the staged vector back, one model at a time, so
no two outputs buffer at the same time. Everything is staged in a temporary directory and
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

from distac import export, io
from distac.errors import CheckpointError, ConfigError, DistacError, MismatchError
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
def staged_directory(out_uri: str, overwrite: bool = False, inputs: Sequence[str] = (), kind: str = "merge",
                     last: str = RECORD_NAME) -> Iterator[str]:
    """A local directory to build OUT in; moved (or uploaded, ``last`` last) to OUT only on success.

    OUT must not be or contain one of ``inputs``; it may hold an earlier output of ``kind`` (it is replaced),
    anything else only with ``overwrite``."""
    guard_output(out_uri, kind=kind, inputs=inputs, overwrite=overwrite)
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
            _upload(staging, out_uri, last)
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


def _upload(staging: str, out_uri: str, last: str = RECORD_NAME) -> None:
    fs, path = io.url_to_fs(out_uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    files = sorted(os.path.relpath(os.path.join(root, name), staging)
                   for root, _, names in os.walk(staging) for name in names)
    files.sort(key=lambda name: name == last)  # the record marks a complete output: upload it last
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
            tensor = export.served_tensor(key, pretrained[key], vector, mask, scale)
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
                      read_ahead_bytes: int = READ_AHEAD_BYTES, lora_rank: int | None = None) -> dict[str, Any]:
    """Merge fine-tuned checkpoints tensor by tensor into OUT (layout in the module docstring).

    OUT must not be or contain an input; it may hold an earlier merge, anything else only with ``overwrite``.
    ``read_ahead_bytes`` bounds the next key's inputs read while the current key merges (0: no reading ahead).
    Inputs may also be lazy mappings (``distac.models.resolve.backbone_checkpoint`` views of any model form);
    views of transformers causal LMs or sequence classifiers (``paired_backbones``) get loadable exports.
    ``lora_rank`` writes τ_m as a rank-``lora_rank`` LoRA adapter instead of the served model.
    Returns the record written to OUT/merge.json.
    """
    method = get_method(method) if isinstance(method, str) else method
    if not finetuned_uris:
        raise ConfigError("merging needs at least one fine-tuned checkpoint")
    if lora_rank is not None:
        from distac.models.lora import check_rank

        if method.per_task:
            raise ConfigError(f"{method.name} serves each task its own vector; it cannot be written as one LoRA "
                              "adapter (merge without --out-format lora)")
        check_rank(pretrained_uri, lora_rank)
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
    export_kind = export.export_kind(pretrained_uri, finetuned_uris)  # transformers directories, or None
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
        outputs: dict[str, Any] = {"vector": VECTOR_DIR, "model": None, "tasks": None,
                                   "masks": [mask_dir(i) for i in range(num_tasks)] if method.per_task else None}
        described = None
        staged_vector = io.open_checkpoint(os.path.join(staging, VECTOR_DIR))
        if lora_rank is not None:
            from distac.models.lora import write_adapter

            outputs["lora"] = write_adapter(staging, pretrained_uri, staged_vector, lora_rank, finetuned_uris,
                                            progress)
        elif write_model and export_kind is not None:
            described = export.describe_sources(pretrained_uri, finetuned_uris)
            provenance = export.Provenance("merge", method.name, dataclasses.asdict(method),
                                           method.alpha if method.has_alpha else None, described, num_tasks)
            masks = ([io.open_checkpoint(os.path.join(staging, mask_dir(i))) for i in range(num_tasks)]
                     if method.per_task else None)
            outputs.update(export.write_merged(staging, export_kind, pretrained_uri, finetuned_uris, staged_vector,
                                               provenance, masks, scales, max_shard_bytes, progress))
        elif write_model and not method.per_task:
            write_served_model(pretrained, staged_vector, os.path.join(staging, MODEL_DIR),
                               max_shard_bytes=max_shard_bytes, progress=progress)
            outputs["model"] = MODEL_DIR
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
            "export": export_kind,
            "sources": described,
            "outputs": outputs,
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
            "export": None,
            "outputs": {"vector": VECTOR_DIR, "model": None, "tasks": None,
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


def materialize(out_uri: str, pretrained_uri: str | Mapping[str, torch.Tensor], task_index: int, model_uri: str,
                max_shard_bytes: int = io.DEFAULT_SHARD_BYTES, progress: bool = False, overwrite: bool = False,
                finetuned_uri: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the model task ``task_index`` is served with: θ_pre + τ_m (EMR: θ_pre + λ_i M_i ⊙ τ_uni).

    With ``backbone_checkpoint`` views of transformers models the model is a directory ``from_pretrained``
    loads (``distac.export``); a classifier's needs ``finetuned_uri``, that task's fine-tuned model, for its
    head and pooler. Otherwise: θ_pre's tensors, a checkpoint directory or file."""
    inputs = [out_uri, str(pretrained_uri), *([str(finetuned_uri)] if finetuned_uri is not None else [])]
    record = read_record(out_uri)
    if not 0 <= task_index < record["num_tasks"]:
        raise ConfigError(f"task index {task_index} is out of range: {out_uri} merged {record['num_tasks']} tasks")
    kind = _materialized_kind(record, out_uri, task_index, pretrained_uri, finetuned_uri)
    if kind is not None and str(model_uri).endswith((io.SAFETENSORS_SUFFIX, *io.TORCH_SUFFIXES)):
        raise ConfigError(f"{model_uri}: a transformers model is a directory; give a directory as the output")
    guard_output(model_uri, kind="checkpoint" if kind is None else "export", inputs=inputs, overwrite=overwrite)
    vector = io.open_checkpoint(io.join_uri(out_uri, VECTOR_DIR))
    mask, scale = None, 1.0
    if record["per_task"]:
        mask = io.open_checkpoint(io.join_uri(out_uri, mask_dir(task_index)))
        scale = float(record["scales"][task_index])
    if kind is None:
        pretrained = pretrained_uri if isinstance(pretrained_uri, Mapping) else io.open_checkpoint(pretrained_uri)
        write_served_model(pretrained, vector, model_uri, mask=mask, scale=scale,
                           max_shard_bytes=max_shard_bytes, progress=progress, overwrite=overwrite)
        return
    from distac.models.resolve import backbone_checkpoint

    sources = record.get("sources") or export.describe_sources(record["inputs"]["pretrained"],
                                                               record["inputs"]["finetuned"])
    provenance = export.Provenance("merge", record["method"], record.get("hyperparameters") or {},
                                   record.get("alpha"), sources, record["num_tasks"])
    provenance = provenance.for_task(task_index, **({"scale": scale} if record["per_task"] else {}))
    with staged_directory(model_uri, overwrite, inputs, kind="export", last=export.MARKER) as staging:
        target = export.layout(kind, pretrained_uri, finetuned_uri)
        tensors = export.export_tensors(target, backbone_checkpoint(pretrained_uri.uri), vector, mask, scale)
        export.write_export(staging, target, tensors, provenance, max_shard_bytes, progress)


def _materialized_kind(record: Mapping[str, Any], out_uri: str, task_index: int, pretrained: Any,
                       finetuned: Any) -> str | None:
    """The export kind of task ``task_index``'s model, refusing a classifier merge without that task's fine-tune
    (its head) and a fine-tune that a causal-LM or tensor merge has no use for."""
    finetuned_list = [finetuned] if finetuned is not None else []
    kind = export.export_kind(pretrained, finetuned_list)
    if kind is None and _merged_classifiers(record, task_index, pretrained):
        recorded = record["inputs"]["finetuned"][task_index]
        if finetuned is None:
            raise ConfigError(f"{out_uri} merged sequence classifiers: the model of task {task_index} needs that "
                              f"task's own head and pooler; give its fine-tuned model with --finetuned (the merge "
                              f"read task {task_index} from {recorded})")
        raise ConfigError(f"--finetuned {finetuned}: expected the transformers sequence classifier of task "
                          f"{task_index} (the merge read it from {recorded}), and --pretrained as a transformers "
                          "model")
    if finetuned is not None and kind != "seqcls":
        raise ConfigError(f"--finetuned {finetuned} is only for a merge of transformers sequence classifiers (it "
                          f"lends task {task_index} its head and pooler); {out_uri} needs only --pretrained")
    return kind


def _merged_classifiers(record: Mapping[str, Any], task_index: int, pretrained: Any) -> bool:
    """Whether a merge's task models are transformers classifiers: its record says so (older records: θ_pre or
    the recorded fine-tune of the task is one)."""
    from distac.models.resolve import hf_kind, model_form

    if record.get("export") is not None:
        return record["export"] == "seqcls"
    for uri in (str(pretrained), record["inputs"]["finetuned"][task_index]):
        try:
            if model_form(uri) == "hf" and hf_kind(uri) == "seqcls":
                return True
        except (DistacError, OSError, ValueError):  # moved, or not a model name: nothing to tell
            continue
    return False
