"""Checkpoint I/O on local paths and ``s3://`` URIs (anything fsspec opens).

Reads are lazy: a checkpoint opens as a read-only mapping that loads one tensor per access, so a merge
holds one tensor per model at a time. Formats: a single safetensors file, a sharded safetensors directory
with the ``*.safetensors.index.json`` Hugging Face writes, and torch ``.pt/.bin/.pth`` state dicts.

Writes are atomic: files are staged in a temporary sibling and renamed into place; on S3 each object is
uploaded whole from a local staging file, and a sharded checkpoint's index is uploaded last, so a crash
never leaves a readable half-written checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch

from distac.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _s3_options() -> dict[str, Any]:
    """Bounded waits for S3: an endpoint that accepts and never answers, or refuses, fails in about
    ``DISTAC_S3_TIMEOUT`` × ``DISTAC_S3_ATTEMPTS`` seconds instead of hanging (botocore retries in between)."""
    timeout = float(os.environ.get("DISTAC_S3_TIMEOUT", "30"))
    attempts = int(os.environ.get("DISTAC_S3_ATTEMPTS", "3"))
    return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                              "retries": {"max_attempts": attempts, "mode": "standard"}}}


def url_to_fs(uri: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or a URI."""
    text = str(uri)
    remote_s3 = text.startswith(("s3://", "s3a://"))
    fs, path = fsspec.core.url_to_fs(text, **(_s3_options() if remote_s3 else {}))
    if remote_s3:
        fs.retries = 1  # botocore already retried; s3fs's own 5 back-off rounds would multiply the wait
    return fs, path


def redact(uri: str) -> str:
    """A URI safe to print or log: any ``user:password@`` part is removed."""
    return re.sub(r"(?<=://)[^/@\s]*@", "", str(uri))


def describe_storage_error(exc: BaseException) -> str | None:
    """A one-line explanation of a storage failure (unreachable endpoint, timeout, denied access), naming
    the service and endpoint without credentials; None when ``exc`` is not one."""
    module = type(exc).__module__ or ""
    if not module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs")):
        return None
    endpoint = redact(os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS S3")
    name = type(exc).__name__
    if "Timeout" in name:
        return f"S3 at {endpoint} did not answer in time ({name}; DISTAC_S3_TIMEOUT sets the wait): {redact(str(exc))}"
    if "Connect" in name or "Connection" in name:
        return f"cannot connect to S3 at {endpoint} ({name}): {redact(str(exc))}"
    if "Credential" in name:
        return f"no usable S3 credentials for {endpoint} ({name}); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    return f"S3 at {endpoint} failed: {name}: {redact(str(exc))}"


def is_local(uri: str | os.PathLike) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def join_uri(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    text = str(base).rstrip("/")
    return "/".join([text, *(p.strip("/") for p in parts)])


# --------------------------------------------------------------------------------------------- reading


class _SafetensorsFile:
    """One safetensors file read by byte ranges: only the header is read when it opens.

    Each read lands straight in the tensor it returns (``preadv`` into fresh memory locally, ``readinto``
    remotely): one kernel copy, no intermediate bytes. A persistent memory map would avoid that copy but
    keep every page touched in the process's RSS until the map closes, which for a merge is all T inputs.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._fs, self._path = url_to_fs(uri)
        self._local = is_local(uri)
        try:
            size = self._fs.size(self._path)
            with self._fs.open(self._path, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
                header = json.loads(handle.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint file not found: {uri}") from exc
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{uri} is not a valid safetensors file ({exc})") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, dict[str, Any]] = header
        for key, entry in header.items():
            problem = _entry_problem(entry, size - self._data_start)
            if problem:
                raise CheckpointError(f"{uri}: tensor {key!r} has a corrupt header entry ({problem}): {entry}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._entries[key]["dtype"]]

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """A new tensor the caller owns (and may modify in place), or the tensor read into ``out``
        (contiguous, the entry's dtype and number of elements) and returned in the entry's shape."""
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        if out is None:
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        elif out.dtype != _DTYPES[entry["dtype"]] or not out.is_contiguous() or out.numel() != math.prod(entry["shape"]):
            raise ValueError(f"{self.uri}: cannot read tensor {key!r} ({entry['dtype']}, shape {entry['shape']}) "
                             f"into a {out.dtype} buffer of {out.numel()} elements")
        else:
            tensor = out.view(entry["shape"])
        if end == start:
            return tensor
        target = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        offset = self._data_start + start
        try:
            got = _pread_into(self._path, target, offset) if self._local else self._read_remote(target, offset)
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint file not found: {self.uri}") from exc
        if got != end - start:
            raise CheckpointError(f"{self.uri}: tensor {key!r} is truncated")
        return tensor

    def _read_remote(self, target: memoryview, offset: int) -> int:
        with self._fs.open(self._path, "rb") as handle:
            handle.seek(offset)
            return _read_fully(handle.readinto, target)


def _entry_problem(entry: Any, data_size: int) -> str | None:
    """Why a header entry cannot describe a tensor in a data section of ``data_size`` bytes, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        return f"unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        return "shape is not a list of non-negative integers"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        return "data_offsets is not a pair of integers"
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        return f"data_offsets {offsets} lie outside the {data_size}-byte data section"
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - start != expected:
        return f"data_offsets span {end - start} bytes but shape {shape} of {dtype} needs {expected}"
    return None


def _read_fully(readinto: Any, target: memoryview) -> int:
    """Call ``readinto`` until ``target`` is full or the source ends; the number of bytes read."""
    got = 0
    while got < len(target):
        n = readinto(target[got:])
        if not n:
            break
        got += n
    return got


def _pread_into(path: str, target: memoryview, offset: int) -> int:
    """Read ``len(target)`` bytes of a local file at ``offset`` into ``target``; the number read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_fully(lambda view: os.preadv(fd, [view], offset + (len(target) - len(view))), target)
    finally:
        os.close(fd)


class CheckpointReader(Mapping[str, torch.Tensor]):
    """A lazy, read-only view of a checkpoint: ``reader[key]`` loads that tensor only."""

    def __init__(self, uri: str, files: dict[str, _SafetensorsFile] | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None):
        self.uri = uri
        self._files = files or {}
        self._tensors = tensors
        self._order = list(tensors) if tensors is not None else list(self._files)

    @property
    def fresh_reads(self) -> bool:
        """Whether ``reader[key]`` returns a new tensor each time, which the caller may modify in place."""
        return self._tensors is None

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        return self._file(key).read(key)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """The tensor read straight into ``out`` (contiguous, its dtype and number of elements), shaped."""
        if self._tensors is not None:
            return out.view(self._tensors[key].shape).copy_(self._tensors[key])
        return self._file(key).read(key, out)

    def _file(self, key: str) -> _SafetensorsFile:
        try:
            return self._files[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in checkpoint {self.uri}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in (self._tensors if self._tensors is not None else self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return self._files[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        if self._tensors is not None:
            return self._tensors[key].dtype
        return self._files[key].dtype(key)

    def numel(self, key: str) -> int:
        n = 1
        for size in self.shape(key):
            n *= size
        return n


def _resolve(uri: str) -> tuple[str, str]:
    """Which format ``uri`` holds, and the file to open: ('safetensors'|'index'|'torch', path)."""
    fs, path = url_to_fs(uri)
    if path.endswith(INDEX_SUFFIX) or path.endswith(".index.json"):
        return "index", uri
    if path.endswith(SAFETENSORS_SUFFIX):
        return "safetensors", uri
    if path.endswith(TORCH_SUFFIXES):
        return "torch", uri
    if fs.isdir(path):
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
        singles = [n for n in names if n.endswith(SAFETENSORS_SUFFIX)]
        torch_files = [n for n in names if n.endswith(TORCH_SUFFIXES)]
        if indexes:
            return "index", join_uri(uri, indexes[0])
        if len(singles) == 1:
            return "safetensors", join_uri(uri, singles[0])
        if len(torch_files) == 1:
            return "torch", join_uri(uri, torch_files[0])
        raise CheckpointError(
            f"{uri} holds no recognizable checkpoint (expected one *.safetensors, a *{INDEX_SUFFIX} "
            f"or one torch file; found {names or 'nothing'})"
        )
    if not fs.exists(path):
        raise CheckpointError(f"checkpoint not found: {uri}")
    raise CheckpointError(f"{uri}: unknown checkpoint format (expected .safetensors, an index JSON, "
                          f"{'/'.join(TORCH_SUFFIXES)} or a directory)")


def _unwrap_state_dict(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under 'state_dict' / 'model' (open_clip, lightning)."""
    if isinstance(obj, Mapping):
        for nested in ("state_dict", "model"):
            if nested in obj and isinstance(obj[nested], Mapping):
                obj = obj[nested]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return {k.removeprefix("module."): v for k, v in tensors.items()}
    raise CheckpointError(f"{uri} does not contain a state dict of tensors")


def _read_torch(uri: str) -> dict[str, torch.Tensor]:
    fs, path = url_to_fs(uri)
    try:
        if is_local(uri):
            if os.path.isfile(path) and not zipfile.is_zipfile(path):
                raise CheckpointError(
                    f"{uri} is an old-format (non-zip) torch checkpoint, which cannot be memory-mapped; "
                    "re-save it with torch.save from PyTorch >= 1.6 or convert it to safetensors")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            obj = torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file not found: {uri}") from exc
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for a broken archive
        raise CheckpointError(f"{uri} is not a readable torch checkpoint ({exc})") from exc
    return _unwrap_state_dict(obj, uri)


def open_checkpoint(uri: str | os.PathLike) -> CheckpointReader:
    """Open a checkpoint lazily. Safetensors tensors load on access; torch files are memory-mapped."""
    uri = str(uri)
    kind, target = _resolve(uri)
    if kind == "torch":
        return CheckpointReader(uri, tensors=_read_torch(target))
    if kind == "safetensors":
        single = _SafetensorsFile(target)
        return CheckpointReader(uri, files={key: single for key in single.keys()})
    fs, path = url_to_fs(target)
    try:
        index = json.loads(fs.cat_file(path))
        weight_map: dict[str, str] = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint index not found: {target}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{target} is not a valid safetensors index ({exc})") from exc
    base = target.rsplit("/", 1)[0] if "/" in target else "."
    for name in set(weight_map.values()):
        _check_shard_name(name, target)
    shards = {name: _SafetensorsFile(join_uri(base, name)) for name in sorted(set(weight_map.values()))}
    files = {}
    for key, name in weight_map.items():
        if key not in shards[name].keys():
            raise CheckpointError(f"{target} maps {key!r} to {name}, which does not contain it")
        files[key] = shards[name]
    return CheckpointReader(uri, files=files)


def _check_shard_name(name: Any, index_uri: str) -> None:
    """Refuse an index entry that is not a relative path inside the index's directory."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (not parts or name.startswith("/") or "\\" in name or "://" in name or ".." in parts
            or os.path.isabs(name) or (len(name) > 1 and name[1] == ":")):
        raise CheckpointError(f"{index_uri} names shard {name!r}, which is not a file inside its directory; "
                              "shard names must be relative paths without '..'")


def load_state_dict(uri: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into memory."""
    reader = open_checkpoint(uri)
    return {key: reader[key] for key in reader}


# --------------------------------------------------------------------------------------------- writing


def _local_staging_dir(final_path: str | None) -> str:
    """A temporary directory on the same filesystem as ``final_path`` (so rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(final_path)) if final_path else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".distac-tmp-", dir=parent)


def _replace_local(staged: str, final: str) -> None:
    """Move a staged file or directory over ``final`` (a directory is swapped, then the old one removed)."""
    if os.path.isdir(staged) and os.path.exists(final):
        trash = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        os.replace(staged, final)
        if os.path.isdir(trash):
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.remove(trash)
    else:
        os.replace(staged, final)


def _prepare_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, cloning only those that share storage (safetensors refuses aliases)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"cannot save {key!r}: a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def write_safetensors(state: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its contents.

    The header is JSON with sorted keys (safetensors' own writer emits the metadata in a per-process random
    order, so two identical runs gave different files); tensors are written in the given order, straight
    from their memory.
    """
    tensors = _prepare_tensors(state)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"cannot save {key!r} as safetensors: unsupported dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def write_bytes_atomic(data: bytes, uri: str | os.PathLike) -> None:
    """Write a small file (JSON, metadata) atomically."""
    uri = str(uri)
    if is_local(uri):
        _, path = url_to_fs(uri)
        staging = _local_staging_dir(path)
        try:
            tmp = os.path.join(staging, "data")
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        fs, path = url_to_fs(uri)
        fs.pipe_file(path, data)


def write_json(obj: Any, uri: str | os.PathLike) -> None:
    write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True).encode(), uri)


def read_json(uri: str | os.PathLike) -> Any:
    fs, path = url_to_fs(uri)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"file not found: {uri}") from exc
    except ValueError as exc:
        raise CheckpointError(f"{uri} is not valid JSON ({exc})") from exc


class ShardedSafetensorsWriter:
    """Write tensors one at a time into Hugging Face style sharded safetensors, atomically.

    Memory holds at most one shard buffer. Shards are staged on local disk; on a clean exit they are
    renamed (``model.safetensors`` for one shard, else ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``) and the directory is moved into place, or uploaded index-last.
    On an exception nothing is written at the destination.
    """

    def __init__(self, uri: str | os.PathLike, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None, overwrite: bool = False):
        self.uri = str(uri).rstrip("/")
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._local = is_local(self.uri)
        self._final_path = url_to_fs(self.uri)[1] if self._local else None
        self._staging: str | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def __enter__(self) -> "ShardedSafetensorsWriter":
        from distac.outputs import guard_output  # outputs reads checkpoints through this module

        guard_output(self.uri, kind="checkpoint", overwrite=self.overwrite)  # before any work
        self._staging = _local_staging_dir(self._final_path)
        return self

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self._staging is None:
            raise RuntimeError("use ShardedSafetensorsWriter as a context manager")
        if key in self._buffer or any(key in shard for shard in self._shards):
            raise CheckpointError(f"tensor {key!r} written twice to {self.uri}")
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        number = len(self._shards)
        write_safetensors(self._buffer, os.path.join(self._staging, f"shard-{number}"), metadata=self.metadata)
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._flush()
                self._commit()
        finally:
            if self._staging and os.path.exists(self._staging):
                shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _commit(self) -> None:
        if not self._shards:  # an empty checkpoint is still a valid one
            write_safetensors({}, os.path.join(self._staging, "shard-0"), metadata=self.metadata)
            self._shards.append([])
        count = len(self._shards)
        names = ([SINGLE_FILE_NAME] if count == 1 else
                 [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        out_dir = os.path.join(self._staging, "out")
        os.mkdir(out_dir)
        for i, name in enumerate(names):
            os.replace(os.path.join(self._staging, f"shard-{i}"), os.path.join(out_dir, name))
        if count > 1:
            index = {"metadata": {"total_size": self._total_bytes},
                     "weight_map": {key: names[i] for i, shard in enumerate(self._shards) for key in shard}}
            with open(os.path.join(out_dir, INDEX_FILE_NAME), "w") as handle:
                json.dump(index, handle, indent=2, sort_keys=True)
        if self._local:
            _replace_local(out_dir, self._final_path)
            return
        fs, path = url_to_fs(self.uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        for name in names:  # shards first, the index (the entry point readers open) last
            fs.put_file(os.path.join(out_dir, name), f"{path}/{name}")
        if count > 1:
            fs.put_file(os.path.join(out_dir, INDEX_FILE_NAME), f"{path}/{INDEX_FILE_NAME}")


def save_state_dict(state: Mapping[str, torch.Tensor], uri: str | os.PathLike,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> None:
    """Save a state dict atomically.

    ``*.safetensors`` → one file; ``*.pt/.bin/.pth`` → ``torch.save``; anything else → a directory of
    (possibly sharded) safetensors, which replaces only an earlier checkpoint directory unless ``overwrite``.
    """
    uri = str(uri)
    fs, path = url_to_fs(uri)
    if path.endswith(SAFETENSORS_SUFFIX) or path.endswith(TORCH_SUFFIXES):
        staging = _local_staging_dir(path if is_local(uri) else None)
        try:
            tmp = os.path.join(staging, Path(path).name)
            if path.endswith(SAFETENSORS_SUFFIX):
                write_safetensors(state, tmp, metadata={"format": "pt", **(metadata or {})})
            else:
                torch.save(dict(_prepare_tensors(state)), tmp)
            if is_local(uri):
                os.replace(tmp, path)
            else:
                fs.put_file(tmp, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with ShardedSafetensorsWriter(uri, max_shard_bytes=max_shard_bytes, metadata=metadata,
                                  overwrite=overwrite) as writer:
        for key, tensor in state.items():
            writer.add(key, tensor)
