"""What a user's input files hold, for the fingerprints: params name a task's data files and its imported
model only by path, so without this an edited CSV or a replaced checkpoint would leave every stage that read
it "up to date". A file is identified by a hash of its content (an S3 object by its ETag and size), a
directory by the identities of the files under it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

from distac import io

# The fields of a task's entry (its `data:`, `unlabeled:` and `finetuned:`) that may name files.
PATH_FIELDS = frozenset({"train", "test", "validation", "dataset", "path", "finetuned"})
CHUNK = 1 << 20


@functools.lru_cache(maxsize=None)
def _local_file_hash(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a local file; cached per (path, size, mtime) so a run hashes each file once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _local_identity(path: str) -> str:
    if os.path.isfile(path):
        stat = os.stat(path)
        return _local_file_hash(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    digest = hashlib.sha256()
    for root, directories, names in os.walk(path):
        directories.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            digest.update(f"{os.path.relpath(full, path)}\0{_local_identity(full)}\0".encode())
    return digest.hexdigest()[:16]


def _remote_identity(uri: str) -> str | None:
    fs, path = io.url_to_fs(uri)
    if not fs.exists(path):
        return None
    entries = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    digest = hashlib.sha256()
    for name in sorted(entries):
        info = entries[name]
        tag = info.get("ETag") or info.get("etag") or info.get("md5") or ""
        digest.update(f"{name[len(path):]}\0{info.get('size')}\0{tag}\0".encode())
    return digest.hexdigest()[:16]


def file_identity(uri: str) -> str | None:
    """The content identity of a local or remote file or directory; None when ``uri`` names none (a hub id,
    a dataset name)."""
    if io.is_local(uri):
        path = io.url_to_fs(uri)[1]
        return _local_identity(path) if os.path.exists(path) else None
    return _remote_identity(uri)


def input_identities(values: Any) -> dict[str, str]:
    """``{path: identity}`` for every existing file named by a path field anywhere in ``values``."""
    found: dict[str, str] = {}

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, name)
        elif isinstance(value, list):
            for item in value:
                walk(item, key)
        elif isinstance(value, str) and key in PATH_FIELDS and (identity := file_identity(value)) is not None:
            found[value] = identity

    walk(values, None)
    return found
