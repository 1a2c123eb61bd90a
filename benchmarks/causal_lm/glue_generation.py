"""DisTaC on a generative model: three GLUE tasks as label-word generation, merged as-is and after DisTaC.

The evidence for the causal-LM route (issue 22.6). No pretrained causal LM can be installed here, so:

1. ``benchmarks.causal_lm.pretrain`` builds a 4.2 M-parameter Llama from GLUE's sentences (cached by fingerprint:
   a second run reuses it);
2. the pipeline itself (the Prefect flow, MLflow tracking, ``hf_causal_lm`` model kind) fine-tunes it by SFT on
   CoLA, MRPC and SST-2 written as prompts whose completion is the class's label word, in three settings that
   break merging (``SETTINGS``): a long task vector (a task at ``LR_FACTOR`` × the learning rate) and a
   low-confidence source (label smoothing), together and one at a time;
3. the diagnosis flags the sources, DisTaC conditions the flagged ones (token-level distillation on the task's
   unlabeled prompts), and task arithmetic, TIES and TSV merge as-is and after DisTaC, α searched on validation;
4. ``benchmarks/results/causal_lm/`` gets the tables (markdown, JSON), the diagnoses, the sources' scores and the
   wall time of every part. A setting reuses the other settings' unchanged fine-tunes (``storage.reuse``).

    .venv/bin/python -m benchmarks.causal_lm.glue_generation                 # ~40 min on 2 cores (pretrain ~9)
    .venv/bin/python -m benchmarks.causal_lm.glue_generation --setting both  # one setting (~25 min with pretrain)
    .venv/bin/python -m benchmarks.causal_lm.glue_generation --report        # rewrite the results from the runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ROOT = "runs/causal_lm"
PRETRAINED = f"{ROOT}/pretrained"
RESULTS = REPO / "benchmarks" / "results" / "causal_lm"
TASKS = ("cola", "mrpc", "sst2")
METHODS = ("task_arithmetic", "ties", "tsv")
BASE_LR = 3.0e-4
LR_FACTOR = 8.0
LABEL_SMOOTHING = 0.6
SETTINGS: dict[str, dict[str, Any]] = {
    "both": {"description": f"SST-2 at {LR_FACTOR:g}x the learning rate (a long vector), MRPC with label "
                            f"smoothing {LABEL_SMOOTHING:g} (a soft source)",
             "recipes": {"sst2": {"lr": BASE_LR * LR_FACTOR}, "mrpc": {"label_smoothing": LABEL_SMOOTHING}}},
    "long_cola": {"description": f"CoLA at {LR_FACTOR:g}x the learning rate: a long vector beside the one task "
                                 "this model learns well (SST-2)",
                  "recipes": {"cola": {"lr": BASE_LR * LR_FACTOR}}},
    "soft_sst2": {"description": f"SST-2 with label smoothing {LABEL_SMOOTHING:g}: the task this model learns well, "
                                 "from a soft source",
                  "recipes": {"sst2": {"label_smoothing": LABEL_SMOOTHING}}},
}


def setting_root(setting: str) -> str:
    return f"{ROOT}/{setting}"


def benchmark_params(setting: str = "both") -> dict[str, Any]:
    """The pipeline params of one setting's run."""
    recipes = SETTINGS[setting]["recipes"]
    return {
        "model": {"kind": "hf_causal_lm", "name_or_path": PRETRAINED, "max_length": 64,
                  "options": {"template": "{text_a} {text_b} Answer:"}},
        "data": {"max_train": 4000, "max_eval": 200, "validation_fraction": 0.1, "seed": 0},
        "finetune": {"lr": BASE_LR, "steps": 250, "batch_size": 16, "weight_decay": 0.0, "warmup_fraction": 0.1,
                     "schedule": "cosine", "grad_clip": 1.0, "seed": 0},
        "tasks": [{"name": name, **({"finetune": recipes[name]} if name in recipes else {})} for name in TASKS],
        "diagnosis": {"norm_ratio": 2.0, "min_scaled_confidence": 0.7},
        "conditioning": {"tasks": "auto", "kappa": {"policy": "recommended"}, "teacher_temperature": 1.0,
                         "student_temperature": "auto", "beta": 0.1, "lr": 3.0e-4, "steps": 100,
                         "batch_size": 16, "grad_clip": 1.0, "num_unlabeled": 1024, "log_every": 10, "seed": 0},
        "merge": {"alpha_grid": [0.3, 0.5, 0.7, 1.0], "variants": ["as-is", "distac"],
                  "methods": [{"name": "task_arithmetic", "alpha": "search"},
                              {"name": "ties", "alpha": "search", "hyperparams": {"k": 0.2}},
                              {"name": "tsv", "alpha": "search"}]},
        "storage": {"root": setting_root(setting),
                    "reuse": [setting_root(other) for other in SETTINGS if other != setting]},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "distac-causal-lm"},
        "execution": {"task_runner": "threads", "max_workers": 2, "torch_threads": 1, "device": "cpu"},
    }


def write_params(params: dict[str, Any]) -> Path:
    path = REPO / params["storage"]["root"] / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run(settings: list[str]) -> dict[str, Any]:
    """Pretrain (or reuse), then one flow run per setting; returns the wall times."""
    from benchmarks.causal_lm.pretrain import pretrain

    started = time.perf_counter()
    pretrain(str(REPO / PRETRAINED))
    timing: dict[str, Any] = {"pretrain_s": round(time.perf_counter() - started, 1), "flows": {}}

    import flows  # noqa: F401  (Prefect defaults before prefect is imported)
    from flows.pipeline import distac_pipeline

    for setting in settings:
        path = write_params(benchmark_params(setting))
        flow_started = time.perf_counter()
        print(f"== {setting}: {SETTINGS[setting]['description']}", flush=True)
        result = distac_pipeline(str(path.relative_to(REPO)))
        print(result["report"]["table"])
        ran = [s for s in result["stages"] if not s["skipped"]]
        timing["flows"][setting] = {"flow_s": round(time.perf_counter() - flow_started, 1),
                                    "stage_seconds": {s["key"]: s["seconds"] for s in ran}}
    timing.update(total_s=round(time.perf_counter() - started, 1), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  load_average=os.getloadavg(), cpus=os.cpu_count())
    return timing


def _row(rows: list[dict[str, Any]], method: str, variant: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and r["variant"] == variant), None)


def lifts(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per method: DisTaC's change of the mean and of the worst task (normalized accuracy points)."""
    out = {}
    for method in METHODS:
        before, after = _row(rows, method, "as-is"), _row(rows, method, "distac")
        if before and after:
            worst = lambda r: min(r[f"{t}_norm"] for t in tasks)  # noqa: E731
            out[method] = {"mean_norm": round(after["mean_norm"] - before["mean_norm"], 1),
                           "worst_norm": round(worst(after) - worst(before), 1),
                           "mean_abs": round(after["mean_abs"] - before["mean_abs"], 1)}
    return out


def collect_setting(setting: str) -> dict[str, Any] | None:
    """One setting's results, diagnosis and conditioning, from the pipeline's store; None when it has not run."""
    from distac.pipeline import RunStore, parse_params
    from distac.pipeline.report import results_markdown, results_rows

    path = REPO / setting_root(setting) / "params.yaml"
    if not path.exists():
        return None
    raw = yaml.safe_load(path.read_text())
    params = parse_params(raw, source=f"causal-LM benchmark, {setting}")
    store = RunStore.of(params)
    rows = results_rows(params, store)
    diagnosis = store.diagnosis()
    return {"description": SETTINGS[setting]["description"], "params": raw, "rows": rows,
            "table": results_markdown(rows, params.task_names), "lifts": lifts(rows, params.task_names),
            "diagnosis": diagnosis, "sources": {t: store.finetune_metrics(t) for t in params.task_names},
            "conditioning": {t: store.condition_summary(t) for t in store.conditioned_tasks()}}


def collect(timing: dict[str, Any] | None) -> dict[str, Any]:
    record = json.loads((REPO / PRETRAINED / "pretrain.json").read_text())
    previous = RESULTS / "results.json"
    if timing is None and previous.exists():
        timing = json.loads(previous.read_text()).get("timing")
    settings = {name: found for name in SETTINGS if (found := collect_setting(name)) is not None}
    return {"settings": settings, "timing": timing,
            "pretrained": {k: record[k] for k in ("parameters", "heldout_perplexity", "unigram_perplexity",
                                                  "steps_done", "wall_s", "fingerprint") if k in record}}


def _diagnosis_table(diagnosis: dict[str, Any]) -> list[str]:
    recommended = {r["task"]: r for r in diagnosis["recommendations"]}
    lines = ["| Task | ‖τ‖ | norm ratio | confidence (scaled) | flags | DisTaC |", "|---|---|---|---|---|---|"]
    for task in diagnosis["tasks"]:
        r = recommended[task["name"]]
        action = (f"κ {r['kappa']:.2f}, T_stu/T_tcr {r['student_temperature'] / r['teacher_temperature']:.2f}"
                  if r["condition"] else "–")
        lines.append(f"| {task['name']} | {task['norm']:.1f} | {task['norm_ratio']:.2f} | "
                     f"{task['scaled_confidence']:.2f} | {', '.join(task['flags']) or '–'} | {action} |")
    return lines


def write_results(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    pre, timing = results["pretrained"], results["timing"] or {}
    lines = ["# DisTaC on a generative model: GLUE as label-word generation", "",
             "Written by `.venv/bin/python -m benchmarks.causal_lm.glue_generation`; `results.json` has every "
             "number; what they show: [FINDINGS.md](FINDINGS.md).", "",
             f"θ_pre: a {pre.get('parameters', 0):,}-parameter Llama pretrained here on GLUE's sentences "
             f"({pre.get('steps_done')} steps, held-out perplexity {pre.get('heldout_perplexity', 0):.0f} vs "
             f"{pre.get('unigram_perplexity', 0):.0f} for a unigram model). Sources: 250 SFT steps (batch 16, lr "
             f"{BASE_LR:g}) on the completion token(s), the class's label word after `... Answer:`. Accuracy = the "
             "candidate label word with the highest log-likelihood; test split (200 examples per task), in "
             "percent; normalized by the setting's own fine-tuned source of each task, in parentheses.", ""]
    for name, setting in results["settings"].items():
        lines += [f"## {name}: {setting['description']}", "", setting["table"], "### Diagnosis", "",
                  *_diagnosis_table(setting["diagnosis"]), "", "### DisTaC's change (points)", "",
                  "| Method | mean norm. | worst task norm. | mean abs. |", "|---|---|---|---|"]
        lines += [f"| {m} | {d['mean_norm']:+.1f} | {d['worst_norm']:+.1f} | {d['mean_abs']:+.1f} |"
                  for m, d in setting["lifts"].items()]
        lines.append("")
    flows_s = ", ".join(f"{k} {v['flow_s']:.0f} s" for k, v in (timing.get("flows") or {}).items())
    lines += [f"Wall time on {timing.get('cpus', '?')} CPUs: pretraining {pre.get('wall_s', '?')} s when it was "
              f"built ({timing.get('pretrain_s', '?')} s in the last run), flows: {flows_s or '?'}; load average at "
              f"the end {timing.get('load_average', '?')}.", ""]
    (RESULTS / "results.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'results.md'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the results from the runs")
    parser.add_argument("--setting", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(REPO)
    timing = None if args.report else run(args.setting)
    write_results(collect(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
