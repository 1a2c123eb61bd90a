"""The paper-reproduction benchmark's plan: every (setting, seed) derives valid pipeline params, and its
steps run side by side in the order their inputs allow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.paper_repro import load_plan, loaded_params, setting_root, settings_for

PLAN = load_plan()


@pytest.mark.parametrize("setting", list(PLAN["settings"]))
@pytest.mark.parametrize("seed", PLAN["seeds"])
def test_every_setting_and_seed_gives_valid_params(setting, seed):
    params = loaded_params(PLAN, setting, seed)
    spec = PLAN["settings"][setting]
    assert params.storage.root == setting_root(PLAN, setting, seed)
    assert params.data.seed == params.finetune.seed == params.conditioning.seed == seed
    assert params.conditioning.tasks == spec["conditioning_tasks"]
    for task in params.task_names:
        for field, value in spec["tasks"].get(task, {}).items():
            assert getattr(params.recipe(task), field) == value
    if setting == "original":
        assert params.merge.variants == ["as-is"] and params.storage.reuse == []
    else:
        assert params.merge.variants == ["as-is", "distac"]
        assert params.storage.reuse == [setting_root(PLAN, name, seed) for name in ["original", *spec.get("reuse", [])]]
    for task, unlabeled in spec.get("unlabeled", {}).items():
        assert params.task(task).unlabeled.from_task == unlabeled["from_task"]


def test_settings_differ_from_the_original_only_in_their_tasks():
    original = loaded_params(PLAN, "original", 0)
    for setting, spec in PLAN["settings"].items():
        params = loaded_params(PLAN, setting, 0)
        changed = {t for t in params.task_names if params.recipe(t) != original.recipe(t)}
        assert changed == set(spec["tasks"])


def test_later_seeds_repeat_the_headline_methods_of_their_settings():
    first, *later = PLAN["seeds"]
    assert settings_for(PLAN, first) == list(PLAN["settings"])
    for seed in later:
        assert set(settings_for(PLAN, seed)) <= set(PLAN["settings"]) and "original" in settings_for(PLAN, seed)
        assert loaded_params(PLAN, "original", seed).method_names == PLAN["headline_methods"]
    assert len(loaded_params(PLAN, "original", first).method_names) == 8


def test_headline_averages_each_method_over_the_seeds_that_ran_it():
    from benchmarks.paper_report import _cell, headline

    runs = {"0": {"original": {"rows": [
                {"method": "ties", "variant": "as-is", "mean_norm": 90.0}]},
                  "norm_mismatch": {"rows": [{"method": "ties", "variant": "as-is", "mean_norm": 70.0},
                                             {"method": "ties", "variant": "distac", "mean_norm": 88.0}]}},
            "1": {"original": {"rows": [{"method": "ties", "variant": "as-is", "mean_norm": 92.0}]}}}
    table = {row["method"]: row for row in headline(PLAN, runs)}
    assert table["ties"]["original/as-is"] == {"mean": 91.0, "seeds": [90.0, 92.0]}
    assert table["ties"]["norm_mismatch/distac"] == {"mean": 88.0, "seeds": [88.0]}
    assert table["emr"]["low_confidence/distac"] == {"mean": None, "seeds": []}
    assert "original/distac" not in table["ties"]  # nothing is conditioned in the original setting
    assert _cell(table["ties"]["original/as-is"]) == "91.0 ± 1.0"
    assert _cell(table["ties"]["norm_mismatch/distac"]) == "88.0"
    assert _cell(table["emr"]["low_confidence/distac"]) == "–"


def test_goal_table_gives_each_seeds_cost_and_recovery_and_the_task_that_lost_most():
    from benchmarks.paper_report import goal_markdown

    def row(method: str, variant: str, cola: float, sst2: float) -> dict:
        return {"method": method, "variant": variant, "cola_norm": cola, "mrpc_norm": 100.0, "sst2_norm": sst2,
                "mean_norm": (cola + 100.0 + sst2) / 3}

    runs = {"0": {"original": {"rows": [row("ties", "as-is", 96.0, 99.0)]},
                  "norm_mismatch": {"rows": [row("ties", "as-is", 90.0, 87.0), row("ties", "distac", 95.0, 93.0)]}},
            "1": {"original": {"rows": [row("ties", "as-is", 99.0, 96.0)]},
                  "norm_mismatch": {"rows": [row("ties", "as-is", 93.0, 90.0), row("ties", "distac", 93.0, 96.0)]}}}
    plan = {**PLAN, "base_params": {**PLAN["base_params"], "tasks": [{"name": t} for t in ("cola", "mrpc", "sst2")]}}
    ties = next(line for line in goal_markdown(plan, runs).splitlines() if line.startswith("| ties |"))
    cells = [c.strip() for c in ties.strip("|").split("|")]
    # norm mismatch: as-is −6.0 / −4.0, DisTaC −2.3 / −2.0; the largest per-task loss: sst2 −6 then cola −6
    assert cells[1:4] == ["-6.0 / -4.0", "-2.3 / -2.0", "sst2 -6.0; cola -6.0"]
    assert set(cells[4:]) == {"–"}  # the other settings have not run


def test_a_source_recipe_is_measured_on_every_held_out_example():
    """benchmarks/source_recipe.py scores a recipe on the whole validation and test splits (855 and 1043 CoLA
    examples), not the benchmark's 250-example subsamples, against each split's majority-class rate."""
    from benchmarks.source_recipe import measure

    rows = measure("cola", lr=5e-5, steps=2, weight_decay=0.0, setting="original", seed=0)
    assert [(row["split"], row["examples"]) for row in rows] == [("validation", 855), ("test", 1043)]
    assert rows[1]["majority"] == 69.1  # 721 of 1043 acceptable sentences
    assert all(0 <= row["accuracy"] <= 100 and -1 <= row["mcc"] <= 1 for row in rows)


def _event_job(name: str, events: Path, after: list[str] = (), seconds: float = 0.2, exit_code: int = 0):
    """A job that appends 'start <name>' and 'end <name>' to ``events`` around a short sleep."""
    from benchmarks.paper_schedule import Job

    script = ("import sys, time\n"
              "def say(word): open(sys.argv[1], 'a').write(f'{word} {sys.argv[2]}\\n')\n"
              "say('start'); time.sleep(float(sys.argv[3])); say('end'); sys.exit(int(sys.argv[4]))")
    return Job(name, [sys.executable, "-c", script, str(events), name, str(seconds), str(exit_code)], list(after))


def test_side_by_side_jobs_start_after_what_they_read_and_never_exceed_the_width(tmp_path):
    from benchmarks.paper_schedule import run_jobs

    events = tmp_path / "events"
    jobs = [_event_job("e", events, after=["d"]), _event_job("d", events, after=["a", "b"]),  # listed first
            _event_job("a", events), _event_job("b", events), _event_job("c", events)]
    seconds = run_jobs(jobs, 2, tmp_path / "root", tmp_path, poll_seconds=0.05)
    assert sorted(seconds) == ["a", "b", "c", "d", "e"]
    running, ended = set(), set()
    for word, name in (line.split() for line in events.read_text().splitlines()):
        if word == "start":
            assert set(next(j.after for j in jobs if j.name == name)) <= ended
            running.add(name)
            assert len(running) <= 2
        else:
            running.remove(name)
            ended.add(name)
    assert ended == set(seconds)
    assert (tmp_path / "root" / "logs" / "e.log").exists() and (tmp_path / "root" / ".prefect-home" / "e").is_dir()


def test_side_by_side_jobs_stop_at_the_first_failure(tmp_path):
    from benchmarks.paper_schedule import run_jobs

    events = tmp_path / "events"
    jobs = [_event_job("slow", events, seconds=60), _event_job("broken", events, exit_code=3),
            _event_job("later", events, after=["broken"])]
    with pytest.raises(RuntimeError, match="broken failed \\(exit 3\\)"):
        run_jobs(jobs, 2, tmp_path / "root", tmp_path, poll_seconds=0.05)
    lines = set(events.read_text().splitlines())
    assert {"start broken", "end broken"} <= lines  # 'slow' may not have got as far as starting: it was stopped
    assert "end slow" not in lines and "start later" not in lines


def test_the_benchmark_jobs_read_what_their_settings_reuse():
    from benchmarks.paper_schedule import plan_jobs

    jobs = {job.name: job for job in plan_jobs(load_plan(), settings_for)}
    assert jobs["seed1-low_confidence_sharp"].after == ["seed1-original", "seed1-low_confidence"]
    assert jobs["kappa-sweep"].after == ["seed0-norm_mismatch"]
    assert list(jobs)[:2] == ["seed0-original", "seed1-original"]  # the longest chains start first


def test_a_kappa_sweep_is_reused_only_on_the_source_it_was_measured_on(monkeypatch):
    """The sweep's cache names its source's fingerprint: a re-trained source (new recipe, data or code)
    is swept again instead of reporting the old model's numbers."""
    from benchmarks import paper_repro

    source = PLAN["kappa_sweep"]["sources"][0]
    params = loaded_params(PLAN, source["setting"], 0)
    measured = {"setting": source["setting"], "task": source["task"], "seed": 0,
                "rows": [{"kappa": 0.0}, *({"kappa": k} for k in PLAN["kappa_sweep"]["kappas"])],
                "source_fingerprint": paper_repro.source_fingerprint(params, source["task"]),
                "conditioning": params.conditioning.model_dump(mode="json")}
    monkeypatch.setattr(paper_repro, "kappa_sweep", lambda *args, **kwargs: "swept again")
    assert paper_repro.kappa_sweeps(PLAN, [measured]) == [measured]
    assert paper_repro.kappa_sweeps(PLAN, [{**measured, "source_fingerprint": "another model"}]) == ["swept again"]
    assert paper_repro.kappa_sweeps(PLAN, [{k: v for k, v in measured.items() if k != "conditioning"}]) == ["swept again"]
