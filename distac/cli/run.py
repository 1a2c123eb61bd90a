"""``distac run``: the whole pipeline as a Prefect flow with MLflow tracking (``flows/``; needs the
``pipeline`` extra). ``make run`` runs ``distac run --params params.yaml``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run the whole pipeline (Prefect flow + MLflow) from params.yaml",
                                   description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="pipeline params file (default: params.yaml)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.run import run as run_pipeline  # the orchestration layer; the library never imports it

    return run_pipeline(args.params)
