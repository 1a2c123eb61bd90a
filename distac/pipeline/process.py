"""Processes of a pipeline run: stage children that die with their runner, liveness of lock holders, and
the cleanup a run does after an earlier one that was killed."""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STAGE_TMP_PREFIX = "distac-stage-"


def set_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits (Linux ``prctl``);
    False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_parent(pid: int, poll_seconds: float = 0.5) -> None:
    """Make this process exit as soon as process ``pid`` (the runner that spawned it) is gone.

    Linux: the kernel's parent-death signal, then a check that the parent did not die before it was set.
    Elsewhere: a daemon thread polling the parent pid. Stage outputs are written atomically, so exiting
    mid-stage leaves nothing half-written behind.
    """
    if set_death_signal():
        if os.getppid() != pid:
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(poll_seconds)
        os._exit(1)

    if os.getppid() != pid:
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host() -> str:
    return socket.gethostname()


def stage_tmp_dir() -> str:
    """A private temporary directory for one stage child, named after this process so that a later run can
    tell it is left over from a killed one."""
    return tempfile.mkdtemp(prefix=f"{STAGE_TMP_PREFIX}{os.getpid()}-")


def remove_stale_tmp_dirs() -> list[str]:
    """Remove ``distac-stage-<pid>-*`` directories whose process is gone (left by a SIGKILLed run)."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{STAGE_TMP_PREFIX}*")):
        owner = os.path.basename(path)[len(STAGE_TMP_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary directories left by killed runs", len(removed))
    return removed


EPHEMERAL_SERVER_APP = "prefect.server.api.server:create_app"


def _proc_fields(pid: int, name: str) -> list[str]:
    """The NUL-separated fields of ``/proc/<pid>/<name>`` (cmdline, environ); empty if unreadable."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as handle:
            return handle.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            return next((int(line.split()[1]) for line in handle if line.startswith("PPid:")), None)
    except OSError:
        return None


def orphaned_prefect_servers(prefect_home: str | None) -> list[int]:
    """Temporary Prefect API servers left by a killed run: processes serving Prefect's ephemeral app with
    this ``PREFECT_HOME`` (None: the default, unset) whose parent died, so init adopted them. Linux only."""
    found = []
    for entry in glob.glob("/proc/[0-9]*"):
        pid = int(os.path.basename(entry))
        if pid == os.getpid() or EPHEMERAL_SERVER_APP not in _proc_fields(pid, "cmdline"):
            continue
        environment = dict(item.split("=", 1) for item in _proc_fields(pid, "environ") if "=" in item)
        if (_parent_pid(pid) == 1 and environment.get("PREFECT__SERVER_EPHEMERAL") == "1"
                and environment.get("PREFECT_HOME") == prefect_home):
            found.append(pid)
    return found


def stop_orphaned_prefect_servers(prefect_home: str | None) -> list[int]:
    """Stop the temporary Prefect servers a SIGKILLed run left listening (see ``orphaned_prefect_servers``)."""
    stopped = []
    for pid in orphaned_prefect_servers(prefect_home):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except OSError:
            continue
    if stopped:
        log.info("stopped %d temporary Prefect servers left by killed runs", len(stopped))
    return stopped
