"""Exports that other tools load: transformers model directories, written tensor by tensor.

A merged or conditioned model of transformers checkpoints is written as a directory that
``AutoModelForCausalLM.from_pretrained`` / ``AutoModelForSequenceClassification.from_pretrained`` loads as it
is, the way mergekit writes its merges::

    config.json               θ_pre's (causal LM); task i's fine-tune's (classifier: its labels, problem type)
    generation_config.json    where that config's directory has one
    tokenizer files           θ_pre's, else the fine-tune's
    model.safetensors         or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    README.md                 model card: method, hyperparameters, α, sources with their sha256, distac version
    distac_export.json        the same provenance, machine-readable; written last, it marks a finished export

The weights keep a source checkpoint's key layout (a ``Layout``). A causal LM's source is θ_pre's checkpoint
and all of it is backbone: every tensor is θ_pre + τ (a tied ``lm_head`` is the embedding, left out as
``save_pretrained`` leaves it out). A classifier's source is task i's fine-tune: its encoder keys (``bert.*``)
get θ_pre + τ, everything else (the classifier and the pooler: the task's head, never merged) is the
fine-tune's own, so the export predicts what distac serves for that task. Tensors stream one at a time into
one shard buffer; the caller builds the directory in a staging location and moves it into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from distac import io
from distac.errors import CheckpointError, MismatchError

if TYPE_CHECKING:
    from distac.models.resolve import BackboneView

log = logging.getLogger(__name__)

MARKER = "distac_export.json"
CARD = "README.md"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spm.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "seqcls": "AutoModelForSequenceClassification"}
PIPELINE_TAGS = {"causal_lm": "text-generation", "seqcls": "text-classification"}


def task_dir(task_index: int) -> str:
    """The directory (under a merge's OUT) of the model task ``task_index`` is served with."""
    return f"task-{task_index}"


def distac_version() -> str:
    try:
        return importlib.metadata.version("distac")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


# --------------------------------------------------------------------------------------------- what to export


def _is_transformers(view: Any) -> bool:
    from distac.models.resolve import BackboneView

    return isinstance(view, BackboneView) and (view.form == "hf" or _lora_causal_lm(view))


def _lora_causal_lm(view: Any) -> bool:
    """A LoRA adapter of a transformers causal LM (``distac.models.lora.AdapterView``): exported as its base is."""
    return getattr(view, "form", None) == "lora" and getattr(view, "task", None) == "causal_lm"


def export_kind(pretrained: Any, finetuned: Sequence[Any]) -> str | None:
    """'causal_lm' or 'seqcls' when models named this way are served as transformers directories, else None.

    The models must be ``backbone_checkpoint`` views of transformers directories (what ``paired_backbones``
    gives). None for every other form (bare checkpoints, distac model directories, CLIP, bare encoders): those
    keep distac's tensor outputs. A classifier export needs the fine-tunes (their heads); a causal LM's does not.
    """
    from distac.models.resolve import hf_kind

    if not _is_transformers(pretrained) or not all(_is_transformers(view) for view in finetuned):
        return None
    kinds = {"causal_lm" if _lora_causal_lm(view) else hf_kind(view.uri) for view in finetuned}
    pre_kind = hf_kind(pretrained.uri)
    if pre_kind == "causal_lm" and kinds <= {"causal_lm"}:
        return "causal_lm"
    if kinds == {"seqcls"} and pre_kind in ("seqcls", "base"):
        return "seqcls"
    return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one exported directory's files come from, and which of its tensors are backbone (θ_pre + τ)."""

    kind: str
    config_dir: str                      # local directory whose config.json (and generation config) it carries
    tokenizer_dir: str | None            # local directory whose tokenizer files it carries
    source: Mapping[str, torch.Tensor]   # the checkpoint whose keys (and non-backbone tensors) it has
    prefix: str                          # what the source's backbone keys carry before the backbone name
    backbone: frozenset[str]             # the backbone names (task-vector keys) the source holds

    def backbone_key(self, key: str) -> str | None:
        """The backbone name of the source's ``key`` ('bert.encoder.x' → 'encoder.x'); None for head tensors."""
        if not key.startswith(self.prefix):
            return None
        name = key[len(self.prefix):]
        return name if name in self.backbone else None


def _tokenizer_dir(*candidates: str) -> str | None:
    from distac.models.hf_seqcls import has_tokenizer

    for directory in candidates:
        if has_tokenizer(directory):
            return directory
    log.warning("none of %s holds tokenizer files: the export carries no tokenizer", ", ".join(candidates))
    return None


def layout(kind: str, pretrained: BackboneView, finetuned: BackboneView | None = None) -> Layout:
    """The layout of a served model: θ_pre's (causal LM; ``finetuned`` only lends its tokenizer when θ_pre has
    none) or task ``finetuned``'s (classifier: its config, its head and pooler)."""
    from distac.models.resolve import backbone_checkpoint, base_model_prefix, hf_weights_uri, local_hf_dir

    pre_dir = local_hf_dir(pretrained.uri)
    if kind == "causal_lm":
        source = backbone_checkpoint(pretrained.uri)  # the whole network; a tied lm_head left out
        extra = [local_hf_dir(finetuned.uri)] if finetuned is not None else []
        return Layout(kind, pre_dir, _tokenizer_dir(pre_dir, *extra), source, "", frozenset(source))
    if kind != "seqcls" or finetuned is None:
        raise ValueError(f"no export layout for kind {kind!r} without the task's fine-tuned model")
    ft_dir = local_hf_dir(finetuned.uri)
    reader = io.open_checkpoint(hf_weights_uri(finetuned.uri))
    prefix = base_model_prefix(finetuned.uri) + "."
    prefix = prefix if any(key.startswith(prefix) for key in reader) else ""
    return Layout(kind, ft_dir, _tokenizer_dir(pre_dir, ft_dir), reader, prefix,
                  frozenset(backbone_checkpoint(finetuned.uri)))


# --------------------------------------------------------------------------------------------- the tensors


def served_tensor(key: str, base: torch.Tensor, vector: Mapping[str, torch.Tensor],
                  mask: Mapping[str, torch.Tensor] | None = None, scale: float = 1.0) -> torch.Tensor:
    """θ_pre's ``base`` plus scale · mask ⊙ τ[key] (``base`` when τ has no ``key``), in ``base``'s dtype."""
    if key not in vector:
        return base
    delta = vector[key]
    if delta.shape != base.shape:
        raise MismatchError(f"tensor {key!r}: shape {tuple(delta.shape)} in the merge, "
                            f"{tuple(base.shape)} in the pretrained model")
    if mask is not None:
        delta = scale * mask[key].to(delta.dtype) * delta
    return (base + delta.to(base.dtype)).to(base.dtype)


def export_tensors(target: Layout, pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                   mask: Mapping[str, torch.Tensor] | None = None, scale: float = 1.0
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The served model's tensors under the source's keys, one at a time: backbone keys θ_pre + scale · mask ⊙ τ,
    the rest (a classifier's head and pooler) the source's own."""
    missing = [key for key in vector if key not in target.backbone]
    if missing:
        raise MismatchError(f"the merged vector has tensors the exported model lacks: {', '.join(missing[:5])}")
    for key in target.source:
        name = target.backbone_key(key)
        if name is None:
            yield key, target.source[key]
            continue
        if name in pretrained:
            base = pretrained[name]
        else:  # an integer buffer θ_pre's floating state leaves out is the source's own
            base = target.source[key]
            if base.is_floating_point():
                raise MismatchError(f"tensor {key!r} of the exported model has no pretrained value {name!r}")
        yield key, served_tensor(name, base, vector, mask, scale)


# --------------------------------------------------------------------------------------------- provenance


def weights_files(uri: str) -> list[str]:
    """The local weights files of a transformers directory: its single file, or the shards its index names."""
    from distac.models.lora import ADAPTER_WEIGHTS, is_adapter_dir
    from distac.models.resolve import hf_weights_uri

    if is_adapter_dir(uri):  # a LoRA adapter: its adapter weights
        return [path for path in (os.path.join(uri, name) for name in ADAPTER_WEIGHTS) if os.path.exists(path)]
    path = hf_weights_uri(uri)
    if not path.endswith(".index.json"):
        return [path]
    weight_map = io.read_json(path).get("weight_map") or {}
    return [os.path.join(os.path.dirname(path), name) for name in sorted(set(weight_map.values()))]


def sha256_file(path: str) -> str:
    """The sha256 of a file, read in chunks (never the whole file in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def describe_sources(pretrained: Any, finetuned: Sequence[Any]) -> list[dict[str, Any]]:
    """Each input model (a view or its name) with the sha256 of each of its weights files; ``files`` is None for
    a model whose weights are not found (a merge record's input that has moved since)."""
    described = []
    for role, model in [("pretrained", pretrained), *(("finetuned", model) for model in finetuned)]:
        name = str(model)
        try:
            files = [{"name": os.path.basename(path), "sha256": sha256_file(path)} for path in weights_files(name)]
        except (CheckpointError, OSError):
            files = None
        described.append({"role": role, "model": io.redact(name), "files": files})
    return described


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What made an export; its model card and distac_export.json say it."""

    action: str                                  # 'merge' or 'condition'
    method: str                                  # the merge method, or 'distac'
    hyperparameters: Mapping[str, Any]
    alpha: float | None
    sources: Sequence[Mapping[str, Any]]         # describe_sources(...)
    num_tasks: int = 1
    task: int | None = None                      # the task this directory serves; None: every task
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # EMR's λ_i, DisTaC's κ and norms

    def for_task(self, task: int, **details: Any) -> "Provenance":
        return dataclasses.replace(self, task=task, details={**self.details, **details})

    def to_dict(self) -> dict[str, Any]:
        return {"distac_version": distac_version(), **dataclasses.asdict(self)}


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value) or "none"
    return str(value).replace("|", "\\|")


def model_card(provenance: Provenance, kind: str, architecture: str | None) -> str:
    """A README.md with Hugging Face front matter (``base_model``, ``library_name``, tags) and the provenance."""
    p = provenance
    front = ["---", "base_model:", *(f"- {json.dumps(s['model'])}" for s in p.sources)]
    if p.action == "merge":
        front.append("base_model_relation: merge")
    tags = ["merge", "distac", p.method] if p.action == "merge" else ["distac", "task-vector-conditioning"]
    front += ["library_name: transformers", f"pipeline_tag: {PIPELINE_TAGS[kind]}", "tags:",
              *(f"- {tag}" for tag in tags), "---", ""]
    pretrained = next(s["model"] for s in p.sources if s["role"] == "pretrained")
    if p.action == "merge":
        title = f"# {p.method} merge of {p.num_tasks} models"
        what = (f"Merged with distac {distac_version()}: θ_pre + τ_m, where τ_m = "
                f"`{p.method}`(τ_1, …, τ_{p.num_tasks}) and τ_t = θ_t − θ_pre over the shared weights, "
                f"θ_pre = `{pretrained}`.")
    else:
        title = "# DisTaC-conditioned model"
        what = (f"Conditioned with distac {distac_version()}: θ_pre + τ', where τ' is the "
                f"fine-tuned model's task vector after DisTaC (distillation from the fine-tuned model on "
                f"unlabeled inputs), θ_pre = `{pretrained}`.")
    if p.task is not None:
        what += f" This directory serves task {p.task} of {p.num_tasks}"
        what += (" with that task's own classification head and pooler." if kind == "seqcls" else ".")
    alpha = [("α", "none" if p.alpha is None else p.alpha)] if p.action == "merge" else []
    rows = [("method", f"`{p.method}`"), *alpha,
            *((name, value) for name, value in p.hyperparameters.items() if name != "alpha"),
            *p.details.items(), ("architecture", architecture or "unknown"), ("distac", distac_version())]
    body = [title, "", what, "", "## Method", "", "| setting | value |", "|---|---|",
            *(f"| {_cell(name)} | {_cell(value)} |" for name, value in rows), "",
            "## Sources", "", "| role | model | file | sha256 |", "|---|---|---|---|"]
    for source in p.sources:
        for file in source["files"] or [{"name": "(not found)", "sha256": "not computed"}]:
            body.append(f"| {source['role']} | `{_cell(source['model'])}` | {_cell(file['name'])} | "
                        f"`{file['sha256']}` |")
    body += ["", "## Use", "", "```python", f"from transformers import {AUTO_CLASSES[kind]}, AutoTokenizer", "",
             f'model = {AUTO_CLASSES[kind]}.from_pretrained("path/to/this/directory")',
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```", ""]
    return "\n".join(front + body)


# --------------------------------------------------------------------------------------------- writing


def _copy_model_files(target: Layout, directory: str) -> None:
    """config.json and generation_config.json from the config directory; the tokenizer files."""
    if not os.path.exists(os.path.join(target.config_dir, CONFIG)):
        raise CheckpointError(f"{target.config_dir} has no {CONFIG} to export")
    for name in (CONFIG, GENERATION_CONFIG):
        if os.path.exists(os.path.join(target.config_dir, name)):
            shutil.copyfile(os.path.join(target.config_dir, name), os.path.join(directory, name))
    for name in TOKENIZER_FILES if target.tokenizer_dir else ():
        if os.path.exists(os.path.join(target.tokenizer_dir, name)):
            shutil.copyfile(os.path.join(target.tokenizer_dir, name), os.path.join(directory, name))


def _write_weights(directory: str, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Sharded safetensors in transformers' layout at ``directory``'s top level (beside other files)."""
    staged = os.path.join(directory, ".weights")
    with io.ShardedSafetensorsWriter(staged, max_shard_bytes) as writer:
        for key, tensor in tensors:
            writer.add(key, tensor)
    for name in sorted(os.listdir(staged)):
        os.replace(os.path.join(staged, name), os.path.join(directory, name))
    os.rmdir(staged)


def write_export(directory: str, target: Layout, tensors: Iterable[tuple[str, torch.Tensor]],
                 provenance: Provenance, max_shard_bytes: int = io.DEFAULT_SHARD_BYTES,
                 progress: bool = False) -> None:
    """Write one loadable model directory at the local path ``directory`` (created if needed; a staging
    location the caller moves into place), its marker last."""
    os.makedirs(directory, exist_ok=True)
    _copy_model_files(target, directory)
    label = "write model" if provenance.task is None else f"write {task_dir(provenance.task)}"
    _write_weights(directory, tqdm(tensors, desc=label, unit="tensor", total=len(target.source),
                                   disable=not progress), max_shard_bytes)
    architecture = (json.loads(Path(target.config_dir, CONFIG).read_text()).get("architectures") or [None])[0]
    Path(directory, CARD).write_text(model_card(provenance, target.kind, architecture))
    io.write_json({**provenance.to_dict(), "kind": target.kind, "architecture": architecture},
                  os.path.join(directory, MARKER))


def write_merged(directory: str, kind: str, pretrained: BackboneView, finetuned: Sequence[BackboneView],
                 vector: Mapping[str, torch.Tensor], provenance: Provenance,
                 masks: Sequence[Mapping[str, torch.Tensor]] | None = None, scales: Sequence[float] | None = None,
                 max_shard_bytes: int = io.DEFAULT_SHARD_BYTES, progress: bool = False) -> dict[str, Any]:
    """The served models of a merge, one pass over the vector each: a causal LM merged into one vector is
    ``directory`` itself; per-task outputs (EMR's ``masks`` and ``scales``, and every classifier merge: each
    task has its own head) are ``directory/task-<i>``. Returns the record's ``outputs`` entries."""
    from distac.models.resolve import backbone_checkpoint

    pre = backbone_checkpoint(pretrained.uri)  # all of θ_pre's backbone, not only the first fine-tune's keys
    if kind == "causal_lm" and masks is None:
        target = layout(kind, pretrained, finetuned[0] if finetuned else None)
        write_export(directory, target, export_tensors(target, pre, vector), provenance, max_shard_bytes, progress)
        return {"model": ".", "tasks": None}
    for i, model in enumerate(finetuned):
        mask, scale = (masks[i], float(scales[i])) if masks is not None else (None, 1.0)
        details = {"scale": scale} if masks is not None else {}  # EMR's λ_i
        target = layout(kind, pretrained, model)
        write_export(os.path.join(directory, task_dir(i)), target, export_tensors(target, pre, vector, mask, scale),
                     provenance.for_task(i, **details), max_shard_bytes, progress)
    return {"model": None, "tasks": [task_dir(i) for i in range(len(finetuned))]}


def write_conditioned(directory: str, pretrained_uri: str, finetuned_uri: str,
                      pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                      hyperparameters: Mapping[str, Any], details: Mapping[str, Any],
                      max_shard_bytes: int = io.DEFAULT_SHARD_BYTES) -> str | None:
    """θ_pre + τ' (``pretrained`` + ``vector``, backbone names) as a loadable directory at ``directory`` when the
    models are transformers checkpoints; returns the export kind, or None when they are not."""
    from distac.models.resolve import backbone_checkpoint, model_form

    if model_form(str(pretrained_uri)) != "hf" or model_form(str(finetuned_uri)) != "hf":
        return None
    pre_view, ft_view = backbone_checkpoint(pretrained_uri), backbone_checkpoint(finetuned_uri)
    kind = export_kind(pre_view, [ft_view])
    if kind is None:
        return None
    provenance = Provenance("condition", "distac", dict(hyperparameters), None,
                            describe_sources(pre_view, [ft_view]), details=dict(details))
    target = layout(kind, pre_view, ft_view)
    write_export(directory, target, export_tensors(target, pretrained, vector), provenance, max_shard_bytes)
    return kind
