"""Run one stage instance: check its upstream stages, skip it when it is up to date, reuse it from
another root when one finished it, otherwise compute it and write its manifest last.

A manifest (``_done.json``) records the instance's fingerprint and the fingerprints of the upstream
instances it read. A stage refuses to run while an upstream instance is missing or stale (its manifest
does not match the current params and code), so it never computes from, or locks in, outdated inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distac import io
from distac.device import resolve_device
from distac.errors import ConfigError
from distac.pipeline.params import PipelineParams
from distac.pipeline.store import RunStore, redact
from distac.pipeline.table import Plan, StageRef

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]


class UpstreamError(ConfigError):
    """An upstream stage has not finished, or finished with other params or code."""


@dataclass
class StageContext:
    """What a stage function gets: the params, its instance, the store and its own folder, and where to
    report progress."""

    params: PipelineParams
    ref: StageRef
    store: RunStore
    progress: bool = False
    on_metrics: MetricsCallback | None = None

    @property
    def uri(self) -> str:
        return self.store.dir(self.ref)

    @property
    def device(self) -> torch.device:
        return resolve_device(self.params.execution.device)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if self.on_metrics is not None:
            self.on_metrics(step, metrics)


@dataclass
class StageResult:
    """What running an instance did: where its outputs are, whether it was skipped (up to date, or copied from
    the ``storage.reuse`` root ``reused_from``), and its summary."""

    key: str
    uri: str
    fingerprint: str
    skipped: bool
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    reused_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "uri": self.uri, "fingerprint": self.fingerprint, "skipped": self.skipped,
                "summary": self.summary, "seconds": self.seconds, "reused_from": self.reused_from}


def is_done(params: PipelineParams, made: StageRef, plan: Plan | None = None) -> bool:
    """Whether the instance finished with exactly the current params, upstream and code."""
    plan = plan or Plan.of(params)
    manifest = RunStore.of(params).manifest(made)
    return manifest is not None and manifest.get("fingerprint") == plan.fingerprints[made]


def finished_report(params: PipelineParams) -> dict[str, Any] | None:
    """The report's summary when every instance is up to date, so a run would only skip stages; else None.
    Lets ``distac run`` answer a no-change re-run without starting a flow."""
    plan = Plan.of(params)
    if not all(is_done(params, made, plan) for made in plan):
        return None
    return RunStore.of(params).manifest(StageRef("report")).get("summary")


def check_upstream(params: PipelineParams, made: StageRef, plan: Plan, store: RunStore) -> dict[str, str]:
    """The upstream instances' fingerprints; UpstreamError naming the first one missing or stale."""
    found = {}
    for upstream in plan.upstream[made]:
        manifest = store.manifest(upstream)
        expected = plan.fingerprints[upstream]
        if manifest is None:
            raise UpstreamError(f"{made.key} needs {upstream.key}, which has not finished under "
                                f"{store.root} (run it first: {command_for(upstream)})")
        if manifest.get("fingerprint") != expected:
            raise UpstreamError(f"{made.key} needs {upstream.key}, whose outputs under {store.root} are stale "
                                f"(its params, inputs or code changed since it ran); run it again: "
                                f"{command_for(upstream)}")
        found[upstream.key] = expected
    return found


def command_for(made: StageRef) -> str:
    """The ``distac stage`` command that runs an instance."""
    parts = ["distac stage", made.stage]
    if made.task:
        parts += ["--task", made.task]
    if made.method:
        parts += ["--method", made.method, "--variant", made.variant or "as-is"]
    return " ".join(parts)


def run_stage(params: PipelineParams, made: StageRef, *, force: bool = False, progress: bool = False,
              on_metrics: MetricsCallback | None = None, plan: Plan | None = None) -> StageResult:
    """Run one stage instance (see the module docstring)."""
    plan = plan or Plan.of(params)
    store = RunStore.of(params)
    expected = plan.fingerprints[made]
    uri = store.dir(made)
    manifest = store.manifest(made)
    if not force and manifest is not None and manifest.get("fingerprint") == expected:
        log.info("%s: up to date, skipped", made.key)
        return StageResult(made.key, uri, expected, True, manifest.get("summary", {}))
    upstream = check_upstream(params, made, plan, store)
    if manifest is not None:
        store.clear_manifest(made)
    if not force:
        reused = _reuse(params, made, expected, store)
        if reused is not None:
            root, copied = reused
            log.info("%s: reused from %s (same fingerprint there; copied, not recomputed)", made.key, redact(root))
            return StageResult(made.key, uri, expected, True, copied.get("summary", {}), reused_from=redact(root))
    log.info("%s: running", made.key)
    if params.execution.torch_threads:
        torch.set_num_threads(params.execution.torch_threads)
    started = time.perf_counter()
    summary = made.record.run(StageContext(params, made, store, progress, on_metrics))
    seconds = time.perf_counter() - started
    store.write_manifest(made, {"stage": made.stage, "key": made.key, "fingerprint": expected,
                                "upstream": upstream, "seconds": round(seconds, 3),
                                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary})
    log.info("%s: done in %.1f s", made.key, seconds)
    return StageResult(made.key, uri, expected, False, summary, seconds)


def _reuse(params: PipelineParams, made: StageRef, expected: str,
           store: RunStore) -> tuple[str, dict[str, Any]] | None:
    """Copy the instance from a ``storage.reuse`` root whose manifest has the expected fingerprint, its
    manifest last, so a crash mid-copy leaves it unfinished; (that root, its manifest)."""
    for root in params.storage.reuse:
        source = RunStore(root)
        manifest = source.manifest(made)
        if manifest is None or manifest.get("fingerprint") != expected:
            continue
        for relative, file in source.files(made):
            fs, path = io.url_to_fs(file)
            with fs.open(path, "rb") as handle:
                io.write_bytes_atomic(handle.read(), io.join_uri(store.dir(made), relative))
        store.write_manifest(made, manifest)
        return root, manifest
    return None
