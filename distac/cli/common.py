"""Helpers the sub-commands share: flags generated from library dataclasses (so defaults live once), model
loading for every model form, and task data from a built-in name, a data spec file or the model's meta."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from distac.errors import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- dataclass flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> type:
    """float for ``float | None``, int for ``int``, …: the non-None member of an annotation."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else str
    return annotation if isinstance(annotation, type) else str


def add_dataclass_arguments(parser: argparse.ArgumentParser | Any, cls: type, *, skip: Sequence[str] = (),
                            aliases: Mapping[str, Sequence[str]] | None = None,
                            helps: Mapping[str, str] | None = None, choices: Mapping[str, Sequence] | None = None
                            ) -> list[str]:
    """One ``--field-name`` flag per dataclass field (type and default from the class); returns the field names.

    A bool field defaulting to False is ``--field``; one defaulting to True is ``--no-field``.
    """
    hints = typing.get_type_hints(cls)
    aliases, helps, choices = aliases or {}, helps or {}, choices or {}
    names = []
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind = _scalar_type(hints[field.name])
        help_text = helps.get(field.name, "")
        flags = [_flag(field.name), *aliases.get(field.name, ())]
        if kind is bool:
            if default:
                parser.add_argument(*[f"--no-{f[2:]}" for f in flags], dest=field.name, action="store_false",
                                    help=help_text or f"turn off {field.name}")
            else:
                parser.add_argument(*flags, dest=field.name, action="store_true", help=help_text)
        else:
            shown = "" if default is None else f" (default: {default})"
            parser.add_argument(*flags, dest=field.name, type=kind, default=default, choices=choices.get(field.name),
                                help=(help_text + shown).strip())
        names.append(field.name)
    return names


def dataclass_from_args(cls: type, args: argparse.Namespace, names: Sequence[str], **overrides: Any) -> Any:
    return cls(**{name: getattr(args, name) for name in names}, **overrides)


# --------------------------------------------------------------------------------------------- models and data


def add_data_arguments(parser: argparse.ArgumentParser, several: bool) -> None:
    parser.add_argument("--data", nargs="+" if several else None, metavar="SPEC",
                        help="task data" + (", one per --finetuned model, in order" if several else "")
                        + ": a built-in task (cola, sst2, vision:<Class>, imagefolder:<path>) or a YAML/JSON file "
                          "holding a data spec (train/test/validation files, text/text_pair/label columns; "
                          "docs/own-models.md); default: the task in the model's meta.json")
    parser.add_argument("--glue-dir", "--data-root", dest="data_root", help="GLUE directory or vision data root")
    parser.add_argument("--template", metavar="TEXT",
                        help="causal LMs: how an input becomes a prompt, e.g. '{text_a}\\nAnswer:' ({text_b}: the "
                             "second sentence); default: the text itself; each class name (label word, or "
                             "completion) follows the prompt after a space")


def read_data_spec(value: str) -> Any:
    """A built-in task name (returned as is) or a DataSpec read from a YAML/JSON file."""
    if not value.lower().endswith((".yaml", ".yml", ".json")):
        return value
    import yaml

    from distac import io

    fs, path = io.url_to_fs(value)
    if not fs.exists(path):
        raise ConfigError(f"data spec file not found: {value}")
    with fs.open(path, "r") as handle:
        raw = yaml.safe_load(handle) if not value.lower().endswith(".json") else json.load(handle)
    if isinstance(raw, Mapping) and set(raw) == {"data"}:
        raw = raw["data"]
    return parse_data_spec(raw, value)


def parse_data_spec(raw: Any, where: str) -> Any:
    from distac.data.spec import parse_data_spec as parse

    return parse(raw, where)


def load_model_for(uri: str, pretrained: str | None, spec: Any, args: argparse.Namespace) -> Any:
    """One fine-tuned model in any form; a bare image-tower checkpoint takes its class names from ``spec``'s data."""
    from distac.models.lora import adapter_family, load_adapter_model
    from distac.models.resolve import hf_kind, load_causal_lm, load_model, model_form

    form = model_form(uri)
    template = getattr(args, "template", None)
    if form == "hf" and hf_kind(uri) == "causal_lm":  # scored on its task's completions, when data names them
        if spec is None:
            return load_causal_lm(uri, pretrained, template=template)
        data = _load_data(spec, uri, args, None, None)
        return load_causal_lm(uri, pretrained, class_names=data.class_names, task=data.name, template=template)
    if form == "lora" and adapter_family(uri, pretrained) == "hf_causal_lm":  # the same, for its LoRA adapter
        if spec is None:
            return load_adapter_model(uri, pretrained, template=template)
        data = _load_data(spec, uri, args, None, None)
        return load_adapter_model(uri, pretrained, class_names=data.class_names, task=data.name, template=template)
    if form != "checkpoint" and not _is_clip_dir(uri):
        return load_model(uri, pretrained)
    if spec is None:
        raise ConfigError(f"{uri} is a bare checkpoint: give its task with --data (for the zero-shot head)")
    data = _load_data(spec, uri, args, None, None)
    return load_model(uri, pretrained, class_names=data.class_names, task=data.name)


def _is_clip_dir(uri: str) -> bool:
    from distac.models.resolve import HF_CLIP_TYPES, hf_config, model_form

    return model_form(uri) == "hf" and hf_config(uri).get("model_type") in HF_CLIP_TYPES


def load_models(uris: Sequence[str], pretrained: str | None, specs: Sequence[Any], args: argparse.Namespace,
                same_family: bool = True) -> list[Any]:
    """Every fine-tuned model, in any form; with ``same_family`` (anything merged), one model family for all."""
    loaded = [load_model_for(uri, pretrained, spec, args) for uri, spec in zip(uris, specs)]
    families = {json.dumps(m.adapter.spec(), sort_keys=True) for m in loaded}
    if same_family and len(families) > 1:
        raise ConfigError(f"the fine-tuned models come from different model families: {sorted(families)}")
    return loaded


def _load_data(spec: Any, uri: str, args: argparse.Namespace, name: str | None, class_names: list[str] | None,
               max_eval: int | None = None) -> Any:
    from distac.data import DataSpec, load_task, load_task_data

    seed = getattr(args, "seed", 0)
    if isinstance(spec, DataSpec):
        name = name or os.path.basename(uri.rstrip("/")).lower().rsplit(".", 1)[0] or "task"
        return load_task_data(name, spec, class_names=class_names, max_eval=max_eval, seed=seed)
    return load_task(spec or name, root=args.data_root, max_eval=max_eval, seed=seed)


def task_data(loaded: Any, uri: str, spec: Any, args: argparse.Namespace, *, max_eval: int | None = None) -> Any:
    """The data of a model's task: ``spec`` (a name or DataSpec), else the task named in its meta.

    The model's class names (a checkpoint's id2label) order the classes of file data; a class count that
    differs from the model's is an error naming both.
    """
    if spec is None and not loaded.task:
        raise ConfigError(f"{uri}: the model names no task; give its data with --data")
    data = _load_data(spec, uri, args, loaded.task, loaded.class_names or None, max_eval)
    if data.num_classes != loaded.meta["num_classes"]:
        raise ConfigError(f"{uri} has {loaded.meta['num_classes']} classes but its data "
                          f"{describe_data(spec, loaded.task)} has {data.num_classes} ({data.class_names})")
    return data


def describe_data(spec: Any, task: str | None) -> str:
    """A task's data as a user named it: the files (or dataset) of a data spec, else the task's name."""
    from distac.data import DataSpec

    if isinstance(spec, DataSpec):
        if spec.dataset is not None:
            return f"(dataset {spec.dataset})"
        return "(" + ", ".join(f"{split} {getattr(spec, split)}" for split in ("train", "validation", "test")
                               if getattr(spec, split) is not None) + ")"
    return repr(spec or task)


def data_specs(args: argparse.Namespace, count: int) -> list[Any]:
    values = args.data or []
    if isinstance(values, str):
        values = [values]
    if values and len(values) != count:
        raise ConfigError(f"--data gives {len(values)} specs for {count} models")
    return [read_data_spec(v) for v in values] or [None] * count
