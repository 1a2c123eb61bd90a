"""LoRA / PEFT adapters as fine-tuned models, and merged task vectors written back as LoRA adapters.

A peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, or ``.bin``) fine-tunes a
base model: its task vector is, per adapted module, ΔW = s·B·A with s = lora_alpha/r (``use_rslora``:
lora_alpha/√r; ``rank_pattern``/``alpha_pattern`` per module), transposed for ``fan_in_fan_out`` (GPT-2's
Conv1D) and for embeddings, plus ``lora_B.bias``·s with ``lora_bias``. Tensors the adapter stores whole
(``modules_to_save``, ``bias="all"``, saved embedding layers) replace θ_pre's value. This is exactly what
peft's ``merge_and_unload()`` computes.

- ``AdapterView``: a lazy ``Mapping[str, Tensor]`` of θ_pre + ΔW over θ_pre's backbone keys, computed
  tensor by tensor on access (keys the adapter does not touch are θ_pre's): what merges, diagnose's norms and
  ``LazyTaskVector`` read, so an adapter goes wherever a fine-tuned model goes (``paired_backbones``).
- ``load_adapter_model``: the task model in memory (evaluate, diagnose, condition): θ_pre's transformers model
  with the adapter merged in; a classifier in ``modules_to_save`` is the task's head.
- ``write_adapter``: a merged vector as a peft adapter by truncated SVD (``distac merge --out-format lora``).

θ_pre is the model given as ``--pretrained``; the adapter's ``base_model_name_or_path`` is used only when none
is given, and only warned about when it names another model (paths differ between machines).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distac import io
from distac.errors import CheckpointError, ConfigError, MismatchError
from distac.models.resolve import BackboneView

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
HEAD_MODULES = ("classifier", "score", "pooler", "pre_classifier")  # a sequence classifier's head, never merged
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "trainable_token_indices": "trainable tokens",
               "layer_replication": "layer replication", "target_parameters": "LoRA on bare parameters"}


def _exists(uri: str) -> bool:
    fs, path = io.url_to_fs(uri)
    return fs.exists(path)


def is_adapter_dir(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a peft adapter directory (it holds adapter_config.json)."""
    return _exists(io.join_uri(str(uri).rstrip("/"), ADAPTER_CONFIG))


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Factor:
    """One adapted module: its LoRA tensors' keys in the adapter file and how ΔW is formed from them."""

    module: str                 # the module's path in the model ('bert.encoder.layer.0.attention.self.query')
    a_key: str
    b_key: str
    embedding: bool = False     # lora_embedding_A/B: ΔW = (B·A)ᵀ


@dataclass
class LoraAdapter:
    """A peft LoRA adapter read from ``uri``: its config and what each of its tensors means.

    Keys are the adapted model's parameter names (``<module path>.weight``), as in its ``state_dict()``."""

    uri: str
    config: dict[str, Any]
    weights_uri: str
    reader: Mapping[str, torch.Tensor]
    factors: dict[str, Factor] = field(default_factory=dict)       # '<module>.weight' → its factors
    bias_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # '<module>.bias' → (lora_B.bias, module)
    whole: dict[str, str] = field(default_factory=dict)            # parameter → adapter key of its full value

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def keys(self) -> list[str]:
        """Every parameter name the adapter changes or stores."""
        return list(dict.fromkeys([*self.factors, *self.bias_keys, *self.whole]))

    def scaling(self, module: str, rank: int) -> float:
        """s = α/r (α/√r with use_rslora), α and r from alpha_pattern / the factors' own rank."""
        alpha = float(self.config.get("lora_alpha", 8))
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if module == pattern or re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def delta(self, key: str, shape: Sequence[int] | None = None) -> torch.Tensor | None:
        """ΔW of parameter ``key`` in float32 (None when the adapter does not adapt it); ``shape`` (θ_pre's)
        picks the orientation of a Conv1D weight and is checked."""
        if key in self.bias_keys:
            bias_key, module = self.bias_keys[key]
            rank = self.reader[self.factors[module + ".weight"].a_key].shape[0]
            return self.reader[bias_key].float() * self.scaling(module, rank)
        factor = self.factors.get(key)
        if factor is None:
            return None
        a, b = self.reader[factor.a_key].float(), self.reader[factor.b_key].float()
        delta = b @ a * self.scaling(factor.module, a.shape[0])
        transpose = factor.embedding or bool(self.config.get("fan_in_fan_out"))
        if shape is not None and delta.shape[0] != delta.shape[1]:  # peft sets fan_in_fan_out per layer type
            transpose = tuple(delta.shape) != tuple(shape)
        delta = delta.T if transpose else delta
        if shape is not None and tuple(delta.shape) != tuple(shape):
            raise MismatchError(f"{self.weights_uri}: module {factor.module!r} gives ΔW of shape "
                                f"{tuple(delta.shape)}, but {key!r} is {tuple(shape)} in the pretrained model "
                                "(an adapter for another model?)")
        return delta

    def stored(self, key: str) -> torch.Tensor | None:
        """The full value the adapter stores for parameter ``key`` (modules_to_save), or None."""
        return self.reader[self.whole[key]] if key in self.whole else None


def _clean(path: str) -> str:
    """A module path inside a peft model → the plain model's ('x.modules_to_save.default' → 'x')."""
    for part in (".modules_to_save.default", ".original_module", ".base_layer"):
        path = path.replace(part, "")
    return path


def read_adapter(uri: str | os.PathLike) -> LoraAdapter:
    """Read a peft LoRA adapter directory; bad input raises ``CheckpointError`` naming the file."""
    uri = str(uri).rstrip("/")
    config_uri = io.join_uri(uri, ADAPTER_CONFIG)
    config = io.read_json(config_uri)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_uri} is not a peft adapter config (expected a JSON object)")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{config_uri}: peft_type {config.get('peft_type')!r}; distac reads LoRA adapters only")
    for name, what in UNSUPPORTED.items():
        if config.get(name):
            raise CheckpointError(f"{config_uri}: {what} is not supported (only plain LoRA: ΔW = s·B·A)")
    weights = next((io.join_uri(uri, name) for name in ADAPTER_WEIGHTS if _exists(io.join_uri(uri, name))), None)
    if weights is None:
        raise CheckpointError(f"{uri} has {ADAPTER_CONFIG} but no adapter weights (looked for "
                              f"{', '.join(ADAPTER_WEIGHTS)})")
    reader = io.open_checkpoint(weights)
    adapter = LoraAdapter(uri, config, weights, reader)
    for key in reader:
        if not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights}: tensor {key!r} is not a peft LoRA key (expected {PEFT_PREFIX}...)")
        name = key[len(PEFT_PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.(weight|bias)|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if match and match.group(1) and match.group(3) == "bias":
            adapter.bias_keys[_clean(match.group(1)) + ".bias"] = (key, _clean(match.group(1)))
        elif match:
            module = _clean(match.group(1) or match.group(4))
            if len(reader.shape(key)) != 2:
                raise CheckpointError(f"{weights}: {key!r} has shape {reader.shape(key)}; only linear and "
                                      "embedding LoRA (2-D factors) is supported, not convolutions")
            part = (match.group(2) or match.group(5))[-1]  # 'A' or 'B'
            old = adapter.factors.get(module + ".weight")
            keys = {"A": old.a_key if old else "", "B": old.b_key if old else ""}
            keys[part] = key
            adapter.factors[module + ".weight"] = Factor(module, keys["A"], keys["B"], match.group(4) is not None)
        elif "lora_" in name:
            raise CheckpointError(f"{weights}: tensor {key!r} is a LoRA variant distac does not read")
        else:
            adapter.whole[_clean(name)] = key
    for key, factor in adapter.factors.items():
        if not factor.a_key or not factor.b_key:
            raise CheckpointError(f"{weights}: module {factor.module!r} has only one of its two LoRA factors")
    return adapter


# --------------------------------------------------------------------------------------------- the base


def base_model_uri(adapter: LoraAdapter, pretrained: str | os.PathLike | None) -> str:
    """θ_pre of an adapter: ``pretrained`` (warning when the adapter names another base), else the adapter's
    ``base_model_name_or_path`` when it is found here."""
    from distac.models.resolve import model_form

    named = adapter.base_name
    if pretrained is not None:
        pretrained = str(pretrained).rstrip("/")
        if named and os.path.basename(str(named).rstrip("/")) != os.path.basename(pretrained):
            same = os.path.exists(named) and os.path.realpath(named) == os.path.realpath(pretrained)
            if not same:
                log.warning("%s was trained on %s, but the pretrained model is %s", adapter.uri, named, pretrained)
        return pretrained
    if not named:
        raise CheckpointError(f"{io.join_uri(adapter.uri, ADAPTER_CONFIG)} names no base model; give it with "
                              "--pretrained")
    try:
        model_form(named)
    except CheckpointError:
        raise CheckpointError(f"the base model of {adapter.uri}, {named} (base_model_name_or_path), is not found "
                              "here; give it with --pretrained") from None
    return str(named)


def adapter_task(adapter: LoraAdapter, base_uri: str) -> str | None:
    """What the adapted model is: 'seqcls', 'causal_lm', or None (any other base: tensors only). Raises when the
    adapter's task type contradicts its base (an adapter for another architecture)."""
    from distac.models.resolve import hf_kind, model_form

    task_type = str(adapter.config.get("task_type") or "").upper()
    model_class = str((adapter.config.get("auto_mapping") or {}).get("base_model_class") or "")
    wants = ("seqcls" if task_type == "SEQ_CLS" or model_class.endswith("ForSequenceClassification") else
             "causal_lm" if task_type == "CAUSAL_LM" or model_class.endswith(("ForCausalLM", "LMHeadModel")) else None)
    if model_form(base_uri) != "hf":
        return None
    kind = hf_kind(base_uri)
    have = {"seqcls": "seqcls", "base": "seqcls", "causal_lm": "causal_lm"}.get(kind)
    if wants is not None and have is not None and wants != have:
        raise MismatchError(f"{io.join_uri(adapter.uri, ADAPTER_CONFIG)} adapts a "
                            f"{'sequence classifier' if wants == 'seqcls' else 'causal language model'}, but the "
                            f"pretrained model {base_uri} is a {kind} model (another architecture)")
    return have


# --------------------------------------------------------------------------------------------- the lazy view


class AdapterView(BackboneView):
    """θ_pre + ΔW over θ_pre's backbone keys, one tensor at a time (``form`` 'lora', ``uri`` the adapter).

    ``base`` is θ_pre's backbone view; the adapter's parameter names are mapped onto its keys (a classifier's
    'bert.encoder.x' → 'encoder.x'). Head tensors (the classifier, the pooler) are not backbone and stay out; any
    other name θ_pre lacks is an error naming the adapter file."""

    def __init__(self, adapter: LoraAdapter, base: BackboneView, task: str | None = None):
        self.adapter, self.base, self.task = adapter, base, task
        self.reader, self.uri, self.form = base.reader, adapter.uri, "lora"
        keys = [key for key in base if not (task == "seqcls" and key.startswith("pooler."))]
        self._source = {key: key for key in keys}
        self.targets: dict[str, str] = {}  # backbone key → the adapter's parameter name
        for name in adapter.keys():
            key = self._backbone_key(name)
            if key is not None:
                self.targets[key] = name
        for key, name in self.targets.items():  # shapes checked before any work
            if name in adapter.factors or name in adapter.bias_keys:
                continue
            if tuple(adapter.reader.shape(adapter.whole[name])) != tuple(base.shape(key)):
                raise MismatchError(f"{adapter.weights_uri}: {name!r} has shape "
                                    f"{tuple(adapter.reader.shape(adapter.whole[name]))}, {tuple(base.shape(key))} "
                                    f"in the pretrained model {base.uri}")

    def _backbone_key(self, name: str) -> str | None:
        """θ_pre's key of the adapter's parameter ``name`` (itself, or without the model's prefix 'bert.'); None
        for a classifier's head."""
        for candidate in (name, name.split(".", 1)[-1]):
            if candidate in self._source:
                return candidate
        first, rest = name.split(".", 1)[0], name.split(".", 1)[-1]
        if self.task == "seqcls" and (first in HEAD_MODULES or rest.split(".", 1)[0] in HEAD_MODULES):
            return None  # the task's head
        raise MismatchError(f"{self.adapter.weights_uri}: {name!r} is not in the pretrained model {self.base.uri} "
                            f"(an adapter for another architecture?)")

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.base[key]
        name = self.targets.get(key)
        if name is None:
            return value
        stored = self.adapter.stored(name)
        if stored is not None:
            value = stored.to(value.dtype)
        delta = self.adapter.delta(name, value.shape)
        return value if delta is None else (value.float() + delta).to(value.dtype)

    def delta(self, key: str) -> torch.Tensor:
        """The task vector's tensor τ = θ_t − θ_pre for ``key`` (float32)."""
        return self[key].float() - self.base[key].float()

    def restricted(self, keys: Sequence[str]) -> "AdapterView":
        view = copy.copy(self)
        view._source = {key: key for key in keys}
        return view

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)


def adapter_view(uri: str, pretrained: BackboneView | str | None = None) -> AdapterView:
    """The adapter at ``uri`` as a fine-tuned model's backbone over θ_pre (``pretrained``, a view or a name; None:
    the adapter's own base model)."""
    from distac.models.resolve import backbone_checkpoint

    adapter = read_adapter(uri)
    if isinstance(pretrained, BackboneView):
        base_uri = base_model_uri(adapter, pretrained.uri)
        base = pretrained
    else:
        base_uri = base_model_uri(adapter, pretrained)
        base = backbone_checkpoint(base_uri)
    return AdapterView(adapter, base, adapter_task(adapter, base_uri))


# --------------------------------------------------------------------------------------------- in memory


def merge_into(adapter: LoraAdapter, model: nn.Module) -> None:
    """Merge ``adapter`` into a transformers ``model`` in place (what merge_and_unload does): stored tensors
    replace, ΔW adds. A stored classifier of another number of classes replaces the model's output layer."""
    state = model.state_dict()
    for name in adapter.whole:
        value = adapter.stored(name)
        if name in state and tuple(state[name].shape) != tuple(value.shape):
            _resize_linear(model, name, value, adapter)
            state = model.state_dict()
    with torch.no_grad():
        for name in adapter.keys():
            if name not in state:
                raise MismatchError(f"{adapter.weights_uri}: {name!r} is not in the pretrained model "
                                    f"{type(model).__name__} (an adapter for another architecture?)")
            target = state[name]
            stored = adapter.stored(name)
            if stored is not None:
                target.copy_(stored.to(target.dtype))
            delta = adapter.delta(name, target.shape)
            if delta is not None:
                target.copy_((target.float() + delta).to(target.dtype))


def _resize_linear(model: nn.Module, name: str, value: torch.Tensor, adapter: LoraAdapter) -> None:
    path, _, param = name.rpartition(".")
    module = model.get_submodule(path)
    if not isinstance(module, nn.Linear) or value.dim() not in (1, 2):
        raise MismatchError(f"{adapter.weights_uri}: {name!r} has shape {tuple(value.shape)}, "
                            f"{tuple(getattr(module, param).shape)} in the pretrained model")
    out_features = value.shape[0]
    if param == "weight" and value.shape[1] != module.in_features:
        raise MismatchError(f"{adapter.weights_uri}: {name!r} has shape {tuple(value.shape)}, the pretrained "
                            f"model's layer takes {module.in_features} inputs")
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, nn.Linear(module.in_features, out_features, bias=module.bias is not None))
    config = getattr(model, "config", None)
    if config is not None and attribute in HEAD_MODULES + ("out_proj",):
        config.num_labels = out_features  # transformers resets id2label to LABEL_i


def load_adapter_model(uri: str, pretrained: str | os.PathLike | None = None, *, task: str | None = None,
                       class_names: Sequence[str] | None = None, max_length: int | None = None,
                       adapter: Any = None, template: str | None = None) -> Any:
    """An adapter directory as a ``LoadedModel``: θ_pre's transformers model (``pretrained``, else the adapter's
    base) with the adapter merged in; a sequence classifier's head is the adapter's stored classifier, a causal
    LM is scored on ``class_names`` after prompts formatted by ``template``."""
    from distac.models import build_adapter
    from distac.models.hf_seqcls import class_names_from_config, final_layer, has_tokenizer
    from distac.models.resolve import local_hf_dir, model_form, paired_backbones
    from distac.models.store import FORMAT, LoadedModel

    lora = read_adapter(uri)
    base_uri = base_model_uri(lora, pretrained)
    kind = adapter_task(lora, base_uri)
    if model_form(base_uri) != "hf" or kind is None:
        raise CheckpointError(f"{uri}: serving a LoRA adapter needs a transformers sequence classifier or causal "
                              f"LM (or bare encoder) as its base; {base_uri} is not one")
    paired_backbones(base_uri, [uri])  # an adapter of another architecture fails here, before any model is built
    source = local_hf_dir(base_uri)
    tokenizer = None if has_tokenizer(source) else uri
    if tokenizer is not None and not has_tokenizer(local_hf_dir(uri)):
        raise CheckpointError(f"neither the base model {base_uri} nor the adapter {uri} holds a tokenizer")
    if adapter is None:
        spec: dict[str, Any] = {"kind": "hf_seqcls" if kind == "seqcls" else "hf_causal_lm", "name_or_path": source,
                                "tokenizer": tokenizer}
        if max_length is not None or kind == "seqcls":
            spec["max_length"] = max_length
        if template is not None and kind == "causal_lm":
            spec["template"] = template
        adapter = build_adapter(spec)
    full = copy.deepcopy(adapter._full)
    merge_into(lora, full)
    if kind == "causal_lm":
        model = adapter.wrap(full.eval(), list(class_names) if class_names else None)
        num_classes, names = len(class_names or []), list(class_names or [])
    else:
        if not any(name.split(".")[0] in HEAD_MODULES for name in lora.whole):
            log.warning("%s stores no classifier (modules_to_save): its head is the pretrained model's", uri)
        if getattr(full.config, "pad_token_id", None) is None:
            full.config.pad_token_id = adapter.tokenizer.pad_token_id
        model = adapter.wrap(full.eval())
        owner, name = final_layer(model.head)
        num_classes = getattr(owner, name).out_features
        names = list(class_names or class_names_from_config(full.config) or [])
    meta = {"format": FORMAT, "role": "finetuned", "adapter": adapter.spec(), "task": task,
            "num_classes": num_classes, "class_names": names,
            "extra": {"source": uri, "form": "lora", "base": str(base_uri)}}
    return LoadedModel(adapter, model, meta)


def adapter_family(uri: str, pretrained: str | os.PathLike | None = None) -> str | None:
    """The adapter kind that serves an adapter directory ('hf_seqcls', 'hf_causal_lm') over ``pretrained`` (else
    its own base); None when that base is not found here or is not a transformers classifier or causal LM."""
    adapter = read_adapter(uri)
    try:
        kind = adapter_task(adapter, base_model_uri(adapter, pretrained))
    except CheckpointError:
        return None
    return {"seqcls": "hf_seqcls", "causal_lm": "hf_causal_lm"}.get(kind or "")


# --------------------------------------------------------------------------------------------- writing


LORA_REPORT = "lora_report.json"
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seqcls": "SEQ_CLS"}


def check_rank(pretrained: Mapping[str, torch.Tensor], rank: int) -> None:
    """Refuse a rank below 1 or above every 2-D tensor's full rank, and a θ_pre that is not a transformers
    model, before any merging."""
    if not isinstance(pretrained, BackboneView):
        raise ConfigError("--out-format lora needs the pretrained model as a transformers directory or hub id")
    _skeleton(pretrained)
    shape = getattr(pretrained, "shape", None)
    full = [min(shape(key)) for key in pretrained if callable(shape) and len(shape(key)) == 2]
    if rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank}")
    if full and rank > max(full):
        raise ConfigError(f"--rank {rank} is larger than any weight matrix's full rank (the largest is {max(full)}, "
                          f"in {getattr(pretrained, 'uri', 'the pretrained model')})")


def _skeleton(pretrained: BackboneView) -> tuple[nn.Module, str, str]:
    """θ_pre's transformers model on the meta device (module types, no weights), its kind, and the prefix of the
    backbone's names inside it ('bert.' for a classifier, '' for a causal LM)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from distac.models.resolve import hf_kind, local_hf_dir

    if pretrained.form != "hf" or hf_kind(pretrained.uri) not in ("causal_lm", "seqcls", "base"):
        raise ConfigError(f"--out-format lora needs a transformers causal LM, sequence classifier or bare encoder as "
                          f"the pretrained model; {pretrained.uri} is not one")
    kind = "causal_lm" if hf_kind(pretrained.uri) == "causal_lm" else "seqcls"
    config = AutoConfig.from_pretrained(local_hf_dir(pretrained.uri), local_files_only=True)
    model_class = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    from distac.models.text import TRANSFORMERS_LOADING

    with TRANSFORMERS_LOADING, torch.device("meta"):
        model = model_class.from_config(config)
    return model, kind, (model.base_model_prefix + "." if kind == "seqcls" else "")


def _factorize(matrix: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) with B·A the best rank-``rank`` approximation of ``matrix`` (truncated SVD), the
    error ‖M − B·A‖_F / ‖M‖_F measured on the factors as stored (``dtype``)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    b = (u[:, :rank] * s[:rank]).to(dtype).contiguous()
    a = vh[:rank].to(dtype).contiguous()
    norm = float(torch.linalg.matrix_norm(matrix))
    error = float(torch.linalg.matrix_norm(matrix - b.float() @ a.float())) / norm if norm else 0.0
    return b, a, error


def _task_heads(view: BackboneView, prefix: str, backbone: Sequence[str], model: nn.Module) -> dict[str, torch.Tensor]:
    """A classifier fine-tune's head (classifier, pooler) under the transformers model's names, every parameter
    of each head module (peft stores modules whole): a checkpoint's own tensors, or an adapter's (stored, else
    θ_pre's, plus ΔW)."""
    from distac.models.resolve import hf_weights_uri

    heads: dict[str, torch.Tensor] = {}
    if isinstance(view, AdapterView):
        touched = {name.rpartition(".")[0] for name in view.adapter.keys() if name not in view.targets.values()}
        for module in sorted(touched):
            for param, _ in model.get_submodule(module).named_parameters(recurse=False):
                name = f"{module}.{param}"
                value = view.adapter.stored(name)
                if value is None:
                    value = next((view.base.reader[k] for k in (name, name[len(prefix):]) if k in view.base.reader),
                                 None)
                if value is None:
                    raise MismatchError(f"{view.adapter.weights_uri}: the head tensor {name!r} is neither stored "
                                        f"in the adapter nor in the pretrained model {view.base.uri}")
                delta = view.adapter.delta(name, value.shape)
                heads[name] = value if delta is None else (value.float() + delta).to(value.dtype)
        return heads
    if view.form != "hf":
        return heads
    reader = io.open_checkpoint(hf_weights_uri(view.uri))
    for key in reader:
        inside = key[len(prefix):] if key.startswith(prefix) else None
        if inside is None or (inside not in backbone and inside.split(".")[0] == "pooler"):
            heads[key] = reader[key]
    return heads


def write_adapter(directory: str, pretrained: BackboneView, vector: Mapping[str, torch.Tensor], rank: int,
                  finetuned: Sequence[BackboneView] = (), progress: bool = False) -> dict[str, Any]:
    """Write ``vector`` (a merged τ over θ_pre's backbone keys) as a peft LoRA adapter at ``directory`` (local).

    Each changed weight of a linear (or Conv1D, or embedding) layer becomes B·A, its best rank-``rank``
    approximation (truncated SVD; r = min(rank, full rank), recorded in rank_pattern), with lora_alpha = r so the
    scale is 1; a changed bias of such a layer is ``lora_B.bias`` (``lora_bias``; where a targeted layer has no
    bias, the layers with changed biases are stored whole instead; with lora_bias, which peft lacks for
    embeddings, a changed embedding is stored whole). Every other changed tensor (LayerNorm, ...)
    cannot be a low-rank product: its module is stored whole in ``modules_to_save`` (θ_pre + τ, exact).
    Classifiers (``finetuned`` are their fine-tunes): ``directory/task-<i>/`` per task, the same factors plus
    that task's head (classifier, pooler) in modules_to_save. Returns the merge record's ``lora`` entry; the
    relative Frobenius error of each tensor goes to ``lora_report.json``.
    """
    from tqdm.auto import tqdm
    from transformers.pytorch_utils import Conv1D

    model, kind, prefix = _skeleton(pretrained)
    names = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict[str, Any]] = {}
    targets: dict[str, str] = {}     # module → 'linear' | 'conv1d' | 'embedding'
    ranks: dict[str, int] = {}
    biases: dict[str, str] = {}      # module → backbone key of its changed bias
    whole: set[str] = set()          # modules stored whole
    for key in tqdm(list(vector), desc="factorize", unit="tensor", disable=not progress):
        delta = vector[key].float()
        if not bool(delta.any()):
            continue
        name = prefix + key
        if name not in names:
            raise MismatchError(f"merged tensor {key!r} is not {name!r} of {type(model).__name__} "
                                f"({pretrained.uri})")
        module_path, _, param = name.rpartition(".")
        module = model.get_submodule(module_path)
        layer = ("conv1d" if isinstance(module, Conv1D) else "linear" if isinstance(module, nn.Linear) else
                 "embedding" if isinstance(module, nn.Embedding) else None)
        if layer is not None and param == "bias" and layer != "embedding":
            biases[module_path] = key
            continue
        if layer is None or param != "weight" or delta.dim() != 2:
            whole.add(module_path)
            continue
        matrix = delta if layer == "linear" else delta.T  # peft: Conv1D and embeddings transpose B·A
        r = min(rank, *matrix.shape)
        b, a, error = _factorize(matrix, r, vector[key].dtype)
        suffixes = (".lora_embedding_B", ".lora_embedding_A") if layer == "embedding" else (".lora_B.weight",
                                                                                           ".lora_A.weight")
        tensors[PEFT_PREFIX + module_path + suffixes[0]] = b
        tensors[PEFT_PREFIX + module_path + suffixes[1]] = a
        targets[module_path], ranks[module_path] = layer, r
        report[key] = {"module": module_path, "shape": list(delta.shape), "stored": "lora", "rank": r,
                       "relative_error": error}
    lora_bias = bool(biases) and all(getattr(model.get_submodule(path), "bias", None) is not None
                                     for path, layer in targets.items() if layer != "embedding")
    if lora_bias:  # peft has no lora_bias for embeddings: a changed embedding is then stored whole
        whole.update(path for path, layer in targets.items() if layer == "embedding")
    for module_path, key in biases.items():
        if lora_bias and module_path in targets:
            tensors[PEFT_PREFIX + module_path + ".lora_B.bias"] = vector[key].contiguous()
            report[key] = {"module": module_path, "shape": list(vector[key].shape), "stored": "lora_bias",
                           "rank": None, "relative_error": 0.0}
        else:
            whole.add(module_path)
    for module_path in sorted(whole):  # whole modules: θ_pre + τ for each of their own parameters
        if module_path in targets:  # a LoRA layer whose bias cannot be lora_B.bias: stored whole instead
            del targets[module_path], ranks[module_path]
            for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
                tensors.pop(PEFT_PREFIX + module_path + suffix, None)
        for param, _ in model.get_submodule(module_path).named_parameters(recurse=False):
            name = f"{module_path}.{param}"
            key = name[len(prefix):]
            if key not in pretrained:
                raise MismatchError(f"{name!r} of {type(model).__name__} has no value in {pretrained.uri}")
            value = pretrained[key]
            if key in vector:
                value = (value.float() + vector[key].float()).to(value.dtype)
            tensors[PEFT_PREFIX + name] = value.contiguous()
            report[key] = {"module": module_path, "shape": list(value.shape), "stored": "modules_to_save",
                           "rank": None, "relative_error": 0.0}
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[kind], "base_model_name_or_path": io.redact(pretrained.uri),
        "r": rank, "lora_alpha": rank, "target_modules": sorted(targets), "modules_to_save": sorted(whole) or None,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(m): r for m, r in ranks.items() if r != rank},
        "fan_in_fan_out": any(layer == "conv1d" for layer in targets.values()), "lora_bias": lora_bias,
        "bias": "none", "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    if not targets:
        raise ConfigError("the merged vector changes no linear or embedding weight: nothing to write as LoRA")
    errors = [entry["relative_error"] for entry in report.values() if entry["stored"] == "lora"]
    summary = {"rank": rank, "tensors": len(report), "lora": len(errors), "modules_to_save": sorted(whole),
               "max_relative_error": max(errors), "mean_relative_error": sum(errors) / len(errors),
               "notes": []}
    if kind == "causal_lm" and getattr(model.config, "tie_word_embeddings", False) and any(
            layer == "embedding" for layer in targets.values()):
        summary["notes"].append("the embedding is tied to lm_head: its LoRA reaches lm_head only in the merged "
                                "model (merge_and_unload()), not in peft's unmerged forward")
    for note in summary["notes"]:
        log.warning("%s: %s", directory, note)
    directories = ["."]
    if kind == "seqcls" and finetuned:
        directories = [f"task-{i}" for i in range(len(finetuned))]
    for i, where in enumerate(directories):
        out, own, saved = os.path.join(directory, where), dict(tensors), set(whole)
        if where != ".":
            heads = _task_heads(finetuned[i], prefix, list(pretrained), model)
            own.update({PEFT_PREFIX + name: value.contiguous() for name, value in heads.items()})
            saved.update(name.rpartition(".")[0] for name in heads)
        os.makedirs(out, exist_ok=True)
        io.write_safetensors(own, os.path.join(out, ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
        io.write_json({**config, "modules_to_save": sorted(saved) or None}, os.path.join(out, ADAPTER_CONFIG))
    io.write_json({**summary, "per_tensor": report}, os.path.join(directory, LORA_REPORT))
    return {**summary, "adapters": directories, "report": LORA_REPORT}
