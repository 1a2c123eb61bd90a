"""Scheduled runs of the pipeline.

Two ways, both against a Prefect server (``prefect server start``; ``export PREFECT_API_URL=http://127.0.0.1:4200/api``):

- ``python -m flows.deploy --params params.yaml --cron "0 3 * * *"`` serves the flow from this process
  on a cron schedule (the process must keep running; it also executes the runs).
- ``python -m flows.deploy --params params.yaml --cron "0 3 * * *" --work-pool gpu`` registers a
  deployment on a work pool instead; any worker of that pool (``prefect worker start --pool gpu``, e.g.
  on a GPU machine with this checkout) picks the runs up. The code is loaded from this checkout's path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flows  # noqa: F401  (Prefect defaults before prefect is imported)
from distac.pipeline import load_params
from distac.errors import DistacError
from flows.pipeline import distac_pipeline

DEFAULT_CRON = "0 3 * * *"


def scheduled_deployment(params_path: str, cron: str = DEFAULT_CRON, name: str = "distac-nightly"):
    """A deployment of the pipeline for ``params_path`` on a cron schedule (served by this process)."""
    return distac_pipeline.to_deployment(name=name, cron=cron, parameters={"params_path": params_path},
                                         description=f"distac pipeline for {params_path}, cron {cron!r}")


def deploy_to_work_pool(params_path: str, work_pool: str, cron: str = DEFAULT_CRON,
                        name: str = "distac-nightly") -> str:
    """Register a work-pool deployment that loads the flow from this checkout; returns its id."""
    checkout = Path(__file__).resolve().parent.parent
    source = distac_pipeline.from_source(source=str(checkout), entrypoint="flows/pipeline.py:distac_pipeline")
    return str(source.deploy(name=name, work_pool_name=work_pool, cron=cron,
                             parameters={"params_path": str(Path(params_path).resolve())}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="pipeline params file (default: params.yaml)")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r})")
    parser.add_argument("--name", default="distac-nightly", help="deployment name")
    parser.add_argument("--work-pool", help="register on this work pool instead of serving from this process")
    args = parser.parse_args(argv)
    try:
        load_params(args.params)  # fail now, not at 3 a.m.
    except DistacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.work_pool:
        deployment_id = deploy_to_work_pool(args.params, args.work_pool, args.cron, args.name)
        print(f"deployment {deployment_id} on work pool {args.work_pool!r}, schedule {args.cron!r}")
        return 0
    from prefect import serve

    serve(scheduled_deployment(str(Path(args.params).resolve()), args.cron, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
