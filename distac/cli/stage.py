"""``distac stage``: run one pipeline stage from a params file (what dvc.yaml's stages call).

A stage whose outputs already match its inputs and parameters is skipped (``--force`` re-runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from distac.errors import ConfigError
from distac.stages import VARIANTS

TASK_STAGES = ("finetune", "extract", "condition")
METHOD_STAGES = ("merge", "evaluate")


def register(subparsers) -> None:
    from distac.stages import STAGES

    parser = subparsers.add_parser("stage", help="run one pipeline stage from params.yaml", description=__doc__)
    parser.add_argument("name", choices=STAGES, help="the stage to run")
    parser.add_argument("--params", default="params.yaml", help="pipeline params file (default: params.yaml)")
    parser.add_argument("--task", help=f"the task, for {', '.join(TASK_STAGES)}")
    parser.add_argument("--method", help=f"the merge method, for {', '.join(METHOD_STAGES)}")
    parser.add_argument("--conditioned", action="store_true",
                        help="merge / evaluate the DisTaC-conditioned vectors (same as --variant distac)")
    parser.add_argument("--variant", choices=VARIANTS, help="as-is (default) or distac")
    parser.add_argument("--force", action="store_true", help="run even if the stage is up to date")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--exit-with-parent", type=int, metavar="PID",
                        help="exit as soon as process PID (the runner that spawned this stage) is gone, so a "
                             "killed pipeline run leaves no stage running on in the background")
    parser.set_defaults(func=run)


def exit_with_parent(pid: int, poll_seconds: float = 0.5) -> None:
    """Exit this process once it is no longer ``pid``'s child (the parent died and it was re-parented).

    Stage outputs are written atomically, so exiting mid-stage leaves nothing half-written behind.
    """

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(poll_seconds)
        os._exit(1)

    if os.getppid() != pid:
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _check_arguments(args: argparse.Namespace) -> None:
    if args.name in TASK_STAGES and not args.task:
        raise ConfigError(f"stage {args.name} needs --task")
    if args.name not in TASK_STAGES and args.task:
        raise ConfigError(f"stage {args.name} takes no --task")
    if args.name in METHOD_STAGES and not args.method:
        raise ConfigError(f"stage {args.name} needs --method")
    if args.name not in METHOD_STAGES and (args.method or args.conditioned):
        raise ConfigError(f"stage {args.name} takes no --method / --conditioned")


def run(args: argparse.Namespace) -> int:
    from distac import stages
    from distac.config import load_params

    if args.exit_with_parent is not None:
        exit_with_parent(args.exit_with_parent)
    args.conditioned = args.conditioned or args.variant == "distac"
    _check_arguments(args)
    params = load_params(args.params)
    progress = not args.no_progress
    name = args.name
    if name in ("pretrained", "diagnose", "report"):
        result = getattr(stages, name)(params, force=args.force)
    elif name == "extract":
        result = stages.extract(params, args.task, force=args.force)
    elif name in ("finetune", "condition"):
        result = getattr(stages, name)(params, args.task, progress=progress, force=args.force)
    elif name == "merge":
        result = stages.merge(params, args.method, args.conditioned, progress=progress, force=args.force)
    else:
        result = stages.evaluate(params, args.method, args.conditioned, force=args.force)
    status = "up to date (skipped)" if result.skipped else f"done in {result.seconds:.1f} s"
    print(f"{result.key}: {status} -> {result.uri}")
    if name == "report":
        print(result.summary["table"])
    else:
        print(json.dumps(result.summary, indent=2, sort_keys=True, default=str))
    return 0
