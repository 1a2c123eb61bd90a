"""Run the paper benchmark's steps side by side (``python -m benchmarks.paper_repro all --jobs N``).

Every (seed, setting) flow, the κ sweep, the convergence run and the calibration study is one job: a
``benchmarks.paper_repro`` subprocess with a ``PREFECT_HOME`` of its own (temporary Prefect servers sharing
one SQLite database lock each other out). A job starts once the runs it reads have finished, at most N at
a time, the one heading the longest chain of work first; the report is written when all are done. Each
job's output goes to ``<root>/logs/<job>.log``; this process prints one line per start and finish.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Minutes per job measured on a 2-core machine with three or four jobs side by side (session 15's run,
# benchmarks/results/paper/timings.json); only the order in which ready jobs start depends on them.
MINUTES = {"original": 40, "norm_mismatch": 45, "low_confidence": 60, "low_confidence_sharp": 8,
           "surrogate_data": 10, "sweep": 40, "convergence": 5, "calibration": 5}


@dataclass
class Job:
    name: str
    command: list[str]
    after: list[str] = field(default_factory=list)
    minutes: float = 10


def step(*args: str) -> list[str]:
    """The command that runs one step of the benchmark."""
    return [sys.executable, "-m", "benchmarks.paper_repro", *args]


def flow_job(seed: int, setting: str) -> str:
    return f"seed{seed}-{setting}"


def plan_jobs(plan: dict[str, Any], settings_for) -> list[Job]:
    """Every job of the benchmark (a flow per seed and setting, then the studies), each naming the jobs whose
    runs it reads, in the order they are preferred when several could start: the longest chain first."""
    first = plan["seeds"][0]
    flows: list[Job] = []
    for seed in plan["seeds"]:
        for setting in settings_for(plan, seed):
            spec = plan["settings"][setting]
            reads = [] if setting == "original" else ["original", *spec.get("reuse", [])]
            flows.append(Job(flow_job(seed, setting), step("run", "--seed", str(seed), "--setting", setting),
                             [flow_job(seed, name) for name in reads], MINUTES.get(setting, 10)))
    sources = {source["setting"] for source in plan["kappa_sweep"]["sources"]}
    studies = [
        Job("kappa-sweep", step("sweep"), [flow_job(first, name) for name in sorted(sources)], MINUTES["sweep"]),
        Job("convergence", step("convergence"),
            [flow_job(first, source["setting"]) for source in plan["convergence"]["sources"]], MINUTES["convergence"]),
        Job("calibration", step("calibration"), [flow_job(first, "original"), flow_job(first, "low_confidence")],
            MINUTES["calibration"]),
    ]
    jobs = flows + studies
    return sorted(jobs, key=lambda job: -_minutes_to_end(job, jobs))


def _minutes_to_end(job: Job, jobs: list[Job]) -> float:
    """The job's minutes plus the longest chain of jobs waiting for it: the longest chain starts first."""
    waiting = [other for other in jobs if job.name in other.after]
    return job.minutes + max((_minutes_to_end(other, jobs) for other in waiting), default=0)


def run_jobs(jobs: list[Job], width: int, root: Path, repo: Path, poll_seconds: float = 2.0) -> dict[str, float]:
    """Run ``jobs`` at most ``width`` at a time, each after the jobs it names; returns each one's seconds.
    Stops (and stops the running jobs) at the first failure."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    waiting, running, seconds = list(jobs), {}, {}
    started_all = time.perf_counter()
    try:
        while waiting or running:
            for job in [j for j in waiting if all(name in seconds for name in j.after)][:width - len(running)]:
                waiting.remove(job)
                running[job.name] = (_start(job, root, repo, logs), time.perf_counter())
                _say(started_all, f"started {job.name}")
            time.sleep(poll_seconds)
            for name, (process, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                if process.returncode != 0:
                    raise RuntimeError(f"{name} failed (exit {process.returncode}); see {logs / name}.log")
                seconds[name] = round(time.perf_counter() - started, 1)
                _say(started_all, f"finished {name} in {seconds[name] / 60:.1f} min")
            if waiting and not running and not any(all(n in seconds for n in j.after) for j in waiting):
                raise RuntimeError(f"jobs wait for jobs that do not exist: {[j.name for j in waiting]}")
    finally:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.wait(timeout=60)
    return seconds


def _start(job: Job, root: Path, repo: Path, logs: Path) -> subprocess.Popen:
    home = root / ".prefect-home" / job.name
    home.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{job.name}.log", "w") as log:
        return subprocess.Popen(job.command, cwd=repo,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PREFECT_HOME": str(home)})


def _say(since: float, message: str) -> None:
    print(f"[{(time.perf_counter() - since) / 60:6.1f} min] {message}", flush=True)
