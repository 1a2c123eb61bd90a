"""``dvc.yaml`` generated from the stage table: ``python -m distac.pipeline.dvc --params params.yaml > dvc.yaml``.

Per-task stages become ``foreach: ${tasks}``; per-method stages one ``foreach: ${merge.methods}`` per
configured variant (``merge-as-is``, ``merge-distac``, …), because the variants read different upstream
stages. Every interpolation in a command is quoted. Deps: the upstream stages' folders and the library
code the stage uses; params: the sections the stage reads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from distac.pipeline.params import PipelineParams, load_params
from distac.pipeline.table import STAGES, Scope, Stage, module_files, stage

HEADER = """\
# GENERATED from the stage table (distac/pipeline/table.py) and merge.variants in params.yaml:
#   python -m distac.pipeline.dvc --params params.yaml > dvc.yaml
# Do not edit by hand; tests/test_pipeline.py holds this file to the table.
# `dvc repro` re-runs exactly the stages whose deps or params changed; `dvc metrics show` and
# `dvc plots show` read the report. Outputs live under storage.root, which must be a local path here
# (use a DVC remote, e.g. S3, to share them: docs/pipeline.md).
"""
ROOT = "${storage.root}"
PLOT_OPTIONS = {"plot.csv": {"x": "mean_norm", "y": "model", "template": "bar_horizontal"}}


def _code_deps(record: Stage) -> list[str]:
    paths = set()
    for module in (*record.modules, "distac.pipeline.stages"):
        files = module_files(module)
        package = module.replace(".", "/")
        paths.add(package if len(files) > 1 or files[0].name == "__init__.py" else f"{package}.py")
    return sorted(paths)


def _upstream_deps(record: Stage, variant: str | None) -> list[str]:
    deps = []
    for dependency in record.upstream:
        if variant is not None and variant not in dependency.variants:
            continue
        upstream = stage(dependency.stage)
        if upstream.scope is Scope.TASK and record.scope is Scope.TASK:
            deps.append(f"{ROOT}/{upstream.folder}/${{item.name}}")
        elif upstream.scope is Scope.METHOD and record.scope is Scope.METHOD:
            deps.append(f"{ROOT}/{upstream.folder}/${{item.name}}/{variant}")
        else:
            deps.append(f"{ROOT}/{upstream.folder}")
    return deps


def _params(record: Stage) -> list[str]:
    keys = []
    for key in record.params:
        plain = key.split(".{")[0]  # 'tasks.{task}.finetune' → 'tasks': DVC reads a list as a whole
        if plain not in keys:
            keys.append(plain)
    return keys


def _body(record: Stage, variant: str | None) -> dict[str, Any]:
    command = ["distac stage", record.name]
    folder = f"{ROOT}/{record.folder}"
    if record.scope is Scope.TASK:
        command.append("--task '${item.name}'")
        folder += "/${item.name}"
    elif record.scope is Scope.METHOD:
        command.append(f"--method '${{item.name}}' --variant '{variant}'")
        folder += f"/${{item.name}}/{variant}"
    command.append("--params params.yaml --no-progress")
    body: dict[str, Any] = {"cmd": " ".join(command), "deps": _upstream_deps(record, variant) + _code_deps(record)}
    if record.params:
        body["params"] = _params(record)
    if not record.shown:
        body["outs"] = [folder]
        return body
    body["outs"] = [f"{folder}/{name}" for name in (*record.outputs, "_done.json") if name not in record.shown]
    body["metrics"] = [{f"{folder}/{name}": {"cache": False}} for name in record.shown if name.endswith(".json")]
    body["plots"] = [{f"{folder}/{name}": {**PLOT_OPTIONS.get(name, {}), "cache": False}}
                     for name in record.shown if not name.endswith(".json")]
    return body


def dvc_stages(params: PipelineParams) -> dict[str, Any]:
    """The ``stages:`` mapping of dvc.yaml for these params' merge variants."""
    out: dict[str, Any] = {}
    for record in STAGES:
        if record.scope is Scope.GLOBAL:
            out[record.name] = _body(record, None)
        elif record.scope is Scope.TASK:
            out[record.name] = {"foreach": "${tasks}", "do": _body(record, None)}
        else:
            for variant in params.merge.variants:
                out[f"{record.name}-{variant}"] = {"foreach": "${merge.methods}", "do": _body(record, variant)}
    return out


def dvc_yaml(params: PipelineParams) -> str:
    return HEADER + yaml.safe_dump({"stages": dvc_stages(params)}, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distac.pipeline.dvc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="pipeline params file (default: params.yaml)")
    args = parser.parse_args(argv)
    sys.stdout.write(dvc_yaml(load_params(args.params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
