"""Safety and failure behaviour (issue: reliability): outputs never destroy what a command did not create,
names from params never reach a shell or a path unescaped, and params are strictly typed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
import yaml

from distac import io
from distac.cli import main
from distac.pipeline.params import load_params, parse_params
from distac.errors import OutputError
from distac.merging.streaming import merge_checkpoints
from helpers import params_error, params_with

# --------------------------------------------------------------------------------------------- task names


@pytest.mark.parametrize("name", ["imagefolder:x;touch MARKER;", "imagefolder:../../outside", "vision:../x",
                                  "a b", "$(touch MARKER)", "../up", "x/y", "cola;ls", "Reviews", ""])
def test_task_names_that_could_reach_a_shell_or_a_path_are_refused(name):
    message = params_error(params_with(tasks=[{"name": "cola"}, {"name": name}]))
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
    assert field in params_error(params_with(**sections))


def test_an_integer_is_a_float_and_yaml_exponents_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_with()) + "finetune: {lr: 1e-5, weight_decay: 0}\n")
    params = load_params(path)
    assert params.finetune.lr == 1e-5 and params.finetune.weight_decay == 0.0


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "file://{tmp}/mlruns", "mlruns", "http://127.0.0.1:5000",
                                 "postgresql+psycopg2://u@h/db"])
def test_known_tracking_uris_are_accepted(uri, tmp_path):
    uri = uri.format(tmp=tmp_path.as_posix())  # an absolute file URI, under this test's own directory
    assert parse_params(params_with(mlflow={"tracking_uri": uri})).mlflow.tracking_uri == uri


def test_dvc_yaml_quotes_every_interpolation():
    """dvc.yaml's commands run in a shell: every ${...} inside a cmd is single-quoted."""
    with open(os.path.join(os.path.dirname(__file__), "..", "dvc.yaml"), encoding="utf-8") as handle:
        stages = yaml.safe_load(handle)["stages"]
    commands = [(stage.get("do") or stage)["cmd"] for stage in stages.values()]
    for command in commands:
        unquoted = command.replace("'${", "").split("${")
        assert len(unquoted) == 1, f"unquoted interpolation in {command!r}"


# --------------------------------------------------------------------------------------------- outputs


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(6, 4, generator=generator), "layer.bias": torch.randn(6, generator=generator)}


@pytest.fixture
def project(tmp_path):
    """A user's project directory: two checkpoints, notes and data, all of which must survive."""
    root = tmp_path / "project"
    root.mkdir()
    io.save_state_dict(tiny_state(0), root / "pre.safetensors")
    io.save_state_dict(tiny_state(1), root / "ft_a.safetensors")
    io.save_state_dict(tiny_state(2), root / "ft_b.safetensors")
    (root / "notes.txt").write_text("my notes")
    (root / "data").mkdir()
    (root / "data" / "train.csv").write_text("text,label\nhi,1\n")
    return root


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def merge_args(root, out, *extra) -> list[str]:
    return ["merge", "--method", "task_arithmetic", "--pretrained", str(root / "pre.safetensors"),
            "--finetuned", str(root / "ft_a.safetensors"), str(root / "ft_b.safetensors"), "--out", str(out),
            "--no-progress", *extra]


def test_merge_refuses_an_out_that_contains_its_inputs_and_loses_nothing(project, capsys):
    before = snapshot(project)
    for extra in ((), ("--overwrite",)):
        assert main(merge_args(project, project, *extra)) == 2
        assert "is or contains the input" in capsys.readouterr().err
    assert snapshot(project) == before


def test_merge_refuses_a_foreign_non_empty_out_unless_told_to_overwrite(project, tmp_path, capsys):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("draft")
    assert main(merge_args(project, foreign)) == 2
    assert "not empty" in capsys.readouterr().err and (foreign / "paper.tex").read_text() == "draft"
    assert main(merge_args(project, foreign, "--overwrite")) == 0
    assert (foreign / "merge.json").exists() and not (foreign / "paper.tex").exists()


def test_merge_replaces_its_own_earlier_output(project, tmp_path):
    out = tmp_path / "merged"
    assert main(merge_args(project, out)) == 0
    first = snapshot(out)
    assert main(merge_args(project, out, "--alpha", "0.5")) == 0
    assert snapshot(out).keys() == first.keys() and snapshot(out) != first


def test_the_library_merge_guards_its_output_too(project):
    with pytest.raises(OutputError, match="is or contains the input"):
        merge_checkpoints("task_arithmetic", str(project / "pre.safetensors"),
                          [str(project / "ft_a.safetensors")], str(project), progress=False)


def test_extract_refuses_to_overwrite_its_input_file(project, capsys):
    before = snapshot(project)
    args = ["extract", "--pretrained", str(project / "pre.safetensors"), "--finetuned",
            str(project / "ft_a.safetensors"), "--out", str(project / "ft_a.safetensors")]
    assert main(args) == 2 and main([*args, "--overwrite"]) == 2
    assert "is or contains the input" in capsys.readouterr().err
    assert snapshot(project) == before


def test_extract_refuses_a_foreign_file_but_replaces_its_own_vector(project, tmp_path):
    args = ["extract", "--pretrained", str(project / "pre.safetensors"), "--finetuned",
            str(project / "ft_a.safetensors"), "--out"]
    assert main([*args, str(project / "notes.txt")]) == 2
    assert (project / "notes.txt").read_text() == "my notes"
    vector = tmp_path / "tau.safetensors"
    assert main([*args, str(vector)]) == 0 and main([*args, str(vector)]) == 0
    vector_dir = tmp_path / "tau"
    assert main([*args, str(vector_dir)]) == 0 and main([*args, str(vector_dir)]) == 0


def test_a_checkpoint_directory_write_never_deletes_foreign_files(tmp_path):
    target = tmp_path / "backbone"
    target.mkdir()
    (target / "README.md").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        io.save_state_dict(tiny_state(0), target)
    assert (target / "README.md").read_text() == "keep me"
    io.save_state_dict(tiny_state(0), target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]


# --------------------------------------------------------------------------------------------- S3 waits


@pytest.fixture
def silent_endpoint():
    """A TCP server that accepts connections and never answers: a hung S3 endpoint."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for connection in accepted:
        connection.close()


def refused_endpoint() -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


def run_merge_against(endpoint: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
           "AWS_DEFAULT_REGION": "us-east-1", "DISTAC_S3_TIMEOUT": "1", "DISTAC_S3_ATTEMPTS": "2"}
    command = [sys.executable, "-m", "distac", "merge", "--method", "task_arithmetic", "--pretrained",
               "s3://bucket/pre.safetensors", "--finetuned", "s3://bucket/ft.safetensors", "--out",
               str(tmp_path / "out"), "--no-progress"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_an_s3_endpoint_that_never_answers_gives_a_clear_error(silent_endpoint, tmp_path):
    done = run_merge_against(silent_endpoint, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "did not answer in time" in done.stderr and silent_endpoint in done.stderr
    assert "Traceback" not in done.stderr and "s3cr3t" not in done.stderr


def test_a_refused_s3_connection_gives_a_clear_error(tmp_path):
    endpoint = refused_endpoint()
    done = run_merge_against(endpoint, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "cannot connect to S3" in done.stderr and endpoint in done.stderr
    assert "Traceback" not in done.stderr


def test_credentials_never_appear_in_a_redacted_uri():
    assert io.redact("http://user:pa55@host:5000/x") == "http://host:5000/x"
    assert io.redact("postgresql://u:p@db/mlflow") == "postgresql://db/mlflow"
    assert io.redact("s3://bucket/key") == "s3://bucket/key"


# --------------------------------------------------------------------------------------------- killed runs


def spawn_orphan(command: list[str], env: dict[str, str]) -> int:
    """Start ``command`` in a grandchild whose parent exits at once, as a SIGKILLed runner leaves its
    temporary Prefect server; returns the grandchild's pid."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read_end)
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.write(write_end, str(child.pid).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(middle, 0)
    with os.fdopen(read_end) as handle:
        return int(handle.read())


def test_a_later_run_stops_the_prefect_server_a_killed_run_left_listening(tmp_path):
    from distac.pipeline.process import orphaned_prefect_servers, stop_orphaned_prefect_servers

    home = str(tmp_path / "prefect-home")
    server = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
              "--host", "127.0.0.1", "--port", "0"]
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT__SERVER_EPHEMERAL": "1"}
    orphan = spawn_orphan(server, env)
    other_home = spawn_orphan(server, {**env, "PREFECT_HOME": str(tmp_path / "someone-else")})
    own_child = subprocess.Popen(server, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):  # until the kernel has re-parented the orphans
            if orphan in orphaned_prefect_servers(home):
                break
            time.sleep(0.05)
        assert stop_orphaned_prefect_servers(home) == [orphan]
        for _ in range(200):
            try:
                if psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        assert own_child.poll() is None and psutil.pid_exists(other_home)
    finally:
        own_child.kill()
        own_child.wait()
        for pid in (orphan, other_home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
