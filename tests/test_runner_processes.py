"""The runner's processes behave when several runs share a machine or a run is killed: side-by-side runs
create one MLflow store and experiment between them, and a stage child exits when its runner is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent

SETUP_EXPERIMENT = """
import sys
from distac.config import MlflowParams
from tasks.tracking import setup_experiment
print(setup_experiment(MlflowParams(tracking_uri=sys.argv[1], experiment="side-by-side")).experiment_id)
"""

STAGE_CHILD = "import os, time; from distac.cli.stage import exit_with_parent; exit_with_parent(os.getppid()); time.sleep(120)"
RUNNER = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {STAGE_CHILD!r}])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_runs_started_side_by_side_share_one_new_store_and_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    runs = [subprocess.Popen([sys.executable, "-c", SETUP_EXPERIMENT, uri], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outputs = [run.communicate(timeout=180) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stage_child_exits_when_its_runner_is_killed():
    runner = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=REPO, text=True, stdout=subprocess.PIPE)
    child = int(runner.stdout.readline())
    try:
        time.sleep(3)  # the child has imported distac and is watching its parent
        assert not _gone(child)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        deadline = time.monotonic() + 30
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(child)
    finally:
        if not _gone(child):
            psutil.Process(child).kill()
