"""MLflow tracking for the pipeline: one parent run per pipeline run, one child run per stage that did work.

Everything goes through ``MlflowClient`` with explicit run ids (no fluent, thread-local active run), so
stages running in threads or in Dask worker processes log safely to the same store. Every wait is bounded:
the sqlite store's creation lock (``STORE_LOCK_TIMEOUT``), MLflow's HTTP requests (timeout and retries from
``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, bounded defaults set here). Runs are
tagged with their host and pid, so a later pipeline run marks the runs of a killed one KILLED.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from distac import io
from distac.errors import DistacError
from distac.pipeline.params import MlflowParams
from distac.pipeline.process import host, pid_alive
from distac.pipeline.store import redact

log = logging.getLogger("distac.tracking")  # under "distac", so Prefect forwards it

PARAM_VALUE_LIMIT = 6000  # MLflow's maximum parameter value length
STORE_LOCK_TIMEOUT = 120.0  # seconds to wait for another run creating the same sqlite store
HOST_TAG = "distac.host"
SECRET_PARAMS = ("mlflow.tracking_uri", "storage.root", "storage.reuse")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


class TrackingError(DistacError):
    """The MLflow tracking store cannot be reached or is locked; the message names it (without secrets)."""


@dataclass(frozen=True)
class Tracking:
    """Where to log (picklable, so it travels to Dask workers)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None = None

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` → ``sqlite:////abs/cwd/mlflow.db`` (workers may run elsewhere); a plain path
    becomes a file store URI."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """``mlruns/`` beside a sqlite database, so artifacts never land in whatever directory a worker uses."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


def _store_lock(uri: str, timeout: float = STORE_LOCK_TIMEOUT) -> AbstractContextManager:
    """A lock beside a sqlite store: runs started side by side would otherwise race to create its schema and
    the experiment (MLflow fails with "duplicate column name" or a unique-constraint error)."""
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        database.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(f"{database}.lock", timeout=timeout)
    return nullcontext()


def setup_experiment(settings: MlflowParams, lock_timeout: float = STORE_LOCK_TIMEOUT) -> Tracking:
    """Create (or find) the experiment; returns a Tracking without a parent run. TrackingError when the
    store is locked for longer than ``lock_timeout`` or does not answer."""
    uri = absolute_tracking_uri(settings.tracking_uri)
    lock = _store_lock(uri, lock_timeout)
    try:
        with lock:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(settings.experiment)
            if experiment is not None:
                return Tracking(uri, experiment.experiment_id)
            location = settings.artifact_location or default_artifact_location(uri)
            return Tracking(uri, client.create_experiment(settings.experiment, artifact_location=location))
    except Timeout:
        raise TrackingError(f"the MLflow store {redact(uri)} is locked by another process ({lock.lock_file} held "
                            f"for more than {lock_timeout:g} s); if no other run is starting, remove that file") from None
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"MLflow tracking store {redact(uri)} cannot be used: "
                            f"{redact_text(str(exc), uri)[:500]}") from None


def redact_text(text: str, uri: str) -> str:
    """An error message with the URI's secret-bearing form replaced by its redacted one."""
    return text.replace(uri, redact(uri))


def this_process() -> str:
    """The value of the host tag: host and pid of the process that owns a run."""
    return f"{host()}:{os.getpid()}"


def mark_stale_runs(tracking: Tracking) -> int:
    """Mark RUNNING runs of this experiment KILLED when the process that owned them (same host) is gone:
    what a killed pipeline run left behind. Returns how many."""
    client = tracking.client()
    stale = 0
    for run in client.search_runs([tracking.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(HOST_TAG, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host() and pid.isdigit() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
            stale += 1
    if stale:
        log.info("marked %d MLflow runs of killed pipeline runs KILLED", stale)
    return stale


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params → {'a.b.c': 'value'} (lists as their string form), as MLflow params; URIs that may
    carry credentials are logged without them."""
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        elif name in SECRET_PARAMS:
            out[name] = str([redact(v) for v in value] if isinstance(value, list) else redact(value))
        else:
            out[name] = str(value)[:PARAM_VALUE_LIMIT]
    return out


_OPEN_RUNS: dict[str, MlflowClient] = {}
_OPEN_LOCK = threading.Lock()


def opened(client: MlflowClient, run_id: str) -> None:
    """Remember an open run, so an interrupt can mark it KILLED."""
    with _OPEN_LOCK:
        _OPEN_RUNS[run_id] = client


def closed(run_id: str) -> None:
    with _OPEN_LOCK:
        _OPEN_RUNS.pop(run_id, None)


def kill_open_runs() -> None:
    """Mark every run this process still has open KILLED (an interrupted pipeline run)."""
    with _OPEN_LOCK:
        runs = list(_OPEN_RUNS.items())
        _OPEN_RUNS.clear()
    for run_id, client in runs:
        try:
            client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED))
        except Exception as exc:  # noqa: BLE001 (best effort while stopping)
            log.warning("could not mark MLflow run %s KILLED: %s", run_id, exc)


class StageRun:
    """A child MLflow run created on first use, so a skipped stage leaves no empty run behind."""

    def __init__(self, tracking: Tracking | None, name: str, tags: dict[str, str], params: dict[str, Any]):
        self.tracking, self.name, self.tags, self.params = tracking, name, tags, params
        self._client = tracking.client() if tracking else None
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        if self._client is None:
            return None
        if self._run_id is None:
            tags = {"mlflow.runName": self.name, HOST_TAG: this_process(), **self.tags}
            if self.tracking.parent_run_id:
                tags["mlflow.parentRunId"] = self.tracking.parent_run_id
            run = self._client.create_run(self.tracking.experiment_id, tags=tags, run_name=self.name)
            self._run_id = run.info.run_id
            opened(self._client, self._run_id)
            flat = flatten(self.params)
            items = [Param(k, v) for k, v in flat.items()]
            for start in range(0, len(items), 100):
                self._client.log_batch(self._run_id, params=items[start:start + 100])
        return self._run_id

    @property
    def started(self) -> bool:
        return self._run_id is not None

    def log_metrics(self, metrics: dict[str, Any], step: int = 0, prefix: str = "") -> None:
        """Log the numeric entries of ``metrics`` (others are ignored) at ``step``."""
        if self._client is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(f"{prefix}{k}", float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def metrics_callback(self, prefix: str = "", every: int = 1, label: str = ""):
        """An ``on_step(step, metrics)`` callback logging to this run, and a log line every ``every`` steps."""
        def on_step(step: int, metrics: dict[str, float]) -> None:
            self.log_metrics(metrics, step=step, prefix=prefix)
            if step == 1 or step % every == 0:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
                log.info("%s step %d: %s", label or self.name, step, shown)
        return on_step

    def set_tag(self, key: str, value: str) -> None:
        if self._client is not None:
            self._client.set_tag(self.run_id, key, value)

    def log_artifacts(self, stage_uri: str, names: list[str], artifact_path: str | None = None) -> None:
        """Copy small output files of a stage (local or S3) into the run's artifacts."""
        if self._client is None:
            return
        log_stage_artifacts(self._client, self.run_id, stage_uri, names, artifact_path)

    def finish(self, failed: bool = False) -> None:
        if self._client is not None and self._run_id is not None:
            status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
            self._client.set_terminated(self._run_id, status=status)
            closed(self._run_id)


def log_stage_artifacts(client: MlflowClient, run_id: str, stage_uri: str, names: list[str],
                        artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="distac-artifacts-") as staging:
        for name in names:
            fs, path = io.url_to_fs(io.join_uri(stage_uri, name))
            if not fs.exists(path):
                continue
            local = os.path.join(staging, os.path.basename(name))
            fs.get_file(path, local)
            client.log_artifact(run_id, local, artifact_path)
