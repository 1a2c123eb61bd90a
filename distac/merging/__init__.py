"""Merge methods behind one registry: ``merge(name, task_vectors, **hyperparams) -> Merged``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distac.errors import ConfigError
from distac.merging.base import Merged, MergeMethod, iter_merged
from distac.merging.consensus import Consensus
from distac.merging.emr import EMR
from distac.merging.iso_c import IsoC
from distac.merging.iso_cts import IsoCTS
from distac.merging.task_arithmetic import TaskArithmetic
from distac.merging.ties import Ties
from distac.merging.tsv import TSV
from distac.merging.wudi import WUDI
from distac.vectors import TaskVector

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (TaskArithmetic, Ties, Consensus, TSV, IsoC, IsoCTS, EMR, WUDI)
}


def method_class(name: str) -> type[MergeMethod]:
    """The named method's class: the one check that a method exists."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def get_method(name: str, **hyperparams: Any) -> MergeMethod:
    """An instance of the named method with validated hyperparameters."""
    return method_class(name).create(**hyperparams)


def collect(method: MergeMethod, vectors: Sequence[Mapping[str, torch.Tensor]],
            device: torch.device | str | None = None, progress: bool = False) -> Merged:
    """Run the shared engine in memory and gather the result."""
    merged: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in vectors] if method.per_task else []
    for key, result in iter_merged(method, vectors, device=device, progress=progress):
        if isinstance(result, torch.Tensor):
            merged[key] = result
            continue
        merged[key] = result.vector
        for i, mask in enumerate(result.masks):
            masks[i][key] = mask
    info = method.finish()
    scales = tuple(info.pop("scales")) if method.per_task else None
    return Merged(method=method.name, vector=TaskVector(merged, check=False), num_tasks=len(vectors),
                  masks=tuple(masks) if method.per_task else None, scales=scales, info=info,
                  alpha=method.alpha if method.has_alpha else None)


def merge(name: str, task_vectors: Sequence[Mapping[str, torch.Tensor]], *,
          device: torch.device | str | None = None, progress: bool = False, **hyperparams: Any) -> Merged:
    """Merge task vectors with the named method (see METHODS.md for each rule)."""
    return collect(get_method(name, **hyperparams), list(task_vectors), device=device, progress=progress)


__all__ = ["METHODS", "Merged", "MergeMethod", "method_class", "get_method", "merge", "collect"]
