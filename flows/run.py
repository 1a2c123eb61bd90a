"""Run the pipeline (``distac run --params params.yaml``, what ``make run`` does; also
``python -m flows.run``).

Shows each stage starting and finishing, per-step progress of the long ones (fine-tuning, DisTaC, merging,
evaluation), then the results table, what ran, what was reused from which ``storage.reuse`` root and what was
up to date, and the command that opens the MLflow UI. Ctrl-C (or SIGTERM) stops within seconds: stage children
are killed, open MLflow runs marked KILLED, the Prefect flow runs marked Cancelled, Prefect's temporary server
stopped and the storage lock released; finished stages stay finished.
When every stage is already up to date it prints the table and exits without starting a flow (a scheduled
deployment still runs the flow, which skips every stage).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import flows  # noqa: F401  (Prefect defaults before prefect is imported)
from distac.errors import DistacError
from distac.pipeline import load_params

log = logging.getLogger("distac.run")
INTERRUPTED = 130


def _stop_now(signum: int, frame) -> None:
    """Stop the run at once from the signal handler: in-process stages run in threads that cannot be
    interrupted, so the process exits instead of waiting for them."""
    from tasks.stage_tasks import stop_children
    from tasks.tracking import kill_open_runs

    print(f"\ninterrupted ({signal.Signals(signum).name}): stopping stages, marking MLflow runs KILLED",
          file=sys.stderr, flush=True)
    watchdog = threading.Timer(20, lambda: os._exit(INTERRUPTED))  # never hang while stopping
    watchdog.daemon = True
    watchdog.start()
    stop_children()
    kill_open_runs()
    _release_locks()
    _mark_flow_runs_cancelled()
    _stop_prefect_server()
    logging.shutdown()
    os._exit(INTERRUPTED)


def _release_locks() -> None:
    from distac.pipeline.lock import RootLock

    for lock in list(RootLock.held):
        lock.release()


def _mark_flow_runs_cancelled() -> None:
    """Record in Prefect that the interrupted flow run and the flow runs above it (a sub-flow's parents) were
    cancelled; otherwise its UI shows them running forever. The signal handler runs in the main thread,
    inside the innermost flow run's context."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext
        from prefect.states import Cancelled
    except ImportError:
        return
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    try:
        with get_client(sync_client=True) as client:
            flow_run = context.flow_run
            while flow_run is not None:
                client.set_flow_run_state(flow_run.id, Cancelled(message="interrupted by the user"), force=True)
                parent_task_run = flow_run.parent_task_run_id
                flow_run = (client.read_flow_run(client.read_task_run(parent_task_run).flow_run_id)
                            if parent_task_run else None)
    except Exception as exc:  # noqa: BLE001 (best effort while stopping)
        log.warning("could not mark the Prefect flow runs cancelled: %s", exc)


def _stop_prefect_server() -> None:
    """Stop the temporary Prefect API server this process started (if any). It is killed outright: a
    graceful stop cancels the event flushes it has in flight and Prefect prints a page of tracebacks for
    each. Flow and task run states are already written; SQLite keeps its database consistent either way."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return
    for server in list(SubprocessASGIServer._instances.values()):
        process = server.server_process
        if process is None:
            continue
        try:
            process.kill()
            process.wait(timeout=5)
        except Exception:  # noqa: BLE001 (best effort while stopping)
            pass


def stage_summary(stages: list[dict], seconds: float) -> str:
    """How many stages ran, were copied from a ``storage.reuse`` root (each named with that root) or were up to
    date, and the wall time."""
    ran = [s for s in stages if not s["skipped"]]
    reused = [s for s in stages if s["skipped"] and s.get("reused_from")]
    lines = [f"{len(ran)} stages ran, {len(reused)} were reused from other roots, "
             f"{len(stages) - len(ran) - len(reused)} were up to date; wall time {seconds:.1f} s"]
    lines += [f"  reused {s['key']} from {s['reused_from']}" for s in reused]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distac run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="pipeline params file (default: params.yaml)")
    return run(parser.parse_args(argv).params)


def run(params_path: str) -> int:
    try:
        params = load_params(params_path)
    except DistacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from distac.pipeline.process import stop_orphaned_prefect_servers
    from distac.pipeline.runner import finished_report

    stop_orphaned_prefect_servers(os.environ.get("PREFECT_HOME"))  # left listening by a SIGKILLed run
    try:
        report = finished_report(params)
    except DistacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report is not None:  # nothing to run: no flow, no temporary server, no MLflow run
        print(report["table"])
        print(f"every stage is up to date with {params_path}: nothing to run (no flow run started)")
        print(f"outputs: {params.storage.root}/report/")
        return 0

    from flows.pipeline import distac_pipeline
    from tasks.tracking import kill_open_runs

    logging.getLogger("distac").setLevel(logging.INFO)
    for noisy in ("httpx", "httpcore", "alembic", "mlflow"):  # one line per API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _stop_now)
        signal.signal(signal.SIGTERM, _stop_now)
    started = time.perf_counter()
    try:
        result = distac_pipeline(params_path)
    except DistacError as exc:
        kill_open_runs()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print()
    print(result["report"]["table"])
    print(stage_summary(result["stages"], seconds))
    print(f"outputs: {params.storage.root}/report/ (results.md, results.csv, results.png, metrics.json)")
    print(f"MLflow UI: mlflow ui --backend-store-uri {result['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
