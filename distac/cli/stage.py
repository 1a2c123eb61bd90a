"""``distac stage``: run one pipeline stage from a params file (what dvc.yaml's stages call).

A stage whose outputs already match its params, upstream stages and code is skipped (``--force`` re-runs
it); a stage whose upstream stages are missing or stale refuses to run and names them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from distac.pipeline.params import VARIANTS
from distac.pipeline.table import STAGES, Scope

EVENT_PREFIX = "@distac-event "
"""Marks the JSON lines a stage child writes on stdout for the runner that started it (``--events``)."""


def register(subparsers) -> None:
    task_stages = [s.name for s in STAGES if s.scope is Scope.TASK]
    method_stages = [s.name for s in STAGES if s.scope is Scope.METHOD]
    parser = subparsers.add_parser("stage", help="run one pipeline stage from params.yaml", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="stages:\n" + "\n".join(f"  {s.name:<11} {s.help}" for s in STAGES))
    parser.add_argument("name", choices=[s.name for s in STAGES], help="the stage to run")
    parser.add_argument("--params", default="params.yaml", help="pipeline params file (default: params.yaml)")
    parser.add_argument("--task", help=f"the task, for {', '.join(task_stages)}")
    parser.add_argument("--method", help=f"the merge method, for {', '.join(method_stages)}")
    parser.add_argument("--variant", choices=VARIANTS, help=f"for {', '.join(method_stages)}: as-is (default) "
                                                            "or distac (the DisTaC-conditioned vectors)")
    parser.add_argument("--force", action="store_true", help="run even if the stage is up to date")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--events", action="store_true",
                        help=f"write per-step metrics, log records and the result as JSON lines prefixed "
                             f"{EVENT_PREFIX.strip()!r} on stdout (for the runner that started this stage)")
    parser.add_argument("--exit-with-parent", type=int, metavar="PID",
                        help="exit as soon as process PID (the runner that spawned this stage) is gone, so a "
                             "killed pipeline run leaves no stage running on in the background")
    parser.set_defaults(func=run)


def emit(event: dict) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


class EventLogHandler(logging.Handler):
    """Sends the library's log records (INFO and above) to the runner as ``{"log": …}`` events, so what a
    stage child logs (reused from which root, rows read, warnings) reaches the run's console."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            emit({"log": {"name": record.name, "level": record.levelno, "message": record.getMessage()}})
        except Exception:  # noqa: BLE001 (logging never breaks the stage)
            self.handleError(record)


def run(args: argparse.Namespace) -> int:
    from distac.pipeline import load_params, ref, run_stage
    from distac.pipeline.lock import RootLock
    from distac.pipeline.process import exit_with_parent

    if args.exit_with_parent is not None:
        exit_with_parent(args.exit_with_parent)
    params = load_params(args.params)
    made = ref(params, args.name, task=args.task, method=args.method, variant=args.variant)
    on_metrics = (lambda step, metrics: emit({"step": step, "metrics": metrics})) if args.events else None
    if args.events:
        logging.getLogger("distac").addHandler(EventLogHandler())
    with RootLock(params.storage.root):
        result = run_stage(params, made, force=args.force, progress=not args.no_progress, on_metrics=on_metrics)
    if args.events:
        emit({"result": result.to_dict()})
        return 0
    status = "up to date (skipped)" if result.skipped else f"done in {result.seconds:.1f} s"
    print(f"{result.key}: {status} -> {result.uri}")
    if made.stage == "report":
        print(result.summary["table"])
    else:
        print(json.dumps(result.summary, indent=2, sort_keys=True, default=str))
    return 0
