"""The pipeline layer on the tiny profile: one stage table drives `distac stage`, the Prefect tasks and
dvc.yaml; stages refuse missing or stale upstream stages; fingerprints cover the code; one run per storage
root; bounded waits and clear errors for MLflow; cleanup after killed runs; live per-step metrics from
stage children; Ctrl-C stops a run within its deadline. Real components throughout, no fixed sleeps."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest
import yaml

from distac.cli import build_parser
from distac.pipeline import RunStore, StageRef, UpstreamError, is_done, load_params, ref, run_stage
from distac.pipeline.dvc import dvc_yaml
from distac.pipeline.lock import RootLock, StorageBusyError
from distac.pipeline.process import STAGE_TMP_PREFIX, remove_stale_tmp_dirs
from distac.pipeline.store import redact
from distac.pipeline.table import STAGES, Plan, code_hash

REPO = Path(__file__).resolve().parent.parent
TASKS = [{"name": "cola"}, {"name": "mrpc", "finetune": {"lr": 1.0e-2}}]
MERGE = {"alpha_grid": [0.5, 1.0], "methods": [{"name": "task_arithmetic", "alpha": "search"}]}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------------------------- one table


def test_the_cli_the_prefect_tasks_and_dvc_yaml_agree_with_the_table():
    from tasks import TASKS as PREFECT_TASKS

    names = [s.name for s in STAGES]
    stage_parser = build_parser()._subparsers._group_actions[0].choices["stage"]
    assert next(a for a in stage_parser._actions if a.dest == "name").choices == names
    assert list(PREFECT_TASKS) == names
    assert all(t.persist_result is False for t in PREFECT_TASKS.values())  # nothing pickled and read back
    params = load_params(REPO / "params.yaml")
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(params), \
        "dvc.yaml is stale: python -m distac.pipeline.dvc --params params.yaml > dvc.yaml"
    generated = yaml.safe_load(dvc_yaml(params))["stages"]
    assert {n.split("-")[0] for n in generated} == set(names)
    as_is_only = params.model_copy(update={"merge": params.merge.model_copy(update={"variants": ["as-is"]})})
    assert not [n for n in yaml.safe_load(dvc_yaml(as_is_only))["stages"] if n.endswith("-distac")]


def test_stage_instances_stay_under_the_root():
    params = load_params(REPO / "params.yaml")
    assert RunStore.of(params).dir(ref(params, "merge", method="ties", variant="distac")) == "runs/merge/ties/distac"
    with pytest.raises(Exception, match="needs a task"):
        ref(params, "finetune")
    with pytest.raises(Exception, match="no task"):
        ref(params, "report", task="cola")


def test_a_code_change_refingerprints_exactly_the_stages_that_use_it(tmp_path):
    shutil.copytree(REPO / "distac", tmp_path / "distac", ignore=shutil.ignore_patterns("__pycache__"))
    show = ("from distac.pipeline.table import STAGES, code_hash; "
            "print(' '.join(code_hash(s.name) for s in STAGES))")

    def hashes() -> list[str]:
        done = subprocess.run([sys.executable, "-c", show], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    before = hashes()
    with open(tmp_path / "distac" / "merging" / "ties.py", "a", encoding="utf-8") as handle:
        handle.write("\n# a code change\n")
    after = hashes()
    changed = {s.name for s, old, new in zip(STAGES, before, after) if old != new}
    assert changed == {s.name for s in STAGES if "distac.merging" in s.modules}
    assert {"merge", "evaluate"} <= changed and "finetune" not in changed
    assert before[0] == code_hash(STAGES[0].name)


# --------------------------------------------------------------------------------------------- upstream


@pytest.fixture(scope="module")
def finished(tmp_path_factory, make_tiny_params):
    """The tiny pipeline run stage by stage with ``run_stage`` (no Prefect)."""
    directory = tmp_path_factory.mktemp("stages")
    path = make_tiny_params(directory, tasks=TASKS, merge=MERGE)
    params = load_params(path)
    plan = Plan.of(params)
    for made in plan:
        run_stage(params, made, plan=plan)
    return directory, path, params


def test_a_stage_refuses_a_missing_upstream_stage(make_tiny_params, tmp_path):
    params = load_params(make_tiny_params(tmp_path, tasks=TASKS, merge=MERGE))
    with pytest.raises(UpstreamError, match=r"merge/task_arithmetic/as-is needs pretrained, which has not finished"):
        run_stage(params, ref(params, "merge", method="task_arithmetic"))


def test_a_stage_refuses_stale_upstream_outputs_and_is_never_up_to_date_after_them(finished, tmp_path):
    directory, path, params = finished
    root = tmp_path / "storage"
    shutil.copytree(params.storage.root, root)
    changed = params.model_copy(update={
        "conditioning": params.conditioning.model_copy(update={"steps": 2}),
        "storage": params.storage.model_copy(update={"root": str(root)})})
    # As if a run was killed during condition/<task> after this params change: one task is redone, not both.
    run_stage(changed, ref(changed, "condition", task="cola"))
    merge = ref(changed, "merge", method="task_arithmetic", variant="distac")
    assert not is_done(changed, merge)
    with pytest.raises(UpstreamError, match=r"needs condition/mrpc, whose outputs .* are stale"):
        run_stage(changed, merge)
    manifest = RunStore.of(changed).manifest(ref(changed, "condition", task="cola"))
    assert set(manifest["upstream"]) == {"pretrained", "finetune/cola", "extract/cola", "diagnose"}


def test_stage_cli_names_the_upstream_stage(finished, tmp_path):
    directory, path, params = finished
    data = yaml.safe_load(Path(path).read_text())
    data["storage"]["root"] = str(tmp_path / "empty")
    fresh = tmp_path / "params.yaml"
    fresh.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "distac", "stage", "extract", "--task", "cola", "--params",
                           str(fresh)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "extract/cola needs pretrained" in done.stderr and "distac stage pretrained" in done.stderr


# --------------------------------------------------------------------------------------------- one run per root


def test_a_held_root_is_busy_and_a_dead_holders_lock_is_broken(tmp_path):
    root = str(tmp_path / "root")
    with RootLock(root):
        code = ("import sys; from distac.pipeline.lock import RootLock; RootLock(sys.argv[1]).acquire()")
        done = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert f"storage root {root} is busy" in done.stderr and f"pid {os.getpid()}" in done.stderr
    lock_file = Path(root) / ".distac.lock"
    assert not lock_file.exists()
    lock_file.write_text(f'{{"pid": {dead_pid()}, "host": "{socket.gethostname()}", "started": "x", "token": "t"}}')
    with RootLock(root) as lock:
        assert lock.holder()["pid"] == os.getpid()


def test_a_second_flow_on_the_same_root_says_it_is_busy(make_tiny_params, tmp_path):
    from flows.pipeline import distac_pipeline

    path = make_tiny_params(tmp_path, tasks=TASKS, merge=MERGE)
    with RootLock(load_params(path).storage.root):
        code = "import sys; from flows.run import run; sys.exit(run(sys.argv[1]))"
        done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=600,
                              cwd=REPO)
    assert done.returncode == 2 and "is busy" in done.stderr
    with pytest.raises(StorageBusyError):
        with RootLock(load_params(path).storage.root):
            distac_pipeline(path)


# --------------------------------------------------------------------------------------------- MLflow, cleanup


def test_a_held_mlflow_store_lock_times_out_with_a_clear_error(tmp_path):
    from filelock import FileLock

    from distac.pipeline.params import MlflowParams
    from tasks.tracking import TrackingError, setup_experiment

    database = tmp_path / "mlflow.db"
    with FileLock(f"{database}.lock"):  # another holder: setup_experiment waits on its own file handle
        result: list[BaseException] = []

        def try_it():
            try:
                setup_experiment(MlflowParams(tracking_uri=f"sqlite:///{database}"), lock_timeout=0.5)
            except BaseException as exc:  # noqa: BLE001
                result.append(exc)

        worker = threading.Thread(target=try_it)
        worker.start()
        worker.join(timeout=120)
    assert result and isinstance(result[0], TrackingError)
    assert "is locked by another process" in str(result[0]) and "mlflow.db.lock" in str(result[0])


def test_an_unanswering_mlflow_server_is_a_bounded_clear_error(monkeypatch):
    from distac.pipeline.params import MlflowParams
    from tasks.tracking import TrackingError, setup_experiment

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections, never answers
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://alice:s3cret@127.0.0.1:{server.getsockname()[1]}"
    try:
        with pytest.raises(TrackingError) as caught:
            setup_experiment(MlflowParams(tracking_uri=uri))
    finally:
        server.close()
    assert "127.0.0.1" in str(caught.value) and "s3cret" not in str(caught.value)


def test_credentials_never_reach_logged_params():
    from tasks.tracking import flatten

    flat = flatten({"mlflow": {"tracking_uri": "postgresql://bob:pw@db/mlflow"},
                    "storage": {"root": "s3://KEY:SECRET@bucket/runs", "reuse": ["s3://a:b@x/y"]}})
    assert "pw" not in flat["mlflow.tracking_uri"] and "SECRET" not in flat["storage.root"]
    assert "a:b" not in flat["storage.reuse"]
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


def test_runs_and_temporary_directories_of_a_killed_run_are_cleaned_up(tmp_path):
    from mlflow.tracking import MlflowClient

    from distac.pipeline.params import MlflowParams
    from tasks.tracking import HOST_TAG, mark_stale_runs, setup_experiment

    tracking = setup_experiment(MlflowParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="x"))
    client = MlflowClient(tracking.tracking_uri)
    killed = client.create_run(tracking.experiment_id, tags={HOST_TAG: f"{socket.gethostname()}:{dead_pid()}"})
    alive = client.create_run(tracking.experiment_id, tags={HOST_TAG: f"{socket.gethostname()}:{os.getpid()}"})
    assert mark_stale_runs(tracking) == 1
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"

    left = tempfile.mkdtemp(prefix=f"{STAGE_TMP_PREFIX}{dead_pid()}-")
    mine = tempfile.mkdtemp(prefix=f"{STAGE_TMP_PREFIX}{os.getpid()}-")
    assert left in remove_stale_tmp_dirs()
    assert not os.path.exists(left) and os.path.exists(mine)
    shutil.rmtree(mine)


def test_permanent_storage_errors_are_not_retried():
    from botocore.exceptions import ClientError

    from tasks.stage_tasks import is_transient

    assert not is_transient(OSError(errno.EROFS, "Read-only file system"))
    assert not is_transient(OSError(errno.EACCES, "Permission denied"))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                                        "PutObject"))
    assert is_transient(ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                                    "PutObject"))
    assert is_transient(OSError(errno.ECONNRESET, "Connection reset"))


# --------------------------------------------------------------------------------------------- progress, Ctrl-C


def test_a_stage_child_streams_its_metrics_while_it_runs(finished, tmp_path):
    from tasks.stage_tasks import run_in_child

    directory, path, params = finished
    root = tmp_path / "storage"
    shutil.copytree(params.storage.root, root)
    params = params.model_copy(update={"storage": params.storage.model_copy(update={"root": str(root)})})
    made = ref(params, "finetune", task="cola")
    seen = []

    def on_metrics(step, metrics):  # the stage has not finished while its steps arrive
        seen.append((step, sorted(metrics), RunStore.of(params).manifest(made) is None))

    params = params.model_copy(update={"finetune": params.finetune.model_copy(update={"seed": 1})})  # not done yet
    result = run_in_child(params, made, on_metrics)
    steps = params.recipe("cola").steps
    assert [s for s, _, _ in seen] == list(range(1, steps + 1))
    assert all(keys == ["loss", "lr"] and unfinished for _, keys, unfinished in seen)
    assert not result.skipped and result.key == "finetune/cola"


def test_ctrl_c_stops_the_run_marks_its_runs_killed_and_leaves_no_process(make_tiny_params, tmp_path):
    from mlflow.tracking import MlflowClient

    path = make_tiny_params(tmp_path, tasks=TASKS, merge=MERGE, finetune={"steps": 400})
    runner = subprocess.Popen([sys.executable, "-m", "distac", "run", "--params", path], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in runner.stdout:  # wait until a fine-tuning child reports its steps
        lines.append(line)
        if "finetune/" in line and " step " in line:
            break
    assert runner.poll() is None, "".join(lines)[-3000:]
    processes = psutil.Process(runner.pid).children(recursive=True)
    assert processes
    runner.send_signal(signal.SIGINT)
    output = runner.communicate(timeout=120)[0]
    assert runner.returncode == 130, output[-3000:]
    gone, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive
    params = load_params(path)
    assert not (Path(params.storage.root) / ".distac.lock").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses and "RUNNING" not in statuses.values() and "KILLED" in statuses.values()
    assert "Traceback" not in output
    flow_runs = re.findall(r"Beginning (?:sub)?flow run '([^']+)'", "".join(lines) + output)
    with sqlite3.connect(Path(os.environ["PREFECT_HOME"]) / "prefect.db") as prefect_db:
        states = prefect_db.execute(f"SELECT state_type FROM flow_run WHERE name IN ({','.join('?' * len(flow_runs))})",
                                    flow_runs).fetchall()
    assert len(flow_runs) == 2 and states == [("CANCELLED",)] * 2  # the pipeline and its stages sub-flow


def test_conditioned_sources_benchmark_matches_the_runs_own_measurements(finished):
    """benchmarks/conditioned_sources.py re-measures a finished run's conditioned tasks: on the run's own
    subsample it reproduces the pipeline's numbers exactly; on every held-out example it sees more data."""
    from benchmarks.conditioned_sources import format_table, measure

    _, path, params = finished
    store = RunStore.of(params)
    rows = measure(str(path))
    assert list(rows) == store.conditioned_tasks() and rows
    for task, measured in rows.items():
        source, student = measured["source"], measured["conditioned"]
        assert source["subsample"]["validation"][0] == pytest.approx(
            100 * store.finetune_metrics(task)["validation_accuracy"], abs=1e-4)
        assert student["subsample"]["validation"][0] == pytest.approx(
            100 * store.condition_summary(task)["validation_accuracy"], abs=1e-4)
        for split in ("validation", "test"):
            assert student["all"][split][1] >= student["subsample"][split][1] == source["subsample"][split][1]
    assert format_table(rows).count("| pooled |") == 2 * len(rows)


# --------------------------------------------------------------------------------------------- report, variants, reuse


def _on_root(params, root: Path, **updates):
    """``params`` on a copy of its storage root at ``root``, with whole sections replaced by ``updates``."""
    shutil.copytree(params.storage.root, root)
    storage = params.storage.model_copy(update={"root": str(root)})
    return params.model_copy(update={"storage": storage, **updates})


def test_the_report_shows_the_worst_tasks_normalized_accuracy(finished):
    import csv
    import json

    _, _, params = finished
    store = RunStore.of(params)
    rows = list(csv.DictReader(open(store.report_file("results.csv"), encoding="utf-8")))
    assert [r["variant"] for r in rows] == ["fine-tuned", "as-is", "distac"]
    for row in rows:
        worst = min(float(row[f"{t}_norm"]) for t in params.task_names)
        assert float(row["worst_norm"]) == pytest.approx(worst, abs=1e-3)
    header = Path(store.report_file("results.md")).read_text().splitlines()[0]
    assert header.endswith("| Avg. abs. | Avg. norm. | Worst norm. |")
    metrics = json.loads(Path(store.report_file("metrics.json")).read_text())
    assert metrics["task_arithmetic/as-is"]["worst_norm"] == pytest.approx(float(rows[1]["worst_norm"]), abs=0.01)


def test_nothing_conditioned_computes_and_reports_no_distac_variant(finished, tmp_path, caplog):
    import logging

    _, _, params = finished
    lenient = params.diagnosis.model_copy(update={"norm_ratio": 1.0e6, "min_scaled_confidence": 1.0e-6})
    params = _on_root(params, tmp_path / "storage", diagnosis=lenient)  # tasks: auto, nothing flagged
    caplog.set_level(logging.INFO, logger="distac")
    plan = Plan.of(params)
    ran = {made.key for made in plan if not run_stage(params, made, plan=plan).skipped}
    store = RunStore.of(params)
    assert store.conditioned_tasks() == []
    assert ran == {"diagnose", "condition/cola", "condition/mrpc", "merge/task_arithmetic/distac",
                   "evaluate/task_arithmetic/distac", "report"}  # the as-is merge is the finished one
    merged = Path(store.merged_uri("task_arithmetic", "distac"))
    assert [p.name for p in merged.iterdir()] == ["merge.json"]  # the earlier DisTaC merge is gone, none made
    assert store.identical_to("task_arithmetic", "distac") == "as-is"
    assert store.evaluation("task_arithmetic", "distac") == {"method": "task_arithmetic", "variant": "distac",
                                                              "identical_to": "as-is"}
    assert store.merged("task_arithmetic", "distac").vector.norm() == \
        store.merged("task_arithmetic", "as-is").vector.norm()
    report = store.manifest(StageRef("report"))["summary"]
    assert "| distac |" not in report["table"] and "DisTaC conditioned no task" in report["table"]
    assert list(report["metrics"]) == ["individual/fine-tuned", "task_arithmetic/as-is"]
    assert "distac" not in Path(store.report_file("results.csv")).read_text()
    assert "merge/task_arithmetic/distac: DisTaC conditioned no task" in caplog.text


def test_a_baseline_with_nothing_to_condition_merges_as_is_only():
    from helpers import params_error, params_with

    from distac.pipeline.params import parse_params

    baseline = parse_params(params_with(conditioning={"tasks": []}))
    assert baseline.merge.variants == ["as-is"]
    assert [r.key for r in Plan.of(baseline) if r.variant] == ["merge/task_arithmetic/as-is",
                                                               "evaluate/task_arithmetic/as-is"]
    assert "'distac' merges the same vectors as 'as-is'" in params_error(params_with(
        conditioning={"tasks": []}, merge={"methods": [{"name": "ties"}], "variants": ["as-is", "distac"]}))
    assert parse_params(params_with()).merge.variants == ["as-is", "distac"]


def test_every_reused_stage_is_shown_with_its_root_also_from_a_stage_child(finished, tmp_path):
    import logging

    from flows.run import stage_summary
    from tasks.stage_tasks import run_in_child

    _, _, params = finished
    source = params.storage.root
    storage = params.storage.model_copy(update={"root": str(tmp_path / "storage"), "reuse": [source]})
    params = params.model_copy(update={"storage": storage})
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    library = logging.getLogger("distac")  # Prefect's logging set-up keeps it from the root logger
    library.addHandler(handler)
    level, library.level = library.level, logging.INFO
    try:
        pretrained = run_stage(params, ref(params, "pretrained"))  # in this process
        finetune = run_in_child(params, ref(params, "finetune", task="cola"))  # as the flow runs fine-tuning
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
    assert (pretrained.reused_from, finetune.reused_from) == (source, source)
    for key in ("pretrained", "finetune/cola"):  # the child's line is relayed from its events
        assert any(m.startswith(f"{key}: reused from {source}") for m in messages), messages
    summary = stage_summary([pretrained.to_dict(), finetune.to_dict(),
                             {"key": "report", "skipped": False, "reused_from": None}], 1.0)
    assert summary.splitlines() == ["1 stages ran, 2 were reused from other roots, 0 were up to date; wall time 1.0 s",
                                    f"  reused pretrained from {source}", f"  reused finetune/cola from {source}"]
