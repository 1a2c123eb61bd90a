"""Weights from checkpoints that pickle whole modules (the task-vector literature's ``torch.save(image_encoder)``),
without executing any code from the file.

``torch.load(weights_only=True)`` refuses such files because they name their model classes. Here every class
or function the pickle names becomes an inert stand-in (a ``_Stub`` that only records its pickled state);
only torch's own tensor-rebuilding functions and a few plain containers are the real thing. The stand-ins'
``_parameters`` / ``_buffers`` / ``_modules`` are then walked into a flat state dict, as
``module.state_dict()`` would name it.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Mapping
from typing import Any

import torch

from distac.errors import CheckpointError

_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch", "Size"), ("torch", "device"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "object"), ("copyreg", "_reconstructor"),
}

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _Stub:
    """An inert stand-in for a pickled object of any class: it keeps its constructor arguments and state."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @classmethod
    def __class_getitem__(cls, item: Any) -> type:
        return cls


def _stub_class(module: str, name: str) -> type:
    return type(name, (_Stub,), {"qualified_name": f"{module}.{name}", "__module__": "distac.models.pickled"})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # torch pickles with protocol 2: '__builtin__', 'copy_reg'
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        return _stub_class(module, name)


restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=pickle.load, __name__="restricted")


def _module_state(obj: Any) -> dict | None:
    """The ``__dict__`` of a pickled nn.Module stand-in (None for anything else)."""
    state = getattr(obj, "state", None)
    if isinstance(state, tuple) and state and isinstance(state[0], dict):  # (dict, slotstate)
        state = state[0]
    return state if isinstance(state, dict) and "_parameters" in state else None


def _walk(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = _module_state(obj)
    if state is None:
        return
    skipped = set(state.get("_non_persistent_buffers_set") or ())
    for name, tensor in (state.get("_parameters") or {}).items():
        if isinstance(tensor, torch.Tensor):
            out[prefix + name] = tensor.detach()
    for name, tensor in (state.get("_buffers") or {}).items():
        if isinstance(tensor, torch.Tensor) and name not in skipped:
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        _walk(child, f"{prefix}{name}.", out)


def load_pickled_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a torch file holding a pickled module (or a state dict), executing no code from it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except Exception as exc:  # a broken archive raises many types
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({exc})") from None
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        nested = obj.get("state_dict", obj.get("model"))
        if not tensors and isinstance(nested, Mapping):
            tensors = {k: v for k, v in nested.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return {k.removeprefix("module."): v for k, v in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    _walk(obj, "", out)
    if not out:
        raise CheckpointError(f"{path} holds neither a state dict nor a pickled module with weights")
    return out
