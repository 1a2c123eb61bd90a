"""Collect the paper-reproduction runs into ``benchmarks/results/paper/``: tables (markdown, JSON), plots, and
one MLflow run holding them (see ``benchmarks/paper_repro.py``)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from distac.pipeline import RunStore, StageRef
from distac.pipeline.report import results_markdown, results_rows
from distac.pipeline.stages import task_data


NORMALIZATION = (
    "Normalized accuracy is a merged model's test accuracy on a task over that of the task's fine-tuned source "
    "**in the same setting and seed** (the setting's `individual` row): each setting is normalized by its own "
    "sources, so the norm-mismatch and low-confidence settings by their modified sources, not by the original "
    "setting's. A stronger mismatched source raises its own reference, and a mean can rise while one task "
    "collapses: the per-setting tables give the worst task's normalized accuracy beside the mean.")
GOAL_REFERENCE = (
    "Each side of a difference is normalized by its own setting's sources (the broken setting's, the original "
    "setting's), so a difference compares those two ratios, not accuracies against one common reference.")


def _read(store: RunStore, made: StageRef, name: str) -> Any | None:
    try:
        return store.read_json(made, name)
    except Exception:  # a stage that has not run (yet)
        return None


def majority_rate(examples) -> float:
    """The accuracy of always predicting the most frequent label of ``examples``."""
    labels = [example.label for example in examples]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def _diagnostics(params) -> dict[str, dict[str, Any]]:
    """Per task: ‖τ‖, its ratio to the smallest, the source model's mean max-probability and accuracy."""
    store = RunStore.of(params)
    norms = {t: store.vector_stats(t)["norm"] for t in params.task_names}
    smallest = min(norms.values())
    flags = {t["name"]: t["flags"] for t in store.diagnosis()["tasks"]}
    out = {}
    for task in params.task_names:
        majority = majority_rate(task_data(params, task).test)
        metrics = store.finetune_metrics(task)
        recipe = params.recipe(task).model_dump()
        changed = {k: v for k, v in recipe.items() if v != params.finetune.model_dump()[k]}
        out[task] = {"norm": norms[task], "norm_ratio": norms[task] / smallest, "recipe_changes": changed,
                     "mean_max_prob": metrics["validation_mean_max_prob"],
                     "validation_accuracy": metrics["validation_accuracy"],
                     "test_accuracy": metrics["test_accuracy"], "test_mcc": metrics.get("test_mcc"),
                     "majority_accuracy": majority, "flags": flags.get(task, [])}
    return out


def _conditioning(params) -> dict[str, Any]:
    out = {}
    for task in params.conditioning.tasks if isinstance(params.conditioning.tasks, list) else []:
        store, made = RunStore.of(params), StageRef("condition", task=task)
        summary, history = _read(store, made, "summary.json"), _read(store, made, "history.json")
        if summary is not None:
            out[task] = {**{k: summary.get(k) for k in ("kappa", "original_norm", "final_norm",
                                                         "validation_accuracy")},
                         "temperatures": [summary.get("config", {}).get("teacher_temperature"),
                                          summary.get("config", {}).get("student_temperature")],
                         "history": history}
    return out


def _mcc(params) -> dict[str, dict[str, float]]:
    """'<method>/<variant>' → task → test Matthews correlation of the merged model."""
    store = RunStore.of(params)
    out = {}
    for method in params.method_names:
        for variant in params.merge.variants:
            evaluation = store.evaluation(method, variant)
            if "identical_to" in evaluation:  # not merged: the same model as another variant
                continue
            out[f"{method}/{variant}"] = {t: evaluation["tasks"][t].get("mcc") for t in params.task_names}
    return out


def collect_runs(plan: dict[str, Any]) -> dict[str, Any]:
    """Every finished (seed, setting): its diagnostics, results rows and conditioning summaries."""
    from benchmarks.paper_repro import loaded_params

    runs: dict[str, Any] = {}
    from benchmarks.paper_repro import settings_for

    for seed in plan["seeds"]:
        for setting in settings_for(plan, seed):
            params = loaded_params(plan, setting, seed)
            if RunStore.of(params).manifest(StageRef("report")) is None:
                continue
            runs.setdefault(str(seed), {})[setting] = {
                "storage": params.storage.root, "diagnostics": _diagnostics(params),
                "rows": results_rows(params), "conditioning": _conditioning(params), "mcc": _mcc(params)}
    return runs


def setting_variants(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (setting, variant) the plan merges: as-is everywhere, DisTaC where a setting conditions tasks."""
    return [(s, v) for s, spec in plan["settings"].items()
            for v in (["as-is", "distac"] if spec["conditioning_tasks"] else ["as-is"])]


def headline(plan: dict[str, Any], runs: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: mean normalized accuracy in each (setting, variant), mean and spread over seeds."""
    columns = setting_variants(plan)
    methods = [m["name"] for m in plan["base_params"]["merge"]["methods"]]
    table = []
    for method in methods:
        row: dict[str, Any] = {"method": method}
        for setting, variant in columns:
            values = [r["mean_norm"] for seed in runs.values() for r in seed.get(setting, {}).get("rows", [])
                      if r["method"] == method and r["variant"] == variant]
            row[f"{setting}/{variant}"] = {"mean": statistics.fmean(values) if values else None,
                                           "seeds": values}
        table.append(row)
    return table


def _cell(entry: dict[str, Any]) -> str:
    values = entry["seeds"]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def headline_markdown(plan: dict[str, Any], table: list[dict[str, Any]]) -> str:
    keys = [k for k in table[0] if k != "method"]
    names = [k.replace("_", " ").replace("/", ", ") for k in keys]
    lines = ["| Method | " + " | ".join(names) + " |", "|---|" + "---|" * len(keys)]
    for row in table:
        lines.append(f"| {row['method']} | " + " | ".join(_cell(row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def goal_markdown(plan: dict[str, Any], runs: dict[str, Any]) -> str:
    """Per method and broken setting: DisTaC's mean normalized accuracy minus the original setting's, per seed,
    and which task carries the remaining loss (the issue's goal: within 2 points on every seed)."""
    broken = [s for s, spec in plan["settings"].items() if spec["conditioning_tasks"]]
    lines = ["| Method | " + " | ".join(f"{s.replace('_', ' ')}: as-is − original | DisTaC − original | largest "
                                         "per-task loss after DisTaC" for s in broken) + " |",
             "|---|" + "---|---|---|" * len(broken)]
    tasks = [t["name"] for t in plan["base_params"]["tasks"]]
    for method in [m["name"] for m in plan["base_params"]["merge"]["methods"]]:
        cells = []
        for setting in broken:
            as_is, distac, worst = [], [], []
            for seed, settings in runs.items():
                rows = {(r["method"], r["variant"]): r for r in settings.get(setting, {}).get("rows", [])}
                base = {(r["method"], r["variant"]): r for r in settings.get("original", {}).get("rows", [])}
                if (method, "distac") not in rows or (method, "as-is") not in base:
                    continue
                reference = base[(method, "as-is")]
                as_is.append(rows[(method, "as-is")]["mean_norm"] - reference["mean_norm"])
                distac.append(rows[(method, "distac")]["mean_norm"] - reference["mean_norm"])
                losses = {t: rows[(method, "distac")][f"{t}_norm"] - reference[f"{t}_norm"] for t in tasks}
                task = min(losses, key=losses.get)
                worst.append(f"{task} {losses[task]:+.1f}")
            fmt = " / ".join
            cells += [fmt(f"{v:+.1f}" for v in as_is) or "–", fmt(f"{v:+.1f}" for v in distac) or "–",
                      "; ".join(worst) or "–"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nNormalized points, per seed ({' / '.join(runs)}). {GOAL_REFERENCE}\n"


def mcc_markdown(plan: dict[str, Any], runs: dict[str, Any], task: str = "cola") -> str:
    """The task's test Matthews correlation per method, setting and variant, per seed."""
    columns = setting_variants(plan)
    lines = ["| Method | fine-tuned | " + " | ".join(f"{s.replace('_', ' ')}, {v}" for s, v in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    source = " / ".join(f"{settings['original']['diagnostics'][task]['test_mcc']:.3f}" for settings in runs.values()
                        if "original" in settings and settings["original"]["diagnostics"][task].get("test_mcc") is not None)
    for method in [m["name"] for m in plan["base_params"]["merge"]["methods"]]:
        cells = []
        for setting, variant in columns:
            values = [settings[setting]["mcc"].get(f"{method}/{variant}", {}).get(task) for settings in runs.values()
                      if setting in settings and "mcc" in settings[setting]]
            cells.append(" / ".join(f"{v:.3f}" for v in values if v is not None) or "–")
        lines.append(f"| {method} | {source or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nPer seed ({' / '.join(runs)}); fine-tuned: the original setting's source model.\n"


def diagnostics_markdown(plan: dict[str, Any], runs: dict[str, Any]) -> str:
    lines = ["| Setting | Task | Recipe change | ‖τ‖ | ‖τ‖ / smallest | mean max-prob | fine-tuned acc. | majority class "
             "| MCC | diagnosis flags |", "|---|---|---|---|---|---|---|---|---|---|"]
    seeds = list(runs)
    for setting in plan["settings"]:
        per_seed = [runs[s][setting]["diagnostics"] for s in seeds if setting in runs[s]]
        if not per_seed:
            continue
        for task in per_seed[0]:
            def joined(key: str, fmt: str) -> str:
                return " / ".join("–" if d[task].get(key) is None else format(d[task][key], fmt) for d in per_seed)
            change = ", ".join(f"{k} {v:g}" for k, v in per_seed[0][task]["recipe_changes"].items()) or "–"
            lines.append(f"| {setting} | {task} | {change} | {joined('norm', '.2f')} | {joined('norm_ratio', '.1f')} | "
                         f"{joined('mean_max_prob', '.3f')} | {joined('test_accuracy', '.3f')} | "
                         f"{joined('majority_accuracy', '.3f')} | {joined('test_mcc', '.3f')} | "
                         f"{' / '.join(', '.join(d[task]['flags']) or '–' for d in per_seed)} |")
    return "\n".join(lines) + f"\n\nValues per seed: {' / '.join(seeds)}.\n"


def conditioning_markdown(runs: dict[str, Any]) -> str:
    lines = ["| Seed | Setting | Task | κ | ‖τ‖ → ‖τ′‖ | T_tcr, T_stu | validation acc. after |", "|---|---|---|---|---|---|---|"]
    for seed, settings in runs.items():
        for setting, run in settings.items():
            for task, c in run["conditioning"].items():
                lines.append(f"| {seed} | {setting} | {task} | {c['kappa']:.3f} | {c['original_norm']:.2f} → "
                             f"{c['final_norm']:.2f} | {c['temperatures'][0]:g}, {c['temperatures'][1]:.3g} | "
                             f"{100 * c['validation_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def kappa_markdown(sweep: dict[str, Any]) -> str:
    lines = [f"Task {sweep['task']} ({sweep['setting']} setting, seed {sweep['seed']}); fine-tuned test accuracy "
             f"{100 * sweep['finetuned_accuracy']:.1f}. κ = 0 is the pretrained backbone with the task's head.", "",
             "| κ | rescaled θ_pre + κτ | after DisTaC | ‖τ′‖ |", "|---|---|---|---|"]
    for row in sweep["rows"]:
        distac = "–" if row["distac_accuracy"] is None else f"{100 * row['distac_accuracy']:.1f}"
        lines.append(f"| {row['kappa']:g} | {100 * row['rescaled_accuracy']:.1f} | {distac} | {row['final_norm']:.2f} |")
    return "\n".join(lines) + "\n"


def calibration_markdown(study: dict[str, Any]) -> str:
    lines = [f"Merge method {study['method']}, seed {study['seed']}; soft-source tasks: {', '.join(study['soft_tasks'])}. "
             "Test accuracy, mean max-probability, ECE before and after temperature scaling fitted on validation.", "",
             "| Path | Task | acc. | mean max-prob | ECE | ECE calibrated | T |", "|---|---|---|---|---|---|---|"]
    for name, path in study["paths"].items():
        for task, m in path["tasks"].items():
            lines.append(f"| {name} | {task} | {100 * m['accuracy']:.1f} | {m['mean_max_prob']:.3f} | "
                         f"{m['ece']:.3f} | {m['calibrated_ece']:.3f} | {m['temperature']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_headline(table: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    keys = [k for k in table[0] if k != "method"]
    width = 0.8 / len(keys)
    figure, axis = plt.subplots(figsize=(12, 4))
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(table))]
        means = [row[key]["mean"] or 0.0 for row in table]
        spread = [((max(v) - min(v)) / 2 if len(v) > 1 else 0.0) for v in (row[key]["seeds"] for row in table)]
        axis.bar(xs, means, width, yerr=spread, capsize=2, label=key.replace("_", " ").replace("/", ", "))
    axis.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xticks(range(len(table)), [row["method"] for row in table])
    axis.set_ylabel("mean normalized accuracy (%)")
    axis.set_ylim(40, 105)
    axis.legend(ncol=5, fontsize=8, loc="lower center")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_kappa(sweeps: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 3.8), squeeze=False)
    for sweep, axis in zip(sweeps, axes[0]):
        _plot_one_sweep(sweep, axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_one_sweep(sweep: dict[str, Any], axis) -> None:
    rows = sweep["rows"]
    axis.plot([r["kappa"] for r in rows], [100 * r["rescaled_accuracy"] for r in rows], "o--",
              label="rescaled θ_pre + κτ")
    conditioned = [r for r in rows if r["distac_accuracy"] is not None]
    axis.plot([r["kappa"] for r in conditioned], [100 * r["distac_accuracy"] for r in conditioned], "s-",
              label="after DisTaC")
    axis.axhline(100 * sweep["finetuned_accuracy"], color="grey", linestyle=":", label="fine-tuned")
    axis.axvline(1.0, color="lightgrey", linewidth=0.8)
    axis.set_xlabel("κ (norm scale)")
    axis.set_ylabel(f"{sweep['task']} test accuracy (%)")
    axis.set_title(f"{sweep['task']} ({sweep['setting'].replace('_', ' ')}, ‖τ‖ {rows[1]['original_norm']:.2f})")
    axis.legend(fontsize=8)


def plot_calibration(study: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = list(study["paths"])
    tasks = list(next(iter(study["paths"].values()))["tasks"])
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(names)
    panels = [("accuracy", "test accuracy (%)", 100), ("ece", "ECE, as merged", 1), ("calibrated_ece",
                                                                                      "ECE, after temperature scaling", 1)]
    for axis, (key, label, factor) in zip(axes, panels):
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks))]
            axis.bar(xs, [factor * study["paths"][name]["tasks"][t][key] for t in tasks], width, label=name)
        axis.set_xticks(range(len(tasks)), tasks)
        axis.set_title(label, fontsize=10)
    axes[1].set_ylim(0, max(0.3, axes[1].get_ylim()[1]))
    axes[2].set_ylim(axes[1].get_ylim())
    axes[0].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_convergence(runs: list[dict[str, Any]], path: Path) -> None:
    """DisTaC over steps: the student's validation accuracy (dotted: its teacher), ‖τ′‖ and entropy."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for run in runs:
        history = run["history"]
        label = f"{run['task']} ({run['setting'].replace('_', ' ')}; κ {run['kappa']:.2f}, T_stu {run['temperatures'][1]:.2g})"
        steps = [h["step"] for h in history]
        line, = axes[0].plot(steps, [100 * h["validation_accuracy"] for h in history], "o-", markersize=3, label=label)
        axes[0].axhline(100 * run["teacher_validation_accuracy"], color=line.get_color(), linestyle=":", linewidth=1)
        axes[1].plot(steps, [h["norm"] for h in history], color=line.get_color())
        logged = [h for h in history if "student_entropy" in h]
        axes[2].plot([h["step"] for h in logged], [h["student_entropy"] for h in logged], color=line.get_color())
    axes[0].set_title("validation accuracy (%; dotted: teacher)", fontsize=10)
    axes[1].set_title("‖τ′‖", fontsize=10)
    axes[2].set_title("student predictive entropy on its batch (nats)", fontsize=10)
    for axis in axes:
        axis.set_xlabel("DisTaC step")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def convergence_markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["| Setting | Task | κ | T_tcr, T_stu | val. acc. teacher | at the anchor | after 50 steps | at the end | "
             "‖τ′‖ anchor → end | entropy first → last logged | max abs. diff. from the pipeline's τ′ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        h = run["history"]
        at_50 = next((x for x in h if x["step"] >= 50), h[-1])
        logged = [x for x in h if "student_entropy" in x]
        lines.append(f"| {run['setting']} | {run['task']} | {run['kappa']:.3f} | {run['temperatures'][0]:g}, "
                     f"{run['temperatures'][1]:.3g} | {100 * run['teacher_validation_accuracy']:.1f} | "
                     f"{100 * h[0]['validation_accuracy']:.1f} | {100 * at_50['validation_accuracy']:.1f} | "
                     f"{100 * h[-1]['validation_accuracy']:.1f} | {h[0]['norm']:.2f} → {h[-1]['norm']:.2f} | "
                     f"{logged[0]['student_entropy']:.3f} → {logged[-1]['student_entropy']:.3f} | "
                     f"{run['max_abs_difference_from_pipeline']:.1e} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- write


def timings_markdown(timings: list[dict[str, Any]]) -> str:
    """The flow runs' wall times (only runs that did work: a re-run that skipped everything is left out)."""
    worked = [t for t in timings if t["stages_run"]]
    lines = ["| Seed | Setting | stages run | wall time | load average (1, 5, 15 min) at the end |", "|---|---|---|---|---|"]
    for t in worked:
        load = ", ".join(f"{x:.1f}" for x in t.get("load_average", []))
        lines.append(f"| {t['seed']} | {t['setting']} | {t['stages_run']} | {t['seconds'] / 60:.1f} min | {load} |")
    total = sum(t["seconds"] for t in worked)
    return "\n".join(lines) + f"\n\nSum of the flow runs' wall times: {total / 60:.1f} min.\n"


def schedule_markdown(schedule: dict[str, Any] | None) -> str:
    """The whole benchmark's wall time when ``all`` ran its steps side by side."""
    if not schedule:
        return ""
    slowest = sorted(schedule["job_seconds"].items(), key=lambda item: -item[1])[:3]
    return (f"The whole benchmark (`all --jobs {schedule['jobs']}`, {schedule['cpus']} CPUs, finished "
            f"{schedule['finished_at']}): **{schedule['wall_seconds'] / 60:.1f} min** wall. Longest jobs: "
            + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in slowest) + ".\n")


def write_report(plan: dict[str, Any], results: Path, command: str) -> dict[str, Any]:
    runs = collect_runs(plan)
    if not runs:
        raise SystemExit("no finished setting yet: run `python -m benchmarks.paper_repro run` first")
    sweep = _load(results / "kappa_sweep.json")
    sweep = [sweep] if isinstance(sweep, dict) else sweep
    study = _load(results / "calibration.json")
    table = headline(plan, runs)
    tasks = [t["name"] for t in plan["base_params"]["tasks"]]
    convergence = _load(results / "convergence.json")
    timings = _load(results / "timings.json")
    plot_headline(table, results / "headline.png")
    sections = [
        f"# Paper reproduction at small scale: MiniLM on {len(tasks)} GLUE tasks ({', '.join(tasks)})\n",
        "Command: `python -m benchmarks.paper_repro all` (every flow and study in its own process, `--jobs` of "
        "them at a time), or its steps one by one: "
        f"{' and '.join(f'`run --seed {seed}`' for seed in plan['seeds'])} "
        "(side by side, each setting a Prefect flow run), then `sweep`, `calibration`, `convergence`, `report` "
        f"(this file was written by `{command}`; settings: `benchmarks/paper/settings.yaml`, base params: "
        f"`benchmarks/paper/{plan['base']}`). Generated {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, "
        f"seeds {', '.join(runs)}.\n",
        "## Settings\n", *[f"- **{name}**: {spec['description']}" for name, spec in plan["settings"].items()], "",
        "## Source models\n", diagnostics_markdown(plan, runs),
        "## Mean normalized accuracy (%), mean ± half the spread over seeds\n", NORMALIZATION + "\n",
        headline_markdown(plan, table),
        "![headline](headline.png)\n",
        "## Goal: DisTaC within 2 normalized points of the original setting\n", goal_markdown(plan, runs),
        "## CoLA: Matthews correlation (GLUE's metric) of the merged models\n", mcc_markdown(plan, runs),
        "## DisTaC runs\n", conditioning_markdown(runs),
    ]
    schedule = _load(results / "schedule.json")
    if timings or schedule:
        sections += ["## Wall time\n", schedule_markdown(schedule), timings_markdown(timings or [])]
    if convergence:
        plot_convergence(convergence, results / "convergence.png")
        sections += ["## DisTaC convergence (seed 0)\n", convergence_markdown(convergence),
                     "![convergence](convergence.png)\n"]
    for seed, settings in runs.items():
        for setting, run in settings.items():
            sections += [f"## {setting}, seed {seed}: absolute (normalized) test accuracy\n",
                         f"Normalized by the {setting} setting's own fine-tuned sources (seed {seed}); "
                         "Worst norm.: the lowest task's.\n", results_markdown(run["rows"], tasks)]
    if sweep:
        plot_kappa(sweep, results / "kappa_sweep.png")
        sections += ["## Guideline: shrink, don't stretch\n", *map(kappa_markdown, sweep), "![kappa](kappa_sweep.png)\n"]
    if study:
        plot_calibration(study, results / "calibration.png")
        sections += ["## Guideline: overconfident → merge → calibrate\n", calibration_markdown(study),
                     "![calibration](calibration.png)\n"]
    markdown = "\n".join(sections)
    (results / "results.md").write_text(markdown)
    summary = {"command": command, "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "settings": {k: v for k, v in plan["settings"].items()}, "headline": table, "runs": runs,
               "kappa_sweep": sweep, "calibration": study, "convergence": convergence}
    (results / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    _log_to_mlflow(plan, results, table)
    return summary


def _load(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.exists() else None


def _log_to_mlflow(plan: dict[str, Any], results: Path, table: list[dict[str, Any]]) -> None:
    """One MLflow run in the benchmark's experiment holding the headline metrics and every result file."""
    import mlflow

    settings = plan["base_params"]["mlflow"]
    mlflow.set_tracking_uri(settings["tracking_uri"])
    mlflow.set_experiment(settings["experiment"])
    with mlflow.start_run(run_name=f"paper-repro-report-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags={"distac.kind": "paper-repro-report"}):
        for row in table:
            for key, entry in row.items():
                if key != "method" and entry["mean"] is not None:
                    mlflow.log_metric(f"{row['method']}.{key.replace('/', '.')}.mean_norm", entry["mean"])
        mlflow.log_artifacts(str(results))
