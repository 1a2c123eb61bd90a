"""One run at a time per storage root: a lock file holding the holder's pid, host and start time.

A second run on the same root gets a clear error naming the holder. A lock left by a process that died
on this host is broken. A stage child started by the run holding the lock inherits its token
(``DISTAC_LOCK_TOKEN``) and runs under it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any

from distac import io
from distac.errors import DistacError
from distac.pipeline.process import host, pid_alive

log = logging.getLogger(__name__)

LOCK_FILE = ".distac.lock"
TOKEN_ENV = "DISTAC_LOCK_TOKEN"


class StorageBusyError(DistacError):
    """Another run holds the storage root."""


class RootLock:
    """``with RootLock(root):`` holds the storage root for this process (and its stage children)."""

    held: set["RootLock"] = set()  # the locks this process holds, released by an interrupt handler

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.uri = io.join_uri(self.root, LOCK_FILE)
        self.token: str | None = None
        self._inherited = False

    def holder(self) -> dict[str, Any] | None:
        fs, path = io.url_to_fs(self.uri)
        try:
            with fs.open(path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {"pid": None, "host": "?", "started": "?", "token": None}

    def _stale(self, holder: dict[str, Any]) -> bool:
        return holder.get("host") == host() and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])

    def _create(self, record: dict[str, Any]) -> bool:
        data = json.dumps(record).encode()
        if io.is_local(self.uri):
            path = io.url_to_fs(self.uri)[1]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return True
        fs, path = io.url_to_fs(self.uri)  # object stores have no exclusive create: check, then write
        if fs.exists(path):
            return False
        io.write_bytes_atomic(data, self.uri)
        return True

    def acquire(self) -> "RootLock":
        inherited = os.environ.get(TOKEN_ENV)
        current = self.holder()
        if current is not None and inherited and current.get("token") == inherited:
            self.token, self._inherited = inherited, True
            return self
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": host(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "token": token}
        for _ in range(2):
            if self._create(record):
                self.token = token
                RootLock.held.add(self)
                return self
            current = self.holder()
            if current is not None and self._stale(current):
                log.warning("breaking the lock on %s left by process %s, which is gone", self.root, current["pid"])
                self._remove()
                continue
            break
        current = current or {}
        raise StorageBusyError(
            f"storage root {self.root} is busy: another run (pid {current.get('pid')} on {current.get('host')}, "
            f"started {current.get('started')}) holds {self.uri}. Wait for it to finish; if that process is "
            f"gone, remove the lock file.")

    def _remove(self) -> None:
        fs, path = io.url_to_fs(self.uri)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.token is not None and not self._inherited:
            current = self.holder()
            if current is not None and current.get("token") == self.token:
                self._remove()
        RootLock.held.discard(self)
        self.token = None

    def __enter__(self) -> "RootLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def child_environment(self) -> dict[str, str]:
        """What a stage child needs to run under this lock."""
        return {TOKEN_ENV: self.token} if self.token else {}
