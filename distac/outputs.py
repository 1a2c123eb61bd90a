"""Where a command may write: never over one of its inputs, never over files distac did not write.

Every command that takes ``--out`` calls ``guard_output`` before doing any work. An output location is
accepted when it does not exist, is an empty directory, or holds a previous distac output of the same
kind (which is then replaced atomically). Anything else needs an explicit ``overwrite=True``. A location
that is, or contains, one of the command's inputs is refused even then: replacing it would destroy the
input while it is being read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from safetensors import safe_open

from distac import io
from distac.errors import OutputError

# The file a finished output of each kind holds (written last, so its presence means "distac wrote this").
MARKERS = {
    "merge": "merge.json",        # distac merge
    "model": "meta.json",         # distac finetune / save_pretrained / a conditioned model
    "conditioned": "history.json",  # distac condition
    "export": "distac_export.json",  # a transformers model directory distac wrote (distac.export)
}
# What a checkpoint directory written by ``ShardedSafetensorsWriter`` holds, and nothing else.
CHECKPOINT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
KINDS = (*MARKERS, "checkpoint")


def _normalized(uri: str) -> str:
    """A comparable form of a location: the real absolute path locally, 'protocol://path' otherwise."""
    fs, path = io.url_to_fs(str(uri))
    if io.is_local(str(uri)):
        return os.path.realpath(path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path.rstrip('/')}"


def is_same_or_inside(inner: str, outer: str) -> bool:
    """Whether location ``inner`` is ``outer`` or lies under it."""
    inner, outer = _normalized(inner), _normalized(outer)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _is_previous_output(fs, path: str, kind: str) -> bool:
    names = [os.path.basename(entry.rstrip("/")) for entry in fs.ls(path, detail=False)]
    if kind == "checkpoint":
        return all(CHECKPOINT_FILE.fullmatch(name) for name in names)
    return MARKERS[kind] in names


def _is_previous_checkpoint_file(uri: str) -> bool:
    """A single safetensors file that distac wrote (its metadata carries the 'distac' key)."""
    if not str(uri).endswith(io.SAFETENSORS_SUFFIX) or not io.is_local(str(uri)):
        return False
    try:
        with safe_open(io.url_to_fs(str(uri))[1], framework="pt") as handle:
            return "distac" in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable file is not one distac wrote
        return False


def guard_output(out: str, *, kind: str, inputs: Iterable[str] = (), overwrite: bool = False) -> None:
    """Raise ``OutputError`` unless ``out`` may be (re)written by a command reading ``inputs``.

    ``kind`` is one of ``KINDS``: what the command writes, so that its own earlier output is recognised.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; kinds: {', '.join(KINDS)}")
    for source in inputs:
        if source and is_same_or_inside(str(source), str(out)):
            raise OutputError(f"output {out} is or contains the input {source}; choose another output location")
    fs, path = io.url_to_fs(str(out))
    if overwrite or not fs.exists(path):
        return
    if fs.isdir(path):
        if not fs.ls(path, detail=False) or _is_previous_output(fs, path, kind):
            return
        raise OutputError(f"output directory {out} is not empty and holds no earlier distac {kind} output; "
                          f"choose an empty or new location, or pass --overwrite to replace everything in it")
    if kind == "checkpoint" and _is_previous_checkpoint_file(str(out)):
        return
    raise OutputError(f"output {out} already exists and was not written by distac; choose another location, "
                      f"or pass --overwrite to replace it")
