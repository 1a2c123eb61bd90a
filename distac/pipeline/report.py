"""The pipeline's report: one row per merged model (each method × variant) plus the fine-tuned models,
as a markdown table (the paper's layout), CSV, a bar chart and DVC/MLflow metrics.

Normalized accuracy is a merged model's accuracy on a task over the run's own fine-tuned source's. A mean of
those can rise while one task collapses (a stronger, mismatched source pulls the merge its way), so every row
also carries its worst task's normalized accuracy (``worst_norm``, "Worst norm."). A variant that was not
merged because it equals another (a distac merge when DisTaC conditioned no task) has no row."""

from __future__ import annotations

import csv
import io as stdio
from typing import Any

from distac.pipeline.params import PipelineParams
from distac.pipeline.store import RunStore

FINETUNED = ("individual", "fine-tuned")  # the (method, variant) of the source models' row


def results_rows(params: PipelineParams, store: RunStore | None = None) -> list[dict[str, Any]]:
    """The absolute and normalized test accuracy per task and their means, in percent."""
    store = store or RunStore.of(params)
    tasks = params.task_names
    finetuned = store.finetuned_accuracy(tasks, "test")
    rows = [{"method": FINETUNED[0], "variant": FINETUNED[1], "alpha": None,
             **{f"{t}_abs": 100 * finetuned[t] for t in tasks}, **{f"{t}_norm": 100.0 for t in tasks},
             "mean_abs": 100 * sum(finetuned.values()) / len(tasks), "mean_norm": 100.0, "worst_norm": 100.0}]
    for method in params.method_names:
        for variant in params.merge.variants:
            result = store.evaluation(method, variant)
            if "identical_to" in result:  # not merged: the same model as another variant's row
                continue
            per_task = result["tasks"]
            normalized = {t: 100 * per_task[t]["normalized_accuracy"] for t in tasks}
            rows.append({"method": method, "variant": variant, "alpha": result["alpha"],
                         **{f"{t}_abs": 100 * per_task[t]["accuracy"] for t in tasks},
                         **{f"{t}_norm": normalized[t] for t in tasks},
                         "mean_abs": 100 * result["mean_accuracy"],
                         "mean_norm": 100 * result["mean_normalized_accuracy"],
                         "worst_norm": min(normalized.values())})
    return rows


def results_markdown(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """Per task 'absolute (normalized)', then the means and the worst task's normalized accuracy."""
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.1f}"

    header = ["Method", "Variant", "α", *tasks, "Avg. abs.", "Avg. norm.", "Worst norm."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        alpha = "–" if row["alpha"] is None else f"{row['alpha']:g}"
        cells = [f"{cell(row[f'{t}_abs'])} ({cell(row[f'{t}_norm'])})" for t in tasks]
        lines.append("| " + " | ".join([row["method"], row["variant"], alpha, *cells, cell(row["mean_abs"]),
                                        cell(row["mean_norm"]), cell(row.get("worst_norm"))]) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict[str, Any]]) -> str:
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def metrics(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """'<method>/<variant>' → its mean absolute and normalized accuracy and its worst task's normalized
    accuracy (DVC metrics, MLflow)."""
    return {f"{r['method']}/{r['variant']}": {key: round(r[key], 2) for key in ("mean_abs", "mean_norm", "worst_norm")}
            for r in rows}


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    """Mean normalized accuracy per method and variant as a grouped bar chart."""
    import matplotlib  # optional: the plots extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = [r for r in rows if (r["method"], r["variant"]) != FINETUNED]
    methods = list(dict.fromkeys(r["method"] for r in merged))
    variants = list(dict.fromkeys(r["variant"] for r in merged))
    value = {(r["method"], r["variant"]): r["mean_norm"] for r in merged}
    positions = range(len(methods))
    width = 0.8 / len(variants)
    figure, axis = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.5))
    for i, variant in enumerate(variants):
        offset = (i - (len(variants) - 1) / 2) * width
        axis.bar([p + offset for p in positions], [value[(m, variant)] for m in methods], width, label=variant)
    axis.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xticks(list(positions), methods)
    axis.set_ylabel("mean normalized accuracy (%)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    buffer = stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
