"""Run the pipeline (``distac run --params params.yaml``, what ``make run`` does; also
``python -m flows.run``).

Shows each stage starting and finishing, per-step progress of the long ones (fine-tuning, DisTaC, merging,
evaluation), then the results table, what ran and what was skipped, and the command that opens the MLflow
UI. Ctrl-C (or SIGTERM) stops within seconds: stage children are killed, open MLflow runs marked KILLED,
Prefect's temporary server stopped and the storage lock released; finished stages stay finished.
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
    _stop_prefect_server()
    logging.shutdown()
    os._exit(INTERRUPTED)


def _release_locks() -> None:
    from distac.pipeline.lock import RootLock

    for lock in list(RootLock.held):
        lock.release()


def _stop_prefect_server() -> None:
    """Stop the temporary Prefect API server this process started (if any)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return
    for server in list(SubprocessASGIServer._instances.values()):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 (best effort while stopping)
            pass


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
    ran = [s["key"] for s in result["stages"] if not s["skipped"]]
    print()
    print(result["report"]["table"])
    print(f"{len(ran)} stages ran, {len(result['stages']) - len(ran)} were up to date; "
          f"wall time {seconds:.1f} s")
    print(f"outputs: {params.storage.root}/report/ (results.md, results.csv, results.png, metrics.json)")
    print(f"MLflow UI: mlflow ui --backend-store-uri {result['tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
