"""Model adapters: ``build_adapter(spec)`` turns a JSON-able spec into a ``ModelAdapter``.

Adapters are cached by spec, so loading several fine-tuned models of one family loads the pretrained
weights once (``build`` always returns a fresh copy, so sharing an adapter is safe).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any

from distac.errors import ConfigError
from distac.models.base import ModelAdapter, TaskModel

__all__ = ["ModelAdapter", "TaskModel", "build_adapter", "load_model", "ADAPTER_KINDS"]

ADAPTER_KINDS = ("hf_text", "hf_seqcls", "hf_causal_lm", "open_clip", "hf_clip")
_ADAPTERS: dict[str, ModelAdapter] = {}


def _adapter_class(kind: str) -> type[ModelAdapter]:
    if kind == "hf_text":
        from distac.models.text import HFTextAdapter

        return HFTextAdapter
    if kind == "hf_seqcls":
        from distac.models.hf_seqcls import HFSequenceClassificationAdapter

        return HFSequenceClassificationAdapter
    if kind == "hf_causal_lm":
        from distac.models.causal_lm import HFCausalLMAdapter

        return HFCausalLMAdapter
    if kind == "open_clip":
        from distac.models.vision import OpenCLIPAdapter

        return OpenCLIPAdapter
    if kind == "hf_clip":
        from distac.models.hf_clip import HFCLIPAdapter

        return HFCLIPAdapter
    raise ConfigError(f"unknown model kind {kind!r}: expected one of {list(ADAPTER_KINDS)}")


def build_adapter(spec: Mapping[str, Any]) -> ModelAdapter:
    """The adapter for ``spec`` (``{"kind": "hf_text" | "open_clip", ...}``), loaded once per spec."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ConfigError(f"a model spec must be a mapping with a 'kind' field, got {spec!r}")
    options = {key: value for key, value in spec.items() if key != "kind"}
    adapter_class = _adapter_class(spec["kind"])
    cache_key = json.dumps(dict(spec), sort_keys=True, default=str)
    if cache_key not in _ADAPTERS:
        accepted = set(inspect.signature(adapter_class.__init__).parameters) - {"self"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in {spec['kind']} model spec; "
                              f"accepted: {sorted(accepted)}")
        _ADAPTERS[cache_key] = adapter_class(**options)
    return _ADAPTERS[cache_key]


def clear_adapter_cache() -> None:
    """Forget cached adapters (frees their pretrained weights)."""
    _ADAPTERS.clear()


def load_model(uri: Any, pretrained: Any = None, **options: Any) -> Any:
    """Any supported fine-tuned model as ``LoadedModel`` (see ``distac.models.resolve.load_model``)."""
    from distac.models.resolve import load_model as _load_model

    return _load_model(uri, pretrained, **options)
