"""Reproduce the paper's experiment at small scale, through the pipeline itself (issue 5).

Three settings (original, norm mismatch, low confidence; ``benchmarks/paper/settings.yaml``) run through the
Prefect flow once per seed, each logged to MLflow; every merge method merged as-is and after DisTaC. Then
the two guidelines are measured on seed 0 (a κ sweep; overconfident → merge → calibrate against merging
soft sources) and everything is collected into ``benchmarks/results/paper/``: the tables (markdown, JSON),
the plots and the command that produced them.

    .venv/bin/python -m benchmarks.paper_repro all                 # everything, four processes side by side
    .venv/bin/python -m benchmarks.paper_repro run --seed 1        # one seed's three flows (run seeds side by side)
    .venv/bin/python -m benchmarks.paper_repro sweep | calibration | convergence | report
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import flows  # noqa: F401  (Prefect defaults before prefect is imported)

REPO = Path(__file__).resolve().parent.parent
SETTINGS_FILE = REPO / "benchmarks" / "paper" / "settings.yaml"


# --------------------------------------------------------------------------------------------- the plan


def load_plan(path: Path = SETTINGS_FILE) -> dict[str, Any]:
    plan = yaml.safe_load(path.read_text())
    plan["base_params"] = yaml.safe_load((path.parent / plan["base"]).read_text())
    return plan


def setting_root(plan: dict[str, Any], setting: str, seed: int) -> str:
    return f"{plan['root']}/seed{seed}/{setting}"


def setting_params(plan: dict[str, Any], setting: str, seed: int) -> dict[str, Any]:
    """The base params with the setting's recipe overrides, the seed and the setting's storage root."""
    spec = plan["settings"][setting]
    params = copy.deepcopy(plan["base_params"])
    for task in params["tasks"]:
        task["finetune"] = {**task.get("finetune", {}), **spec["tasks"].get(task["name"], {})}
        if task["name"] in spec.get("unlabeled", {}):  # DisTaC's inputs: e.g. another task's ({from_task: cola})
            task["unlabeled"] = spec["unlabeled"][task["name"]]
    for section in ("data", "finetune", "conditioning"):
        params[section]["seed"] = seed
    params["conditioning"]["tasks"] = list(spec["conditioning_tasks"])
    params["conditioning"].update(spec.get("conditioning", {}))  # e.g. a fixed student temperature
    params["merge"]["variants"] = ["as-is", "distac"] if spec["conditioning_tasks"] else ["as-is"]
    if seed != plan["seeds"][0] or spec.get("headline_only"):
        params["merge"]["methods"] = [m for m in params["merge"]["methods"] if m["name"] in plan["headline_methods"]]
    params["storage"]["root"] = setting_root(plan, setting, seed)
    if setting != "original":
        params["storage"]["reuse"] = [setting_root(plan, name, seed) for name in ["original", *spec.get("reuse", [])]]
    return params


def write_params(plan: dict[str, Any], setting: str, seed: int) -> Path:
    path = REPO / setting_root(plan, setting, seed) / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(setting_params(plan, setting, seed), sort_keys=False))
    return path


def loaded_params(plan: dict[str, Any], setting: str, seed: int):
    from distac.pipeline import parse_params

    return parse_params(setting_params(plan, setting, seed), source=f"{setting} seed {seed}")


# --------------------------------------------------------------------------------------------- the flows


def settings_for(plan: dict[str, Any], seed: int) -> list[str]:
    """The settings run with this seed (a setting may name its own ``seeds``)."""
    return [name for name, spec in plan["settings"].items() if seed in spec.get("seeds", plan["seeds"])]


def run_seed(plan: dict[str, Any], seed: int, only: list[str] | None = None) -> None:
    """One Prefect flow run per setting; each skips what an earlier run already finished."""
    from flows.pipeline import distac_pipeline

    for setting in settings_for(plan, seed):
        if only and setting not in only:
            continue
        path = write_params(plan, setting, seed)
        started = time.perf_counter()
        print(f"== seed {seed}, {setting}: {path}", flush=True)
        result = distac_pipeline(str(path.relative_to(REPO)))
        seconds = time.perf_counter() - started
        print(result["report"]["table"])
        print(f"== seed {seed}, {setting}: {seconds:.0f} s", flush=True)
        record_timing(plan, {"seed": seed, "setting": setting, "seconds": round(seconds, 1),
                             "stages_run": sum(not s["skipped"] for s in result["stages"]),
                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average": os.getloadavg()})


def record_timing(plan: dict[str, Any], entry: dict[str, Any]) -> None:
    """Append one flow run's wall time to ``<results>/timings.json`` (the 2-hour budget's evidence)."""
    path = REPO / plan["results"] / "timings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:  # drivers of other seeds append side by side
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*done, entry], indent=1))


def run_side_by_side(plan: dict[str, Any], results: Path, width: int) -> None:
    """Every flow and study as its own process, ``width`` at a time (``benchmarks/paper_schedule.py``); the
    whole benchmark's wall time goes to ``<results>/schedule.json`` and the flows' to a new ``timings.json``."""
    from benchmarks.paper_schedule import plan_jobs, run_jobs

    (results / "timings.json").unlink(missing_ok=True)
    started = time.perf_counter()
    seconds = run_jobs(plan_jobs(plan, settings_for), width, REPO / plan["root"], REPO)
    (results / "schedule.json").write_text(json.dumps(
        {"jobs": width, "wall_seconds": round(time.perf_counter() - started, 1), "job_seconds": seconds,
         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average": os.getloadavg(),
         "cpus": os.cpu_count()}, indent=1))


# --------------------------------------------------------------------------------------------- guidelines


def _served(params, task: str, backbone_delta=None, scale: float = 1.0):
    """The fine-tuned task model of ``task`` with its backbone set to θ_pre + scale · delta (τ by default)."""
    from distac.pipeline import RunStore

    store = RunStore.of(params)
    loaded = store.task_model(task)
    if backbone_delta is None:
        backbone_delta = store.task_vector(task)
    loaded.model.load_backbone(backbone_delta.apply_to(store.pretrained_backbone(), alpha=scale))
    return loaded


def kappa_sweeps(plan: dict[str, Any], done: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The κ sweep of every source in the plan; sweeps already ``done`` (same source and κs) are kept."""
    spec = plan["kappa_sweep"]
    sweeps = []
    for source in spec["sources"]:
        params = loaded_params(plan, source["setting"], seed)
        inputs = {"source_fingerprint": source_fingerprint(params, source["task"]),
                  "conditioning": params.conditioning.model_dump(mode="json")}
        previous = [s for s in done if (s["setting"], s["task"], s["seed"]) == (source["setting"], source["task"], seed)
                    and [r["kappa"] for r in s["rows"][1:]] == spec["kappas"]
                    and all(s.get(key) == value for key, value in inputs.items())]
        sweeps.append(previous[0] if previous else kappa_sweep(plan, source["setting"], source["task"], seed))
    return sweeps


def source_fingerprint(params, task: str) -> str:
    """The fingerprint of the task's vector (its fine-tuned model, data, recipe and code): a sweep is reused
    only on the very source it was measured on."""
    from distac.pipeline import StageRef, fingerprint

    return fingerprint(params, StageRef("extract", task))


def kappa_sweep(plan: dict[str, Any], setting: str, task: str, seed: int = 0) -> dict[str, Any]:
    """Accuracy of one task's model rescaled to κτ, before and after DisTaC, for each κ ("shrink, don't
    stretch"): κ < 1 should keep accuracy after distillation, κ > 1 lose it."""
    import torch

    from distac.conditioning import DistacConfig, condition
    from distac.evaluation import accuracy, labels_of, predict_logits
    from distac.pipeline import RunStore
    from distac.pipeline.stages import task_data

    params = loaded_params(plan, setting, seed)
    store = RunStore.of(params)
    torch.set_num_threads(params.execution.torch_threads or 1)
    cfg = params.conditioning
    data = task_data(params, task)
    labels = labels_of(data.test)

    def test_accuracy(loaded) -> float:
        return accuracy(predict_logits(loaded.model, data.test, loaded.adapter.collate, batch_size=64), labels)

    rows = [{"kappa": 0.0, "rescaled_accuracy": test_accuracy(_served(params, task, scale=0.0)),
             "distac_accuracy": None, "final_norm": 0.0}]
    for kappa in plan["kappa_sweep"]["kappas"]:
        started = time.perf_counter()
        rescaled = _served(params, task, scale=kappa)
        row = {"kappa": kappa, "rescaled_accuracy": test_accuracy(rescaled)}
        teacher = _served(params, task)
        vector = store.task_vector(task)
        config = DistacConfig(kappa=kappa, teacher_temperature=1.0, student_temperature=1.0, beta=cfg.beta,
                              lr=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, grad_clip=cfg.grad_clip,
                              num_unlabeled=cfg.num_unlabeled, log_every=cfg.log_every, seed=cfg.seed)
        result = condition(teacher.model, store.pretrained_backbone(), vector,
                           data.unlabeled(cfg.num_unlabeled, cfg.seed), teacher.adapter.collate, config,
                           progress=False)
        row.update(distac_accuracy=test_accuracy(teacher), original_norm=result.original_norm,
                   final_norm=result.final_norm, seconds=round(time.perf_counter() - started, 1))
        print(f"{task} κ {kappa}: rescaled {row['rescaled_accuracy']:.3f}, DisTaC {row['distac_accuracy']:.3f}", flush=True)
        rows.append(row)
    finetuned = store.finetuned_accuracy([task], "test")[task]
    return {"setting": setting, "task": task, "seed": seed, "finetuned_accuracy": finetuned,
            "source_fingerprint": source_fingerprint(params, task), "conditioning": cfg.model_dump(mode="json"),
            "rows": rows}


def calibration_study(plan: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Overconfident sources → merge → temperature-scale the merged model, against merging sources that are
    soft (calibrated by their training recipe) as they are, and after DisTaC sharpened them."""
    import torch

    from distac.calibration import calibrate, confidence_stats, expected_calibration_error
    from distac.evaluation import accuracy, labels_of, predict_logits
    from distac.pipeline import RunStore
    from distac.pipeline.stages import task_data

    method = plan["calibration"]["method"]
    soft = plan["settings"]["low_confidence"]["conditioning_tasks"]
    paths = {"overconfident → merge → calibrate": ("original", "as-is"),
             "soft sources → merge": ("low_confidence", "as-is"),
             "soft sources → DisTaC → merge → calibrate": ("low_confidence", "distac")}
    results: dict[str, Any] = {"method": method, "seed": seed, "soft_tasks": soft, "paths": {}}
    for name, (setting, variant) in paths.items():
        params = loaded_params(plan, setting, seed)
        torch.set_num_threads(params.execution.torch_threads or 1)
        merged = RunStore.of(params).merged(method, variant)
        per_task = {}
        for index, task in enumerate(params.task_names):
            loaded = _served(params, task, merged.for_task(index))
            data = task_data(params, task)
            val = predict_logits(loaded.model, data.validation, loaded.adapter.collate, batch_size=64)
            test = predict_logits(loaded.model, data.test, loaded.adapter.collate, batch_size=64)
            val_labels, test_labels = labels_of(data.validation), labels_of(data.test)
            fitted = calibrate(val, val_labels, eval_logits=test, eval_labels=test_labels)
            per_task[task] = {
                "accuracy": accuracy(test, test_labels),
                "mean_max_prob": confidence_stats(test).mean_max_prob,
                "ece": expected_calibration_error(torch.softmax(test, dim=1), test_labels),
                "calibrated_ece": fitted.ece_after, "temperature": fitted.temperature,
                "nll": fitted.nll_before, "calibrated_nll": fitted.nll_after}
        results["paths"][name] = {"setting": setting, "variant": variant, "alpha": merged.alpha,
                                  "tasks": per_task}
    return results


def convergence_study(plan: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """DisTaC re-run exactly as the pipeline's condition stage ran it, probing the student's validation
    accuracy every ``log_every`` steps; the final vector is compared with the pipeline's."""
    import dataclasses

    import torch

    from distac.conditioning import condition
    from distac.pipeline import RunStore
    from distac.pipeline.stages import accuracy_on, distac_config, task_data

    runs = []
    for source in plan["convergence"]["sources"]:
        params = loaded_params(plan, source["setting"], seed)
        torch.set_num_threads(params.execution.torch_threads or 1)
        task, cfg, store = source["task"], params.conditioning, RunStore.of(params)
        config = dataclasses.replace(distac_config(params, task, store.diagnosis()),
                                     log_every=plan["convergence"]["log_every"])
        teacher = _served(params, task)
        data = task_data(params, task)
        vector = store.task_vector(task)

        def probe(model, data=data, adapter=teacher.adapter):
            return {"validation_accuracy": accuracy_on(model, data.validation, adapter.collate, torch.device("cpu"))[0]}

        result = condition(teacher.model, store.pretrained_backbone(), vector,
                           data.unlabeled(cfg.num_unlabeled, cfg.seed), teacher.adapter.collate, config,
                           progress=False, probe=probe)
        pipeline = store.conditioned_vector(task)
        difference = max(float((result.vector[k] - pipeline[k]).abs().max()) for k in vector)
        teacher_accuracy = store.finetune_metrics(task)
        runs.append({"setting": source["setting"], "task": task, "seed": seed, "kappa": result.kappa,
                     "temperatures": [config.teacher_temperature, config.student_temperature],
                     "teacher_validation_accuracy": teacher_accuracy["validation_accuracy"],
                     "max_abs_difference_from_pipeline": difference, "history": result.history})
        print(f"{source['setting']}/{task}: κ {result.kappa:.3f}, accuracy "
              f"{result.history[0]['validation_accuracy']:.3f} → {result.history[-1]['validation_accuracy']:.3f}, "
              f"max |Δ| from the pipeline's vector {difference:.2e}", flush=True)
    return runs


# --------------------------------------------------------------------------------------------- collect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_repro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["all", "run", "sweep", "calibration", "convergence", "report"])
    parser.add_argument("--seed", type=int, action="append", help="seed(s) for 'run' (default: all)")
    parser.add_argument("--setting", action="append", help="only these settings, for 'run' (default: all)")
    parser.add_argument("--settings", type=Path, default=SETTINGS_FILE)
    parser.add_argument("--jobs", type=int, default=4,
                        help="for 'all': flows and studies run side by side, each in its own process (default: 4; "
                             "1 runs every step in this process, one after the other)")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    plan = load_plan(args.settings)
    results = REPO / plan["results"]
    results.mkdir(parents=True, exist_ok=True)
    if args.step == "all" and args.jobs > 1:
        run_side_by_side(plan, results, args.jobs)
        args.step = "report"
    if args.step in ("all", "run"):
        for seed in args.seed or plan["seeds"]:
            run_seed(plan, seed, args.setting)
    if args.step in ("all", "sweep"):
        path = results / "kappa_sweep.json"
        done = json.loads(path.read_text()) if path.exists() else []
        done = [done] if isinstance(done, dict) else done
        path.write_text(json.dumps(kappa_sweeps(plan, done), indent=2))
    if args.step in ("all", "calibration"):
        (results / "calibration.json").write_text(json.dumps(calibration_study(plan), indent=2))
    if args.step in ("all", "convergence"):
        (results / "convergence.json").write_text(json.dumps(convergence_study(plan), indent=2))
    if args.step in ("all", "report"):
        from benchmarks.paper_report import write_report

        write_report(plan, results, command=" ".join(["python -m benchmarks.paper_repro", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
