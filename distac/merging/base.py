"""What every merge method shares: the hyperparameter-bearing base class, the tensor-by-tensor engine
(used by both the in-memory and the streaming path) and the ``Merged`` result."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from distac.device import resolve_device
from distac.errors import ConfigError, MismatchError
from distac.merging.linalg import mean_over_tasks
from distac.vectors import LazyTaskVector, TaskVector, select_keys

READ_AHEAD_BYTES = 1 << 30  # the most float32 input bytes of one key read ahead of the merge


@dataclass(frozen=True)
class TensorParts:
    """What a per-task method (EMR) returns for one tensor: the shared vector and each task's mask."""

    vector: torch.Tensor
    masks: list[torch.Tensor]


def default_device() -> torch.device:
    return resolve_device(None)


@dataclass
class MergeMethod:
    """A merge method. Subclasses are dataclasses whose fields are the method's hyperparameters.

    The engine calls ``prepare`` once (only when ``needs_first_pass``), then ``merge_tensor`` once per
    tensor with the T task tensors in float32 on the compute device, then ``finish``. The task tensors are
    valid during that call only (streaming reuses their memory): keep numbers from them, not the tensors; a
    returned view of them is copied by the engine.
    """

    name: ClassVar[str]
    needs_first_pass: ClassVar[bool] = False
    per_task: ClassVar[bool] = False  # True when task t is served with its own vector (EMR): TensorParts
    has_alpha: ClassVar[bool] = False  # True when the result is α·merge(...): an ``alpha`` field scales it

    def prepare(self, vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str],
                device: torch.device, read_ahead_bytes: int = READ_AHEAD_BYTES) -> None:
        """A first pass over all tensors for whole-model quantities (TIES threshold); ``read_ahead_bytes``
        as in ``iter_task_tensors``."""

    def merge_tensor(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor | TensorParts:
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        """Whole-model results known only after every tensor was seen (EMR's per-task scales)."""
        return {}

    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """Hyperparameter name → default."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def create(cls, **hyperparams: Any) -> "MergeMethod":
        known = cls.hyperparameters()
        unknown = sorted(set(hyperparams) - set(known))
        if unknown:
            raise ConfigError(f"{cls.name} has no hyperparameter {', '.join(unknown)}; "
                              f"it accepts: {', '.join(sorted(known)) or 'none'}")
        method = cls(**hyperparams)
        method.validate()
        return method

    def validate(self) -> None:
        """Raise ConfigError on out-of-range hyperparameters."""


def is_matrix(key: str, tensor: torch.Tensor, exclude_2d: Sequence[str] | None) -> bool:
    """Whether a tensor gets the 2-D (SVD / weight-matrix) treatment: ndim == 2 and not excluded."""
    return tensor.ndim == 2 and not (exclude_2d and not select_keys([key], exclude=exclude_2d))


@dataclass
class MatrixMethod(MergeMethod):
    """A method with its own rule for 2-D weight matrices (SVD, optimization). Every other tensor, and every
    key matching an ``exclude_2d`` regex, is averaged over tasks. The result is scaled by ``alpha`` where the
    method has one."""

    exclude_2d: tuple[str, ...] = ()

    def validate(self) -> None:
        self.exclude_2d = check_patterns(self.name, "exclude_2d", self.exclude_2d)
        if self.has_alpha:
            check_number(self.name, "alpha", self.alpha)

    def merge_matrix(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def merge_tensor(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if is_matrix(key, tensors[0], self.exclude_2d):
            merged = self.merge_matrix(key, tensors)
        else:
            merged = mean_over_tasks(tensors)
        return self.alpha * merged if self.has_alpha else merged


def common_keys(vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """The keys every task vector covers, in the first one's order; raises if any differs."""
    if not vectors:
        raise ConfigError("merging needs at least one task vector")
    keys = list(vectors[0])
    reference = set(keys)
    for i, vector in enumerate(vectors[1:], start=1):
        if set(vector) != reference:
            diff = sorted(reference ^ set(vector))
            raise MismatchError(f"task vector {i} covers different tensors than task vector 0: "
                                f"{', '.join(diff[:5])}" + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""))
    return keys


def load_tensors(key: str, vectors: Sequence[Mapping[str, torch.Tensor]], device: torch.device,
                 buffer: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.dtype]:
    """The T tensors for ``key`` in float32 on ``device``, and their common original dtype.

    With a flat float32 CPU ``buffer`` of at least T × numel elements, lazy task vectors load into
    consecutive slices of it (the returned tensors are views of ``buffer``) instead of fresh memory.
    """
    if buffer is not None and _loads_into_buffers(vectors, device):
        shapes, dtypes = [v.shape(key) for v in vectors], [v.dtype(key) for v in vectors]
        if None not in shapes and None not in dtypes:
            _check_alike(key, shapes, dtypes)
            numel = math.prod(shapes[0])
            if buffer.numel() >= numel * len(vectors):
                return [v.load_into(key, buffer[i * numel:(i + 1) * numel]) for i, v in enumerate(vectors)], dtypes[0]
    tensors = [vector[key] for vector in vectors]
    _check_alike(key, [t.shape for t in tensors], [t.dtype for t in tensors])
    return [t.to(device=device, dtype=torch.float32) for t in tensors], tensors[0].dtype


def _loads_into_buffers(vectors: Sequence[Mapping[str, torch.Tensor]], device: torch.device) -> bool:
    """Whether ``load_tensors`` can fill a caller's buffer: lazy task vectors, computed on the CPU."""
    return device.type == "cpu" and all(isinstance(v, LazyTaskVector) for v in vectors)


def _check_alike(key: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype]) -> None:
    """Raise MismatchError unless every task's tensor ``key`` has task 0's shape and dtype."""
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        if tuple(shape) != tuple(shapes[0]):
            raise MismatchError(f"tensor {key!r}: shape {tuple(shape)} in task vector {i}, "
                                f"{tuple(shapes[0])} in task vector 0")
        if dtype != dtypes[0]:
            raise MismatchError(f"tensor {key!r}: dtype {dtype} in task vector {i}, {dtypes[0]} in task vector 0")


def input_bytes(key: str, vectors: Sequence[Mapping[str, torch.Tensor]]) -> int | None:
    """What ``load_tensors`` will hold for ``key`` (T float32 tensors), from metadata; None if unknown."""
    vector = vectors[0]
    if isinstance(vector, TaskVector):
        numel = vector[key].numel()
    else:
        shape = getattr(vector, "shape", None)
        dims = shape(key) if callable(shape) else None
        if dims is None:
            return None
        numel = math.prod(dims)
    return 4 * numel * len(vectors)


def iter_task_tensors(keys: Sequence[str], vectors: Sequence[Mapping[str, torch.Tensor]], device: torch.device,
                      read_ahead_bytes: int = READ_AHEAD_BYTES,
                      ) -> Iterator[tuple[str, list[torch.Tensor], torch.dtype]]:
    """``(key, tensors, dtype)`` as ``load_tensors`` gives them, key by key, with the next key's tensors
    loaded in a background thread while the caller works on the current ones.

    For lazy task vectors, loading is reading T + 1 tensors and subtracting; reads and torch ops release the
    GIL, so loading overlaps the merge's own computation. Memory holds the current key's tensors and at most
    ``read_ahead_bytes`` of the next (a larger key is loaded when its turn comes; 0 turns reading ahead off).
    Lazy inputs on the CPU load into two buffers that alternate from key to key (keys within the budget),
    so the caller must not keep the tensors, or a view of them, once it asks for the next key.
    """
    def read_ahead(index: int) -> Future | None:
        if index >= len(keys) or read_ahead_bytes <= 0:
            return None
        size = input_bytes(keys[index], vectors)
        if size is not None and size > read_ahead_bytes:
            return None
        return reader.submit(load, index)

    buffers = _alternating_buffers(keys, vectors, device, read_ahead_bytes)

    def load(index: int) -> tuple[list[torch.Tensor], torch.dtype]:
        return load_tensors(keys[index], vectors, device, buffers[index % 2] if buffers else None)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distac-read") as reader:
        upcoming = read_ahead(0)
        try:
            for index, key in enumerate(keys):
                tensors, dtype = upcoming.result() if upcoming else load(index)
                upcoming = read_ahead(index + 1)
                yield key, tensors, dtype
                tensors.clear()
        finally:
            if upcoming is not None:
                upcoming.cancel()


def _alternating_buffers(keys: Sequence[str], vectors: Sequence[Mapping[str, torch.Tensor]], device: torch.device,
                         budget: int) -> list[torch.Tensor] | None:
    """Two flat float32 buffers, each the size of the largest key's T inputs within ``budget``, for lazy
    task vectors on the CPU (None otherwise). Reused from key to key, their pages are faulted in once
    instead of once per tensor: fresh memory for every input tensor costs a merge up to a third of its time."""
    if budget <= 0 or not _loads_into_buffers(vectors, device):
        return None
    sizes = [size for size in (input_bytes(key, vectors) for key in keys) if size is not None and size <= budget]
    if not sizes:
        return None
    return [torch.empty(max(sizes) // 4), torch.empty(max(sizes) // 4)]


def _shares_memory(tensor: torch.Tensor, others: Sequence[torch.Tensor]) -> bool:
    storage = tensor.untyped_storage().data_ptr()
    return any(other.untyped_storage().data_ptr() == storage for other in others)


def iter_merged(method: MergeMethod, vectors: Sequence[Mapping[str, torch.Tensor]],
                device: torch.device | str | None = None, progress: bool = False,
                read_ahead_bytes: int = READ_AHEAD_BYTES) -> Iterator[tuple[str, torch.Tensor | TensorParts]]:
    """Merge tensor by tensor, yielding (key, result on CPU in the inputs' dtype; masks stay bool).

    Holds the T input tensors of at most two keys (``iter_task_tensors`` reads one ahead) and one result,
    so memory is bounded by the largest tensor. A result is never a view of the inputs, which are reused.
    """
    device = torch.device(device) if device is not None else default_device()
    keys = common_keys(vectors)
    if method.needs_first_pass:
        method.prepare(vectors, keys, device, read_ahead_bytes)
    loaded = iter_task_tensors(keys, vectors, device, read_ahead_bytes)
    for key, tensors, dtype in tqdm(loaded, total=len(keys), desc=f"merge ({method.name})", unit="tensor",
                                    disable=not progress):
        result = method.merge_tensor(key, tensors)
        vector = result if isinstance(result, torch.Tensor) else result.vector
        vector = vector.to(device="cpu", dtype=dtype)
        if _shares_memory(vector, tensors):
            vector = vector.clone()
        yield key, vector if isinstance(result, torch.Tensor) else TensorParts(vector, [m.to("cpu") for m in result.masks])


@dataclass(frozen=True)
class Merged:
    """The result of a merge.

    ``vector`` is τ_m (for EMR: the unified vector τ_uni). EMR also carries per-task boolean ``masks`` and
    ``scales``; ``for_task(i)`` returns what task i is served with: τ_m for every i, or λ_i M_i ⊙ τ_uni.
    ``alpha`` is the α the vector already carries (None for methods without α): it is never applied again.
    """

    method: str
    vector: TaskVector
    num_tasks: int
    masks: tuple[dict[str, torch.Tensor], ...] | None = None
    scales: tuple[float, ...] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    alpha: float | None = None

    def for_task(self, index: int) -> TaskVector:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"task index {index} out of range for {self.num_tasks} merged tasks")
        if self.masks is None:
            return self.vector
        scale, mask = self.scales[index], self.masks[index]
        return TaskVector({k: scale * mask[k].to(v.dtype) * v for k, v in self.vector.items()}, check=False)


# ----------------------------------------------------------------------------- hyperparameter checks


def check_number(method: str, name: str, value: Any, *, minimum: float | None = None,
                 maximum: float | None = None, exclusive_minimum: bool = False, integer: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number (an int when ``integer``) within the bounds."""
    import math

    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ConfigError(f"{method}: {name} must be {kind}, got {value!r}")
    too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    too_high = maximum is not None and value > maximum
    if too_low or too_high:
        low = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise ConfigError(f"{method}: {name} must be {' and '.join(p for p in (low, high) if p)}, got {value!r}")


def check_patterns(method: str, name: str, value: Any) -> tuple[str, ...]:
    """A tuple of valid regular expressions (a single string is accepted as a one-element tuple)."""
    import re

    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{method}: {name} must be a tuple of regular expressions, got {value!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{method}: {name} pattern {pattern!r} is not a valid regex ({exc})") from None
    return tuple(patterns)
