"""Run the pipeline: ``python -m flows.run --params params.yaml`` (what ``make run`` does).

Prints Prefect's progress logs while it runs, then the results table, what ran and what was skipped, and
the command that opens the MLflow UI on the tracking store.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import flows  # noqa: F401  (Prefect defaults before prefect is imported)
from distac.config import load_params
from distac.errors import DistacError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="pipeline params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except DistacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from flows.pipeline import distac_pipeline

    logging.getLogger("distac").setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        result = distac_pipeline(args.params)
    except DistacError as exc:
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
