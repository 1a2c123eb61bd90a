"""Safety and failure behaviour (issue: reliability): outputs never destroy what a command did not create,
names from params never reach a shell or a path unescaped, and params are strictly typed."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import yaml

from distac.config import ConfigError, load_params, parse_params

MINIMAL = {"tasks": [{"name": "cola"}, {"name": "mrpc"}], "merge": {"methods": [{"name": "task_arithmetic"}]}}


def params_with(**sections) -> dict:
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


def config_error(data) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_params(data)
    return str(caught.value)


# --------------------------------------------------------------------------------------------- task names


@pytest.mark.parametrize("name", ["imagefolder:x;touch MARKER;", "imagefolder:../../outside", "vision:../x",
                                  "a b", "$(touch MARKER)", "../up", "x/y", "cola;ls", "Reviews", ""])
def test_task_names_that_could_reach_a_shell_or_a_path_are_refused(name):
    message = config_error(params_with(tasks=[{"name": "cola"}, {"name": name}]))
    assert "tasks.1.name" in message


@pytest.mark.parametrize("name, canonical", [("SST-2", "sst2"), ("CoLA", "cola"), ("vision:MNIST", "vision:MNIST"),
                                             ("imagefolder:resisc45", "imagefolder:resisc45")])
def test_task_names_that_are_safe_are_accepted(name, canonical):
    assert parse_params(params_with(tasks=[{"name": "rte"}, {"name": name}])).task_names[1] == canonical


# --------------------------------------------------------------------------------------------- strict types


@pytest.mark.parametrize("sections, field", [
    ({"finetune": {"steps": True}}, "finetune.steps"),
    ({"finetune": {"steps": "4"}}, "finetune.steps"),
    ({"finetune": {"lr": float("inf")}}, "finetune.lr"),
    ({"finetune": {"lr": float("nan")}}, "finetune.lr"),
    ({"merge": {"methods": [{"name": "ties"}], "alpha_grid": [float("inf")]}}, "merge.alpha_grid.0"),
    ({"conditioning": {"track_accuracy": "yes"}}, "conditioning.track_accuracy"),
    ({"mlflow": {"tracking_uri": "ftp://host/store"}}, "mlflow.tracking_uri"),
])
def test_params_are_strictly_typed_and_finite(sections, field):
    assert field in config_error(params_with(**sections))


def test_an_integer_is_a_float_and_yaml_exponents_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_with()) + "finetune: {lr: 1e-5, weight_decay: 0}\n")
    params = load_params(path)
    assert params.finetune.lr == 1e-5 and params.finetune.weight_decay == 0.0


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "file:///tmp/mlruns", "mlruns", "http://127.0.0.1:5000",
                                 "postgresql+psycopg2://u@h/db"])
def test_known_tracking_uris_are_accepted(uri):
    assert parse_params(params_with(mlflow={"tracking_uri": uri})).mlflow.tracking_uri == uri


def test_dvc_yaml_quotes_every_interpolation():
    """dvc.yaml's commands run in a shell: every ${...} inside a cmd is single-quoted."""
    with open(os.path.join(os.path.dirname(__file__), "..", "dvc.yaml"), encoding="utf-8") as handle:
        stages = yaml.safe_load(handle)["stages"]
    commands = [(stage.get("do") or stage)["cmd"] for stage in stages.values()]
    for command in commands:
        unquoted = command.replace("'${", "").split("${")
        assert len(unquoted) == 1, f"unquoted interpolation in {command!r}"
