"""One way to name a model everywhere: a distac model directory, a Hugging Face sequence-classification
checkpoint (directory, hub id from the local cache, or s3:// directory), a model spec file (JSON, e.g.
``{"kind": "open_clip", "model_name": "ViT-B-32", "pretrained": "openai"}``: θ_pre of a model family), or a bare
checkpoint file (safetensors, a state dict, or a pickled module such as the task-vector literature's saved
image encoders, read without executing code from it: ``distac.models.pickled``), or a peft LoRA adapter
directory (θ_pre + ΔW over its base: ``distac.models.lora``).

- ``load_model(uri, pretrained=...)`` → ``LoadedModel`` (adapter, TaskModel in eval mode, meta with
  ``class_names``) for every form that defines a model;
- ``backbone_checkpoint(uri)`` → a lazy ``Mapping[str, Tensor]`` over the tensors a task vector covers, for
  every form (tensor-level commands: extract, merge, diagnose's norms);
- ``paired_backbones(pretrained, finetuned)`` checks θ_pre against every fine-tuned model before any work
  and names the first tensor whose name or shape differs.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from distac import io
from distac.errors import CheckpointError, MismatchError
from distac.models import build_adapter, store
from distac.models.base import ModelAdapter
from distac.models.store import LoadedModel

FORMS = ("distac", "hf", "lora", "spec", "checkpoint")
SPEC_SUFFIX = ".json"
ZERO_SHOT_KINDS = ("open_clip", "hf_clip")
HF_CLIP_TYPES = ("clip", "clip_vision_model")
SAME_FAMILY = {"clip_vision_model": "clip"}  # a CLIPVisionModel fine-tune of a CLIPModel
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_LOCAL_COPIES: dict[str, str] = {}  # s3:// Hugging Face directory → its local copy, removed at exit


@atexit.register
def _remove_local_copies() -> None:
    """Delete the local copies of remote Hugging Face directories: a model's weights must not outlive the run
    in the temporary directory."""
    while _LOCAL_COPIES:
        shutil.rmtree(_LOCAL_COPIES.popitem()[1], ignore_errors=True)


def _exists(uri: str) -> bool:
    fs, path = io.url_to_fs(uri)
    return fs.exists(path)


def _is_hub_id(uri: str) -> bool:
    return "://" not in uri and not Path(uri).exists() and HUB_ID.fullmatch(uri) is not None


def _bundled(uri: str) -> str:
    """'minilm' (the bundled all-MiniLM-L6-v2) as its directory; anything else unchanged."""
    from distac.models.text import BUNDLED_MINILM, resolve_model_path

    return resolve_model_path(uri) if uri.lower() == BUNDLED_MINILM else uri


def _hub_snapshot(repo_id: str) -> str | None:
    """The local cache directory of a hub model, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, HF_CONFIG)
    return os.path.dirname(found) if isinstance(found, str) else None


def model_form(uri: str | os.PathLike) -> str:
    """'distac' (has meta.json), 'hf' (a transformers directory or cached hub id), 'lora' (a peft adapter
    directory), 'spec' (a JSON model spec) or 'checkpoint'."""
    uri = _bundled(str(uri).rstrip("/"))
    if _is_hub_id(uri):
        if _hub_snapshot(uri) is None:
            raise CheckpointError(f"{uri} is neither a local path nor a hub model in the local cache "
                                  "(the hub is not reachable offline)")
        return "hf"
    if _exists(store.meta_uri(uri)):
        return "distac"
    from distac.models.lora import is_adapter_dir

    if is_adapter_dir(uri):
        return "lora"
    if _exists(io.join_uri(uri, HF_CONFIG)):
        return "hf"
    if not _exists(uri):
        raise CheckpointError(f"model not found: {uri}")
    if uri.endswith(SPEC_SUFFIX) and not uri.endswith(".index.json"):
        return "spec"
    return "checkpoint"


def read_model_spec(uri: str) -> dict:
    """A model spec file: a JSON adapter spec (``{"kind": ...}``, as in params.yaml's ``model:``)."""
    try:
        spec = io.read_json(uri)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the model spec {uri} ({exc})") from None
    if not isinstance(spec, dict) or "kind" not in spec:
        raise CheckpointError(f"{uri} is not a model spec: expected a JSON object with a 'kind' field")
    return spec


def open_raw_checkpoint(uri: str) -> io.CheckpointReader:
    """A bare checkpoint; a torch file that pickles whole modules is read through the code-free unpickler."""
    try:
        return io.open_checkpoint(uri)
    except CheckpointError:
        if not uri.endswith(io.TORCH_SUFFIXES) or not io.is_local(uri):
            raise
    from distac.models.pickled import load_pickled_weights

    return io.CheckpointReader(uri, tensors=load_pickled_weights(io.url_to_fs(uri)[1]))


def local_hf_dir(uri: str) -> str:
    """A local directory transformers can read: the path itself, the hub cache, or a copy of an s3:// directory."""
    uri = _bundled(str(uri).rstrip("/"))
    if _is_hub_id(uri):
        return _hub_snapshot(uri) or uri
    if io.is_local(uri):
        return io.url_to_fs(uri)[1]
    if uri not in _LOCAL_COPIES:
        fs, path = io.url_to_fs(uri)
        target = tempfile.mkdtemp(prefix="distac-hf-")
        try:
            for remote in fs.ls(path, detail=False):
                if fs.isfile(remote):
                    fs.get_file(remote, os.path.join(target, remote.rsplit("/", 1)[-1]))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        _LOCAL_COPIES[uri] = target
    return _LOCAL_COPIES[uri]


def hf_config(uri: str) -> dict:
    try:
        return json.loads(Path(local_hf_dir(uri), HF_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {io.join_uri(uri, HF_CONFIG)} ({exc})") from None


def hf_weights_uri(uri: str) -> str:
    """The weights file (or index) of a transformers directory."""
    directory = local_hf_dir(uri)
    for name in HF_WEIGHTS:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise CheckpointError(f"{uri} has a {HF_CONFIG} but no weights (looked for {', '.join(HF_WEIGHTS)})")


def hf_architecture(uri: str) -> str | None:
    """The model class a transformers directory was saved from (``config.json: architectures[0]``), if named."""
    names = hf_config(uri).get("architectures") or []
    return str(names[0]) if names else None


def _transformers_classes(mapping: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, mapping).values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def hf_kind(uri: str) -> str:
    """What a transformers directory holds: 'causal_lm' (``*ForCausalLM``, ``GPT2LMHeadModel``), 'seqcls'
    (``*ForSequenceClassification``), 'clip', 'base' (a bare ``AutoModel``: θ_pre only) or 'other' (any head
    distac cannot serve: masked LM, token classification, question answering, ...)."""
    config = hf_config(uri)
    if config.get("model_type") in HF_CLIP_TYPES:
        return "clip"
    architecture = hf_architecture(uri)
    if architecture is None:
        return "seqcls"  # an old config without the field: the classifier route has always taken it
    if architecture in _transformers_classes("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "causal_lm"
    if architecture in _transformers_classes("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"):
        return "seqcls"
    if architecture in _transformers_classes("MODEL_MAPPING_NAMES"):
        return "base"
    return "other"


SUPPORTED = ("sequence classifiers (*ForSequenceClassification), causal language models (*ForCausalLM), CLIP, "
             "and bare encoders (AutoModel) as the pretrained model")


def refuse_unservable(uri: str, role: str = "fine-tuned model") -> None:
    """A ``role`` whose architecture has no head distac can serve is refused before any work, naming the file."""
    kind = hf_kind(uri)
    if kind == "other" or (kind == "base" and role != "pretrained model"):
        raise CheckpointError(
            f"{io.join_uri(uri, HF_CONFIG)}: architecture {hf_architecture(uri)!r} "
            + ("has no trained classification head or language-model head" if kind == "base" else
               "is not one distac can serve") + f"; as a {role} distac supports {SUPPORTED}")


def base_model_prefix(uri: str) -> str:
    """The attribute name of the encoder inside the architecture's sequence-classification class ('bert', 'model')."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    directory = local_hf_dir(uri)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model_class = AutoModelForSequenceClassification._model_mapping[type(config)]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{io.join_uri(uri, HF_CONFIG)}: architecture "
                              f"{hf_config(uri).get('model_type')!r} has no sequence-classification model "
                              f"in transformers ({exc})") from None
    return model_class.base_model_prefix


class BackboneView(Mapping[str, torch.Tensor]):
    """A lazy checkpoint view renamed to encoder keys: ``<prefix>.<key>`` → ``<key>``, other keys dropped."""

    def __init__(self, reader: io.CheckpointReader, uri: str, prefix: str = "", drop: Sequence[str] = (),
                 form: str = "checkpoint", keep: Sequence[str] = ("",)):
        self.reader, self.uri, self.form = reader, uri, form
        self._source = {key[len(prefix):]: key for key in reader if key.startswith(prefix)
                        and key[len(prefix):].startswith(tuple(keep))
                        and not key[len(prefix):].startswith(tuple(drop))}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.reader[self._source[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)

    def __contains__(self, key: object) -> bool:
        return key in self._source

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(self._source[key])

    def dtype(self, key: str) -> torch.dtype:
        return self.reader.dtype(self._source[key])

    def restricted(self, keys: Sequence[str]) -> "BackboneView":
        view = BackboneView.__new__(BackboneView)
        view.reader, view.uri, view.form = self.reader, self.uri, self.form
        view._source = {key: self._source[key] for key in keys}
        return view

    def __str__(self) -> str:
        return self.uri


def backbone_checkpoint(uri: str | os.PathLike) -> BackboneView:
    """The backbone tensors of any model form (a classification checkpoint: its encoder without the pooler)."""
    uri = str(uri).rstrip("/")
    form = model_form(uri)
    if form == "distac":
        target = store.backbone_uri(uri)
        return BackboneView(io.open_checkpoint(target), uri, form=form)
    if form == "checkpoint":
        return BackboneView(open_raw_checkpoint(uri), uri)
    if form == "lora":  # θ_pre + ΔW over the adapter's own base model
        from distac.models.lora import adapter_view

        return adapter_view(uri)
    if form == "spec":
        state = build_adapter(read_model_spec(uri)).pretrained_backbone_state()
        return BackboneView(io.CheckpointReader(uri, tensors=state), uri, form=form)
    reader = io.open_checkpoint(hf_weights_uri(uri))
    if hf_kind(uri) == "causal_lm":  # the whole network; a tied lm_head is the embedding, merged once
        tied = hf_config(uri).get("tie_word_embeddings", True)
        return BackboneView(reader, uri, form=form, drop=("lm_head.",) if tied else ())
    if hf_config(uri).get("model_type") in HF_CLIP_TYPES:  # CLIP: the image tower
        from distac.models.hf_clip import BACKBONE_PREFIXES

        return BackboneView(reader, uri, form=form, keep=BACKBONE_PREFIXES)
    prefix = base_model_prefix(uri) + "."
    if any(key.startswith(prefix) for key in reader):  # a classification (or pretraining) checkpoint
        return BackboneView(reader, uri, prefix, drop=("pooler.",), form=form)
    return BackboneView(reader, uri, form=form)  # a bare encoder (AutoModel.save_pretrained)


def align_to(view: BackboneView, reference: Mapping[str, torch.Tensor]) -> BackboneView:
    """``view`` renamed to ``reference``'s keys when its own keys carry an extra prefix (a full CLIP state dict
    ``visual.*`` or a pickled image encoder ``model.visual.*`` against an image tower's θ_pre)."""
    if all(key in reference for key in view) or view.form not in ("checkpoint", "hf"):
        return view
    anchor = next(iter(reference), None)
    for key in view:
        if anchor is not None and key.endswith("." + anchor):
            prefix = key[:-len(anchor)]
            renamed = BackboneView(view.reader, view.uri, prefix)
            if len(renamed) and all(k in reference for k in renamed):
                return renamed
    return view


def _finetuned_view(uri: str | os.PathLike, pre: BackboneView) -> BackboneView:
    """A fine-tuned model's backbone; a LoRA adapter's is θ_pre (``pre``) + ΔW."""
    if model_form(uri) == "lora":
        from distac.models.lora import adapter_view

        return adapter_view(str(uri).rstrip("/"), pre)
    return backbone_checkpoint(uri)


def paired_backbones(pretrained: str | os.PathLike | BackboneView, finetuned: Sequence[str | os.PathLike]
                     ) -> tuple[BackboneView, list[BackboneView]]:
    """θ_pre restricted to the fine-tuned models' backbone keys (unless θ_pre is a bare checkpoint, whose other
    keys a merged model keeps), and those models' backbones.

    Raises MismatchError before any tensor is read when a fine-tuned model has a tensor θ_pre lacks or of
    another shape, naming the tensor and both files.
    """
    pre = pretrained if isinstance(pretrained, BackboneView) else backbone_checkpoint(pretrained)
    models = [align_to(_finetuned_view(uri, pre), pre) for uri in finetuned]
    for model in models:
        if pre.form == model.form == "hf":
            ours, theirs = hf_config(model.uri).get("model_type"), hf_config(pre.uri).get("model_type")
            if SAME_FAMILY.get(ours, ours) != SAME_FAMILY.get(theirs, theirs):
                raise MismatchError(f"{io.join_uri(model.uri, HF_CONFIG)}: model_type {ours!r}, but the pretrained "
                                    f"model's {io.join_uri(pre.uri, HF_CONFIG)} has {theirs!r} (another architecture)")
            if (hf_kind(model.uri) == "causal_lm") != (hf_kind(pre.uri) == "causal_lm"):
                raise MismatchError(f"{io.join_uri(model.uri, HF_CONFIG)} is a {hf_architecture(model.uri)} but the "
                                    f"pretrained model {io.join_uri(pre.uri, HF_CONFIG)} is a "
                                    f"{hf_architecture(pre.uri)}: merge causal LMs with causal LMs")
            if hf_kind(model.uri) == "causal_lm":
                from distac.models.tokenizers import check_same_tokenizer

                check_same_tokenizer(local_hf_dir(pre.uri), local_hf_dir(model.uri), pre.uri, model.uri)
        for key in model:
            if key not in pre:
                raise MismatchError(f"tensor {key!r} of {model.uri} is not in the pretrained model {pre.uri} "
                                    "(another architecture?)")
            if tuple(pre.shape(key)) != tuple(model.shape(key)):
                raise MismatchError(f"tensor {key!r}: shape {tuple(model.shape(key))} in {model.uri}, "
                                    f"{tuple(pre.shape(key))} in the pretrained model {pre.uri}")
    if pre.form == "checkpoint" or not models:
        return pre, models
    return pre.restricted(list(models[0])), models


def load_pretrained_state(uri: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """θ_pre's backbone tensors from any form, optionally only ``keys``."""
    view = backbone_checkpoint(uri)
    missing = [key for key in keys or () if key not in view]
    if missing:
        raise MismatchError(f"tensor {missing[0]!r} is not in the pretrained model {view.uri} "
                            f"({len(missing)} missing; another architecture?)")
    return {key: view[key] for key in (keys if keys is not None else view)}


def _hf_meta(uri: str, adapter_spec: dict, config: dict, task: str | None) -> dict:
    from distac.models.hf_seqcls import GENERIC_LABEL

    id2label = config.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, ""))) for i in range(len(id2label))]
    if names == [GENERIC_LABEL.format(i) for i in range(len(names))]:
        names = []
    num_classes = len(id2label) or int(config.get("num_labels", 2))
    return {"format": store.FORMAT, "role": "finetuned", "adapter": adapter_spec, "task": task,
            "num_classes": num_classes, "class_names": names, "extra": {"source": uri, "form": "hf"}}


def _family_spec(pretrained: str) -> dict | None:
    """The adapter spec θ_pre defines: a model spec file, or a distac directory's meta."""
    form = model_form(pretrained)
    if form == "spec":
        return read_model_spec(pretrained)
    if form == "distac":
        return store.load_meta(pretrained)["adapter"]
    if form == "hf" and hf_config(pretrained).get("model_type") == "clip":
        return {"kind": "hf_clip", "name_or_path": local_hf_dir(pretrained)}
    return None


def load_image_tower(uri: str, pretrained: str | os.PathLike | None, class_names: Sequence[str] | None,
                     task: str | None, adapter: ModelAdapter | None = None) -> LoadedModel:
    """A bare image-tower checkpoint (open_clip state dict, pickled image encoder, transformers CLIP vision
    weights) served with a zero-shot head of ``pretrained``'s family (or ``adapter``'s) for ``class_names``."""
    spec = adapter.spec() if adapter is not None else _family_spec(str(pretrained)) if pretrained is not None else None
    if spec is None or spec.get("kind") not in ZERO_SHOT_KINDS:
        raise CheckpointError(f"{uri} is a bare checkpoint: it holds weights but no model definition. Give "
                              "--pretrained as a model spec file (e.g. {\"kind\": \"open_clip\", ...}) for image "
                              "towers, or a distac model directory or a transformers directory with config.json")
    if not class_names:
        raise CheckpointError(f"{uri}: a zero-shot head needs the task's class names (give the task's data)")
    adapter = adapter or build_adapter(spec)
    pre = backbone_checkpoint(pretrained) if pretrained is not None else BackboneView(
        io.CheckpointReader("θ_pre", tensors=adapter.pretrained_backbone_state()), str(adapter.spec()), form="spec")
    _, (view,) = paired_backbones(pre, [uri])
    state = adapter.pretrained_backbone_state()  # tensors the checkpoint lacks keep θ_pre's value
    state.update({key: view[key] for key in view})
    model = adapter.build(len(class_names), list(class_names))
    model.load_backbone(state)
    meta = {"format": store.FORMAT, "role": "finetuned", "adapter": adapter.spec(), "task": task,
            "num_classes": len(class_names), "class_names": list(class_names),
            "extra": {"source": uri, "form": "checkpoint"}}
    return LoadedModel(adapter, model.eval(), meta)


def load_model(uri: str | os.PathLike, pretrained: str | os.PathLike | None = None, *, task: str | None = None,
               class_names: Sequence[str] | None = None, max_length: int | None = None,
               adapter: ModelAdapter | None = None) -> LoadedModel:
    """Any supported fine-tuned model as (adapter, TaskModel, meta); ``meta['class_names']`` is [] when unknown.

    ``pretrained`` (an HF directory or hub id) makes the adapter's θ_pre that model, so its task vector and
    freshly built models come from it; without it an imported checkpoint is its own θ_pre. A bare image-tower
    checkpoint needs ``pretrained`` as a model spec (or distac directory) of a CLIP family and the task's
    ``class_names`` for its zero-shot head. ``task`` names the task of an imported model. ``adapter`` (the
    pipeline's, of the same family) serves the imported model instead of one built from ``pretrained``.
    """
    from distac.models.hf_seqcls import has_tokenizer, load_sequence_classifier

    uri = str(uri).rstrip("/")
    form = model_form(uri)
    if form == "distac":
        return store.load_task_model(uri)
    if form == "lora":
        from distac.models.lora import load_adapter_model

        return load_adapter_model(uri, pretrained, task=task, class_names=class_names, max_length=max_length,
                                  adapter=adapter)
    if form == "checkpoint":
        return load_image_tower(uri, pretrained, class_names, task, adapter)
    if form == "spec":
        raise CheckpointError(f"{uri} is a model spec (θ_pre of a model family), not a fine-tuned model")
    if hf_config(uri).get("model_type") in HF_CLIP_TYPES:
        return load_image_tower(uri, pretrained, class_names, task, adapter)
    refuse_unservable(uri)
    if hf_kind(uri) == "causal_lm":
        return load_causal_lm(uri, pretrained, class_names=class_names, task=task, max_length=max_length,
                              adapter=adapter)
    local = local_hf_dir(uri)
    if adapter is not None:
        if pretrained is not None:
            paired_backbones(pretrained, [uri])
        model = load_sequence_classifier(local, adapter)
        return LoadedModel(adapter, model, _hf_meta(uri, adapter.spec(), hf_config(uri), task))
    source = local
    if pretrained is not None and model_form(str(pretrained)) == "hf":
        source = local_hf_dir(str(pretrained))
        paired_backbones(str(pretrained), [uri])  # a mismatch fails here, before the model is loaded
    tokenizer = None
    if not has_tokenizer(source):
        tokenizer = local
        if not has_tokenizer(local):
            raise CheckpointError(f"{uri} holds no tokenizer (looked for tokenizer.json, vocab.txt, ...), and "
                                  f"neither does {pretrained}; save one beside the weights")
    spec = {"kind": "hf_seqcls", "name_or_path": source, "tokenizer": tokenizer, "max_length": max_length}
    adapter = build_adapter(spec)
    model = load_sequence_classifier(local, adapter)
    return LoadedModel(adapter, model, _hf_meta(uri, adapter.spec(), hf_config(uri), task))


def load_causal_lm(uri: str, pretrained: str | os.PathLike | None = None, *, class_names: Sequence[str] | None = None,
                   task: str | None = None, max_length: int | None = None, template: str | None = None,
                   adapter: ModelAdapter | None = None) -> LoadedModel:
    """A fine-tuned causal-LM directory as a ``LoadedModel`` scored on ``class_names`` (its task's completions;
    none: it can be distilled and diagnosed for norm, not scored). θ_pre (``pretrained``, else the model
    itself) defines the adapter; tokenizers and tensors are compared first."""
    local = local_hf_dir(uri)
    if adapter is None:
        source = local
        if pretrained is not None and model_form(str(pretrained)) == "hf":
            paired_backbones(str(pretrained), [uri])  # a mismatch fails here, before the model is loaded
            source = local_hf_dir(str(pretrained))
        tokenizer = None
        from distac.models.hf_seqcls import has_tokenizer

        if not has_tokenizer(source):
            tokenizer = local
            if not has_tokenizer(local):
                raise CheckpointError(f"{uri} holds no tokenizer (looked for tokenizer.json, tokenizer_config.json, "
                                      f"...), and neither does {pretrained}; save one beside the weights")
        spec = {"kind": "hf_causal_lm", "name_or_path": source, "tokenizer": tokenizer}
        if max_length is not None:
            spec["max_length"] = max_length
        if template is not None:
            spec["template"] = template
        adapter = build_adapter(spec)
    elif pretrained is not None:
        paired_backbones(pretrained, [uri])
    model = adapter.load_finetuned(local, list(class_names) if class_names else None)
    meta = {"format": store.FORMAT, "role": "finetuned", "adapter": adapter.spec(), "task": task,
            "num_classes": len(class_names or []), "class_names": list(class_names or []),
            "extra": {"source": uri, "form": "hf"}}
    return LoadedModel(adapter, model, meta)


def checkpoint_class_names(uri: str | os.PathLike) -> list[str] | None:
    """A fine-tuned model's label names in class order (a checkpoint's ``id2label``, a distac model's meta);
    None when it has none (bare checkpoints, transformers' default ``LABEL_i`` names)."""
    uri = str(uri).rstrip("/")
    form = model_form(uri)
    if form == "distac":
        return store.load_meta(uri).get("class_names") or None
    if form == "hf" and hf_kind(uri) == "seqcls":
        return _hf_meta(uri, {}, hf_config(uri), None)["class_names"] or None
    return None


def model_family(uri: str | os.PathLike) -> str | None:
    """The adapter kind that serves a fine-tuned model ('hf_seqcls', 'hf_clip', a distac model's own kind);
    None for a bare checkpoint (any image-tower family with a zero-shot head)."""
    uri = str(uri).rstrip("/")
    form = model_form(uri)
    if form == "distac":
        return store.load_meta(uri)["adapter"]["kind"]
    if form == "hf":
        return {"clip": "hf_clip", "causal_lm": "hf_causal_lm"}.get(hf_kind(uri), "hf_seqcls")
    if form == "lora":
        from distac.models.lora import adapter_family

        return adapter_family(uri)
    return None


def save_imported(uri: str | os.PathLike, loaded: LoadedModel, task: str | None = None) -> str:
    """Store an imported model as a distac model directory (what the pipeline's stages pass around)."""
    meta = loaded.meta
    return store.save_task_model(uri, loaded.model, loaded.adapter, task or meta.get("task") or "",
                                 meta["num_classes"], meta.get("class_names") or None, extra=meta.get("extra"))
