"""The runner's processes behave when several runs share a machine or a run is killed: side-by-side runs
create one MLflow store and experiment between them, and a stage child exits when its runner is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent

SETUP_EXPERIMENT = """
import sys
from distac.pipeline.params import MlflowParams
from tasks.tracking import setup_experiment
print(setup_experiment(MlflowParams(tracking_uri=sys.argv[1], experiment="side-by-side")).experiment_id)
"""

# The child reports when it is armed; the runner relays that line, then waits to be killed.
STAGE_CHILD = ("import os, sys, time; from distac.pipeline.process import exit_with_parent; "
               "exit_with_parent(os.getppid()); print('armed', flush=True); time.sleep(600)")
RUNNER = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {STAGE_CHILD!r}], stdout=subprocess.PIPE, text=True)
print(child.pid, flush=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(600)
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
        assert runner.stdout.readline().strip() == "armed"  # the child watches its parent from here on
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=60)
        psutil.Process(child).wait(timeout=120)  # returns once the child is gone; raises if it lingers
    except psutil.NoSuchProcess:
        pass
    finally:
        if not _gone(child):
            psutil.Process(child).kill()
        runner.kill()


def test_the_death_signal_is_set_by_the_kernel_on_linux():
    from distac.pipeline.process import set_death_signal

    check = ("import ctypes, signal; from distac.pipeline.process import set_death_signal; "
             "assert set_death_signal(); value = ctypes.c_int(); libc = ctypes.CDLL(None); "
             "libc.prctl(2, ctypes.byref(value), 0, 0, 0); print(value.value)")
    if not sys.platform.startswith("linux"):
        assert set_death_signal() is False
        return
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == signal.SIGKILL
