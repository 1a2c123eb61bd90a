"""Task vectors: τ_t = θ_t − θ_pre over the shared (merged) floating-point parameters."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from distac import io
from distac.errors import MismatchError, NonFiniteError


def select_keys(keys: Iterable[str], include: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None) -> list[str]:
    """Keys matching any ``include`` regex (all if None) and no ``exclude`` regex (``re.search``)."""
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    return [k for k in keys
            if (not inc or any(p.search(k) for p in inc)) and not any(p.search(k) for p in exc)]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN/Inf.

    A sum is non-finite whenever an entry is, and costs a small fraction of ``torch.isfinite(t).all()``
    (which builds two masks); only a non-finite sum, or one that overflowed, is examined entry by entry.
    """
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_finite(key: str, tensor: torch.Tensor, where: str = "") -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"tensor {key!r}{' in ' + where if where else ''} has {bad} NaN/Inf values")


def _check_pair(key: str, pre: torch.Tensor, ft: torch.Tensor, name: str = "the fine-tuned model") -> None:
    if pre.shape != ft.shape:
        raise MismatchError(f"tensor {key!r}: shape {tuple(ft.shape)} in {name}, "
                            f"{tuple(pre.shape)} in the pretrained model")
    if pre.dtype != ft.dtype:
        raise MismatchError(f"tensor {key!r}: dtype {ft.dtype} in {name}, "
                            f"{pre.dtype} in the pretrained model")


def difference(key: str, pre: torch.Tensor, ft: torch.Tensor, name: str = "the fine-tuned model",
               in_place: bool = False) -> torch.Tensor:
    """τ = ft − pre for one tensor (in ``ft``'s memory when ``in_place``), checked for NaN/Inf once.

    One check on τ covers both inputs, since a NaN or Inf in either makes τ non-finite; only then is the
    pretrained tensor examined, to name the model at fault (with a finite θ_pre, τ's bad entries are the
    fine-tuned model's, or differences beyond float range).
    """
    _check_pair(key, pre, ft, name)
    tau = ft.sub_(pre) if in_place else ft - pre
    if not all_finite(tau):
        check_finite(key, pre, "the pretrained model")
        check_finite(key, tau, name)
    return tau


def _floating_keys(reader: Mapping[str, torch.Tensor]) -> list[str]:
    dtype_of = getattr(reader, "dtype", None)
    if dtype_of is not None and callable(dtype_of):
        return [k for k in reader if dtype_of(k).is_floating_point]
    return [k for k, v in reader.items() if v.is_floating_point()]


def shared_floating_keys(pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                         include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                         names: tuple[str, str] = ("pretrained", "fine-tuned")) -> list[str]:
    """The floating keys a task vector covers; raises if the two models' key sets differ."""
    pre_keys = select_keys(_floating_keys(pretrained), include, exclude)
    ft_keys = select_keys(_floating_keys(finetuned), include, exclude)
    missing, extra = sorted(set(pre_keys) - set(ft_keys)), sorted(set(ft_keys) - set(pre_keys))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the {names[1]} model: {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if extra:
            parts.append(f"missing from the {names[0]} model: {', '.join(extra[:5])}"
                         + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""))
        raise MismatchError("checkpoints do not match; " + "; ".join(parts))
    return pre_keys


class TaskVector(Mapping[str, torch.Tensor]):
    """An immutable mapping from parameter name to the floating tensor θ_t − θ_pre."""

    __slots__ = ("_tensors",)

    def __init__(self, mapping: Mapping[str, torch.Tensor], *, check: bool = True):
        tensors = dict(mapping)
        if check:
            for key, tensor in tensors.items():
                if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                    kind = getattr(tensor, "dtype", type(tensor).__name__)
                    raise TypeError(f"task vector entry {key!r} must be a floating tensor, got {kind}")
                check_finite(key, tensor, "the task vector")
        object.__setattr__(self, "_tensors", tensors)

    def __setattr__(self, name, value):
        raise AttributeError("TaskVector is immutable")

    # Mapping protocol
    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._tensors.values())
        return f"TaskVector({len(self)} tensors, {numel} parameters, norm={self.norm():.4g})"

    # construction
    @classmethod
    def from_state_dicts(cls, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                         include: Sequence[str] | None = None,
                         exclude: Sequence[str] | None = None) -> "TaskVector":
        """τ = finetuned − pretrained over the floating keys both share (after include/exclude)."""
        out = {}
        for key in shared_floating_keys(pretrained, finetuned, include, exclude):
            out[key] = difference(key, pretrained[key], finetuned[key])
        return cls(out, check=False)

    @classmethod
    def from_checkpoints(cls, pretrained: str | os.PathLike, finetuned: str | os.PathLike,
                         include: Sequence[str] | None = None,
                         exclude: Sequence[str] | None = None) -> "TaskVector":
        return cls.from_state_dicts(io.open_checkpoint(pretrained), io.open_checkpoint(finetuned),
                                    include, exclude)

    # arithmetic
    def _zip(self, other: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        if set(self) != set(other):
            diff = sorted(set(self) ^ set(other))
            raise MismatchError(f"task vectors cover different tensors: {', '.join(diff[:5])}")
        for key in self:
            a, b = self[key], other[key]
            if a.shape != b.shape:
                raise MismatchError(f"tensor {key!r}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
            if a.dtype != b.dtype:
                raise MismatchError(f"tensor {key!r}: dtypes {a.dtype} and {b.dtype} differ")
            yield key, a, b

    def __add__(self, other: Mapping[str, torch.Tensor]) -> "TaskVector":
        return TaskVector({k: a + b for k, a, b in self._zip(other)}, check=False)

    def __sub__(self, other: Mapping[str, torch.Tensor]) -> "TaskVector":
        return TaskVector({k: a - b for k, a, b in self._zip(other)}, check=False)

    def __mul__(self, scalar: float) -> "TaskVector":
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool) or not math.isfinite(scalar):
            raise TypeError(f"a task vector can only be scaled by a finite number, got {scalar!r}")
        return TaskVector({k: v * scalar for k, v in self.items()}, check=False)

    __rmul__ = __mul__

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    # geometry
    def dot(self, other: Mapping[str, torch.Tensor]) -> float:
        return float(sum((a.double() * b.double()).sum() for _, a, b in self._zip(other)))

    def norm(self) -> float:
        """The L2 norm over all tensors, accumulated in float64."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.values()))

    def cosine(self, other: Mapping[str, torch.Tensor]) -> float:
        other = other if isinstance(other, TaskVector) else TaskVector(other)
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0

    def apply_to(self, pretrained_state: Mapping[str, torch.Tensor], alpha: float = 1.0) -> dict[str, torch.Tensor]:
        """θ_pre + α τ for the covered keys; every other entry of the state is passed through unchanged."""
        missing = [k for k in self if k not in pretrained_state]
        if missing:
            raise MismatchError(f"the pretrained state lacks {', '.join(missing[:5])}")
        out = dict(pretrained_state)
        for key, delta in self.items():
            base = pretrained_state[key]
            if base.shape != delta.shape:
                raise MismatchError(f"tensor {key!r}: shape {tuple(delta.shape)} in the task vector, "
                                    f"{tuple(base.shape)} in the pretrained state")
            out[key] = (base + alpha * delta.to(base.dtype)).to(base.dtype)
        return out

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "TaskVector":
        return TaskVector({k: v.to(device=device, dtype=dtype) for k, v in self.items()}, check=False)

    # storage
    def save(self, uri: str | os.PathLike, max_shard_bytes: int = io.DEFAULT_SHARD_BYTES) -> None:
        io.save_state_dict(self._tensors, uri, max_shard_bytes=max_shard_bytes,
                           metadata={"distac": "task_vector"})

    @classmethod
    def load(cls, uri: str | os.PathLike) -> "TaskVector":
        return cls(io.load_state_dict(uri))


class LastKeyCache(Mapping[str, torch.Tensor]):
    """A checkpoint reader that keeps the tensor read last: T lazy task vectors over one pretrained model,
    visited key by key, then read each θ_pre tensor once instead of T times."""

    def __init__(self, reader: Mapping[str, torch.Tensor]):
        self.reader = reader
        self._key: str | None = None
        self._tensor: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key != self._key:
            self._key, self._tensor = None, None  # drop the old tensor before reading the next
            self._tensor, self._key = self.reader[key], key
        return self._tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader)

    def __len__(self) -> int:
        return len(self.reader)

    def __contains__(self, key: object) -> bool:
        return key in self.reader

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.reader.dtype(key)


class LazyTaskVector(Mapping[str, torch.Tensor]):
    """τ computed on access from two lazily read checkpoints: what streaming merges consume."""

    def __init__(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 name: str = "fine-tuned"):
        self.pretrained, self.finetuned, self.name = pretrained, finetuned, name
        self._keys = shared_floating_keys(pretrained, finetuned, include, exclude, ("pretrained", name))
        for key in self._keys:  # metadata-only checks up front, so errors come before any work
            shape = getattr(pretrained, "shape", None)
            if callable(shape) and shape(key) != finetuned.shape(key):
                raise MismatchError(f"tensor {key!r}: shape {finetuned.shape(key)} in {name}, "
                                    f"{shape(key)} in the pretrained model")

    @classmethod
    def from_checkpoints(cls, pretrained: str | os.PathLike, finetuned: str | os.PathLike,
                         include: Sequence[str] | None = None,
                         exclude: Sequence[str] | None = None) -> "LazyTaskVector":
        return cls(io.open_checkpoint(pretrained), io.open_checkpoint(finetuned), include, exclude,
                   name=str(finetuned))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return difference(key, self.pretrained[key], self.finetuned[key], self.name,
                          in_place=getattr(self.finetuned, "fresh_reads", False))

    def load_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """τ for ``key`` in ``out`` (float32, contiguous, the tensor's number of elements), returned shaped.

        A float32 fine-tuned file is read straight into ``out`` and θ_pre subtracted there: no allocation, so
        a merge that reuses its buffers from key to key does not page-fault fresh memory for every tensor.
        Any other dtype is differenced in its own dtype and converted, exactly as ``self[key]`` then ``.float()``.
        """
        if key not in self._keys:
            raise KeyError(key)
        read_into = getattr(self.finetuned, "read_into", None)
        if read_into is None or self.dtype(key) != out.dtype:
            tau = self[key]
            return out.view(tau.shape).copy_(tau)
        return difference(key, self.pretrained[key], read_into(key, out), self.name, in_place=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The tensor's shape from the fine-tuned checkpoint's metadata, or None where it has none."""
        shape = getattr(self.finetuned, "shape", None)
        return tuple(shape(key)) if callable(shape) else None

    def dtype(self, key: str) -> torch.dtype | None:
        """The fine-tuned tensor's dtype from metadata, or None where there is none."""
        dtype = getattr(self.finetuned, "dtype", None)
        return dtype(key) if callable(dtype) else None
